"""Normalised scores: 100 * (J - J_random) / (J_expert - J_random), in the evaluation (target) domain.

    from envs import reference_scores, normalized_score
    ref_min, ref_max = reference_scores("hopper", target_dataset)
    score = normalized_score(returns, ref_min, ref_max)

The references of a domain are its own random and expert returns: those stored with the domain's dataset
(Minari's ref_min_score / ref_max_score), else the table envs/references.json, which maps
domain -> {"random": float, "expert": float, "source": "where the numbers come from"} and is filled by the
policy zoo. D4RL's published numbers belong to the old gym v2/v3 environments and are deliberately not used for
the v5 domains.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

REFERENCES_PATH = Path(__file__).with_name("references.json")


def normalized_score(returns, ref_min: float, ref_max: float):
    """100 * (returns - ref_min) / (ref_max - ref_min); a float for a scalar, an array for an array."""
    if ref_min is None or ref_max is None or not (math.isfinite(ref_min) and math.isfinite(ref_max)) \
            or ref_max == ref_min:
        raise SystemExit(f"Reference returns must be finite and differ to normalise a score, got random {ref_min} "
                         f"and expert {ref_max}.")
    scores = 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(scores) if scores.ndim == 0 else scores


def load_references(path: str | Path | None = None) -> dict:
    """The per-domain reference table: domain -> {"random": float, "expert": float, "source": str}."""
    with open(REFERENCES_PATH if path is None else path) as file:
        return json.load(file)


def _dataset_domain(dataset) -> str | None:
    """The domain a dataset was collected in, when its name or episode metadata says so."""
    match = re.fullmatch(r"crossdomain/([^/]+)/[^/]+", dataset.name)
    if match:
        return match.group(1)
    domains = {episode.get("domain") for episode in dataset.episode_metadata}
    return domains.pop() if len(domains) == 1 else None


def reference_scores(domain: str, dataset=None) -> tuple[float, float]:
    """(random return, expert return) of `domain`: from `dataset` if it carries both, else envs/references.json.

    A dataset's references are used only if it was not collected in another domain (as far as its name and
    episode metadata tell). Exits with one sentence when no reference is known; never returns 0 silently.
    """
    from envs.domains import check_domain
    check_domain(domain)
    if dataset is not None and dataset.ref_min_score is not None and dataset.ref_max_score is not None \
            and _dataset_domain(dataset) in (None, domain):
        return float(dataset.ref_min_score), float(dataset.ref_max_score)
    entry = load_references().get(domain)
    if entry is not None:
        try:
            return float(entry["random"]), float(entry["expert"])
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"{REFERENCES_PATH} has a malformed entry for {domain}; it needs numeric 'random' and "
                             f"'expert' returns.") from None
    raise SystemExit(f"No reference returns are known for domain {domain}: generate a dataset for it (the "
                     f"generator stores the domain's random and expert returns), load a dataset that carries "
                     f"ref_min_score/ref_max_score, or add {{\"random\": ..., \"expert\": ...}} for it to "
                     f"{REFERENCES_PATH}.")


def dataset_score(dataset, domain: str) -> tuple[float, float, int]:
    """Mean and std (ddof 0) over the dataset's episodes of their normalised returns in `domain`, and the number
    of episodes: the level of the data itself, the reference a learner on it is compared with (D4RL's "dataset
    mean"). Every episode counts, the last one even if the dataset cut it short."""
    ref_min, ref_max = reference_scores(domain, dataset)
    _, episode = np.unique(dataset.episode_ids, return_inverse=True)  # ids of a subsample have gaps
    returns = np.bincount(episode, weights=dataset.rewards.astype(np.float64))
    scores = np.asarray(normalized_score(returns, ref_min, ref_max), dtype=np.float64)
    return float(scores.mean()), float(scores.std()), len(scores)
