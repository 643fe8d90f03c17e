"""Normalised scores: 100 * (J - J_random) / (J_expert - J_random), in the evaluation (target) domain.

    from envs import reference_scores, normalized_score
    ref_min, ref_max = reference_scores("hopper", target_dataset)
    score = normalized_score(returns, ref_min, ref_max)

Which references (`references=`, the algos/ scripts' `--references`):
    d4rl  (the default) as the papers normalise: in the papers' physics the four original tasks (halfcheetah,
          hopper, walker2d, ant) use D4RL's published random and expert returns, which were measured in that very
          simulator (gym v2/v3 on mujoco-py); every other domain, and every domain in v5 physics, uses its own
    zoo   every domain its own random and expert returns
A domain's own references are those stored with the domain's dataset (Minari's ref_min_score / ref_max_score),
else the table envs/references.json, which maps domain -> {"random": float, "expert": float, "source": "where the
numbers come from"} and is filled by the policy zoo. `reference_info` also says where the pair came from (the
scripts write it into results.json).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

REFERENCES_PATH = Path(__file__).with_name("references.json")
REFERENCE_CHOICES = ("d4rl", "zoo")
# D4RL's reference returns (random, expert), measured in gym v2/v3 on mujoco-py: the papers' physics.
D4RL_REFERENCES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}


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
    match = re.fullmatch(r"crossdomain(?:-v5)?/([^/]+)/[^/]+", dataset.name)
    if match:
        return match.group(1)
    domains = {episode.get("domain") for episode in dataset.episode_metadata}
    return domains.pop() if len(domains) == 1 else None


def reference_scores(domain: str, dataset=None, physics: str = "papers", references: str = "d4rl") \
        -> tuple[float, float]:
    """(random return, expert return) of `domain` in `physics` (see the module docstring for `references`)."""
    info = reference_info(domain, dataset, physics, references)
    return info["random"], info["expert"]


def reference_info(domain: str, dataset=None, physics: str = "papers", references: str = "d4rl") -> dict:
    """{"random", "expert", "source"}: the references of `domain`, and where they come from.

    D4RL's for the four original tasks in the papers' physics with references="d4rl"; otherwise the domain's own:
    from `dataset` if it carries both (and was not collected in another domain, as far as its name and episode
    metadata tell), else envs/references.json. Exits with one sentence when no reference is known; never returns
    0 silently.
    """
    from envs.domains import check_domain, check_physics
    check_domain(domain)
    check_physics(physics)
    if references not in REFERENCE_CHOICES:
        raise SystemExit(f"Unknown references '{references}': choose d4rl (D4RL's for the original tasks in the "
                         f"papers' physics, the default) or zoo (every domain's own).")
    if references == "d4rl" and physics == "papers" and domain in D4RL_REFERENCES:
        random, expert = D4RL_REFERENCES[domain]
        return {"random": random, "expert": expert, "source": "D4RL (gym v2/v3 on mujoco-py, the papers' physics)"}
    if dataset is not None and dataset.ref_min_score is not None and dataset.ref_max_score is not None \
            and _dataset_domain(dataset) in (None, domain):
        return {"random": float(dataset.ref_min_score), "expert": float(dataset.ref_max_score),
                "source": f"the dataset {dataset.name}"}
    entry = load_references().get(domain)
    if entry is not None:
        try:
            return {"random": float(entry["random"]), "expert": float(entry["expert"]),
                    "source": f"envs/references.json ({entry.get('source', 'no source given')})"}
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"{REFERENCES_PATH} has a malformed entry for {domain}; it needs numeric 'random' and "
                             f"'expert' returns.") from None
    raise SystemExit(f"No reference returns are known for domain {domain}: generate a dataset for it (the "
                     f"generator stores the domain's random and expert returns), load a dataset that carries "
                     f"ref_min_score/ref_max_score, or add {{\"random\": ..., \"expert\": ...}} for it to "
                     f"{REFERENCES_PATH}.")


def dataset_score(dataset, domain: str, physics: str | None = None, references: str = "d4rl") \
        -> tuple[float, float, int]:
    """Mean and std (ddof 0) over the dataset's episodes of their normalised returns in `domain`, and the number
    of episodes: the level of the data itself, the reference a learner on it is compared with (D4RL's "dataset
    mean"). Every episode counts, the last one even if the dataset cut it short. Normalised with the references
    of `physics` (default: the dataset's own, else the papers') and `references`, those a run on it would use."""
    ref_min, ref_max = reference_scores(domain, dataset, physics or dataset.physics or "papers", references)
    _, episode = np.unique(dataset.episode_ids, return_inverse=True)  # ids of a subsample have gaps
    returns = np.bincount(episode, weights=dataset.rewards.astype(np.float64))
    scores = np.asarray(normalized_score(returns, ref_min, ref_max), dtype=np.float64)
    return float(scores.mean()), float(scores.std()), len(scores)
