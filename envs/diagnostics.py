"""Diagnostics of the methods, not the methods themselves: how well a dynamics scorer separates held-out target from
source transitions (ROC AUC), which source samples a filter keeps (per episode-metadata group), and how well a
trajectory encoder's z tells the domains apart (probes, a PCA plot). algos/ files call these to report; nothing here
changes what an algorithm learns, except holdout_split, which sets aside the held-out transitions a scorer does not
train on.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import jax
import numpy as np

from envs.run import write_atomic

HOLDOUT_MAX = 10_000  # held-out transitions per dataset at most: enough for a precise AUC, cheap to score
SOURCE_HOLDOUT_SEED = 0  # the source hold-out is the same for every seed, so seed k equals a 1-seed run
GROUP_KEYS = ("quality", "domain")  # per-episode metadata whose share among kept samples is reported
PROBE_STEPS, PROBE_LR, PROBE_L2 = 2_000, 0.5, 1e-3  # the linear probe's gradient descent on standardised z


# ---------------------------------------------------------------- the scorer's separation
def holdout_split(size: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): a random `fraction` of `size` held out, at least 1, at most 10,000."""
    held = min(max(1, int(round(fraction * size))), HOLDOUT_MAX)
    if held >= size:
        raise SystemExit(f"A dataset of {size} transitions is too small to hold out {held} of them for the "
                         f"scorer's separation test; use more data or a smaller --holdout-fraction.")
    permutation = np.random.default_rng(seed).permutation(size)
    return np.sort(permutation[held:]), np.sort(permutation[:held])


def held_out(dataset, indices) -> tuple:
    return dataset.observations[indices], dataset.actions[indices], dataset.next_observations[indices]


def separation_auc(target_scores, source_scores) -> float:
    """ROC AUC of h: the chance that a held-out target transition scores above a source one, ties counted half."""
    sorted_source = np.sort(np.asarray(source_scores, dtype=np.float64))
    target_scores = np.asarray(target_scores, dtype=np.float64)
    below = np.searchsorted(sorted_source, target_scores, side="left")
    not_above = np.searchsorted(sorted_source, target_scores, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(target_scores) * len(sorted_source)))


def held_out_separation(score, params, target_held, source_held) -> dict:
    """Per seed: AUC of h between held-out target and source transitions, and the mean h of each.

    params: stacked over S seeds; target_held: (obs, actions, next_obs) stacked [S, n, ...]; source_held: the
    shared (obs, actions, next_obs) [m, ...].
    """
    batched = jax.jit(jax.vmap(score, in_axes=(0, 0, 0, 0)))
    target_scores = np.asarray(batched(params, *target_held))
    source_scores = np.asarray(jax.jit(jax.vmap(score, in_axes=(0, None, None, None)))(params, *source_held))
    return {"auc": [separation_auc(t, s) for t, s in zip(target_scores, source_scores)],
            "target_score_mean": target_scores.mean(1).astype(np.float64).tolist(),
            "source_score_mean": source_scores.mean(1).astype(np.float64).tolist()}


# ---------------------------------------------------------------- what a filter keeps
def episode_groups(dataset) -> dict:
    """{metadata key: (value names, [N] int32 label of each transition)} for each key of GROUP_KEYS that the
    dataset's per-episode metadata carries; episodes without the key are labelled "unknown"."""
    groups = {}
    if not dataset.episode_metadata or dataset.episode_ids.max() >= len(dataset.episode_metadata):
        return groups
    for key in GROUP_KEYS:
        values = [episode.get(key) for episode in dataset.episode_metadata]
        if all(value is None for value in values):
            continue
        names = sorted({str(value) for value in values if value is not None})
        names += ["unknown"] * any(value is None for value in values)
        per_episode = np.array([names.index("unknown" if value is None else str(value)) for value in values],
                               dtype=np.int32)
        groups[key] = (names, per_episode[dataset.episode_ids])
    return groups


def trajectory_groups(groups: dict, starts: np.ndarray) -> dict:
    """{metadata key: (value names, [E] label of each trajectory)} from the per-transition labels of
    episode_groups (a trajectory's transitions share its episode's label)."""
    return {key: (names, labels[starts]) for key, (names, labels) in groups.items()}


def filter_sums(keep, dynamics_score, advantage, filter_score, q_weight, groups: tuple, labels: tuple) -> dict:
    """One step's statistics of a filter over a source batch, computed inside the jitted step ([B] arrays: the keep
    mask, h, A, g and the Q weight of each source sample; groups: ((metadata key, number of values), ...) with the
    batch's [B] labels of each key): summed over a chunk, filter_diagnostics turns them into means. advantage is
    None for a filter without one (OTDF's)."""
    dropped = 1.0 - keep
    sums = {"kept": keep.sum(), "dynamics_score_kept": (dynamics_score * keep).sum(),
            "dynamics_score_dropped": (dynamics_score * dropped).sum(), "filter_score_kept": (filter_score * keep).sum(),
            "filter_score_dropped": (filter_score * dropped).sum(), "q_weight_kept": (q_weight * keep).sum()}
    if advantage is not None:
        sums |= {"advantage_kept": (advantage * keep).sum(), "advantage_dropped": (advantage * dropped).sum()}
    for (key, size), label in zip(groups, labels):
        one_hot = jax.nn.one_hot(label, size)
        sums[f"seen_by_{key}"] = one_hot.sum(0)
        sums[f"kept_by_{key}"] = (one_hot * keep[:, None]).sum(0)
    return sums


def filter_diagnostics(sums: dict, group_names: dict, num_steps: int, source_size: int) -> dict:
    """Per-run means of kept and dropped source samples from a chunk's summed statistics ([G] arrays); None where
    nothing was kept or dropped."""
    sums = {name: np.asarray(value, dtype=np.float64) for name, value in sums.items()}
    kept = sums["kept"]
    dropped = num_steps * source_size - kept

    def ratio(numerator, denominator):
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(denominator > 0, numerator / denominator, np.nan)
        return [None if not np.isfinite(v) else float(v) for v in np.atleast_1d(values)]

    diagnostics = {"kept_fraction": ratio(kept, kept + dropped)}
    for name in ("dynamics_score", "advantage", "filter_score"):
        if f"{name}_kept" not in sums:  # a filter without an advantage
            continue
        diagnostics[f"{name}_kept"] = ratio(sums[f"{name}_kept"], kept)
        diagnostics[f"{name}_dropped"] = ratio(sums[f"{name}_dropped"], dropped)
    diagnostics["q_weight_kept"] = ratio(sums["q_weight_kept"], kept)
    for share in ("kept_share", "batch_share", "keep_rate"):
        diagnostics[share] = {}
    for key, names in group_names.items():
        kept_by, seen_by = sums[f"kept_by_{key}"], sums[f"seen_by_{key}"]  # [G, C]
        diagnostics["kept_share"][key] = {n: ratio(kept_by[:, c], kept) for c, n in enumerate(names)}
        diagnostics["batch_share"][key] = {n: ratio(seen_by[:, c], kept + dropped) for c, n in enumerate(names)}
        diagnostics["keep_rate"][key] = {n: ratio(kept_by[:, c], seen_by[:, c]) for c, n in enumerate(names)}
    return diagnostics


# ---------------------------------------------------------------- the trajectory representation
def probe_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A held-out mask over trajectories: `fraction` (at least 1) of each class with 2 or more trajectories."""
    rng, held = np.random.default_rng(seed), np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) >= 2:
            held[members[:max(1, int(round(fraction * len(members))))]] = True
    return held


def nearest_centroid_probe(z: np.ndarray, labels: np.ndarray, held: np.ndarray) -> dict:
    """Accuracy on the held-out trajectories of the nearest class centroid (Euclidean, centroids of the others),
    and the chance level: the accuracy of always answering the most common class of the others."""
    train_classes = np.unique(labels[~held])
    centroids = np.stack([z[~held & (labels == label)].mean(0) for label in train_classes])
    distances = ((z[held][:, None, :] - centroids[None]) ** 2).sum(-1)
    predicted = train_classes[distances.argmin(1)]
    majority = train_classes[np.argmax([(labels[~held] == label).sum() for label in train_classes])]
    return {"accuracy": float((predicted == labels[held]).mean()), "chance": float((labels[held] == majority).mean()),
            "train_trajectories": int((~held).sum()), "test_trajectories": int(held.sum())}


def linear_probe_accuracy(z: np.ndarray, labels: np.ndarray, held: np.ndarray) -> float:
    """Accuracy on the held-out trajectories of a multinomial logistic regression fitted on the others: z
    standardised with the training trajectories' mean and std, PROBE_STEPS full-batch gradient steps from zero
    weights with an L2 penalty (deterministic). Unlike centroids it finds a domain that is one direction of z
    when each domain is itself several clusters (one per behaviour policy)."""
    mean, std = z[~held].mean(0), z[~held].std(0) + 1e-8
    features, classes = (z - mean) / std, labels.max() + 1
    train_features, train_targets = features[~held], np.eye(classes)[labels[~held]]
    weights, bias = np.zeros((z.shape[1], classes)), np.zeros(classes)
    for _ in range(PROBE_STEPS):
        logits = train_features @ weights + bias
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        error = (probabilities - train_targets) / len(train_features)
        weights -= PROBE_LR * (train_features.T @ error + PROBE_L2 * weights)
        bias -= PROBE_LR * error.sum(0)
    return float(((features[held] @ weights + bias).argmax(1) == labels[held]).mean())


def representation_diagnostics(trajectory_z: np.ndarray, trajectory_labels: dict, fraction: float, seed: int) -> dict:
    """The probes for each metadata key with two or more values (None where no trajectory can be held out), and
    the PCA of z. trajectory_labels: {key: (value names, [E] label of each trajectory)}."""
    z = trajectory_z.astype(np.float64)
    probes = {}
    for key, (names, labels) in trajectory_labels.items():
        if len(np.unique(labels)) < 2:
            continue
        held = probe_split(labels, fraction, seed)
        if not held.any():
            probes[key] = None
            continue
        centroid = nearest_centroid_probe(z, labels, held)
        probes[key] = {"accuracy": linear_probe_accuracy(z, labels, held), "chance": centroid["chance"],
                       "nearest_centroid_accuracy": centroid["accuracy"],
                       "train_trajectories": centroid["train_trajectories"],
                       "test_trajectories": centroid["test_trajectories"],
                       "classes": [names[label] for label in np.unique(labels)]}
    centred = z - z.mean(0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    projection = np.zeros((len(z), 2))
    projection[:, :min(2, len(singular))] = centred @ components[:2].T
    variance = singular**2
    explained = (variance[:2] / variance.sum()).tolist() if variance.sum() > 0 else [0.0] * min(2, len(singular))
    return {"trajectories": len(z), "z_dim": z.shape[1], "probe": probes,
            "z_norm_mean": float(np.linalg.norm(z, axis=1).mean()), "pca_explained_variance": explained,
            "projection": projection}


def plot_projection(path: Path, projection: np.ndarray, trajectory_labels: dict, title: str) -> None:
    """The 2-D PCA of the trajectories' z as a PNG: colour by domain, marker by quality (where known)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(projection)
    domain_names, domains = trajectory_labels.get("domain", (["all"], np.zeros(count, dtype=np.int32)))
    quality_names, qualities = trajectory_labels.get("quality", ([None], np.zeros(count, dtype=np.int32)))
    markers, colours = "o^sDvP*Xh<>", plt.get_cmap("tab10")
    figure, axis = plt.subplots(figsize=(6.5, 5))
    for d, domain in enumerate(domain_names):
        for q, quality in enumerate(quality_names):
            chosen = (domains == d) & (qualities == q)
            if chosen.any():
                axis.scatter(projection[chosen, 0], projection[chosen, 1], s=14, alpha=0.75, color=colours(d % 10),
                             marker=markers[q % len(markers)],
                             label=domain if quality is None else f"{domain}, {quality}")
    axis.set_xlabel("principal component 1 of z")
    axis.set_ylabel("principal component 2 of z")
    axis.set_title(textwrap.fill(title, 80), fontsize=9)  # a long one (mixture name and probe scores) wraps
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    write_atomic(path, image.getvalue())


def describe_representation(out: Path, trajectory_z: np.ndarray, groups: dict, starts: np.ndarray, fraction: float,
                            seed: int) -> dict:
    """How well V2A's z tells the source's domains (and qualities) apart: the probes of representation_diagnostics
    (fitted on all but `fraction` of each group's trajectories) for results.json "representation", and the PCA of z
    plotted in out/z_projection.png. groups: episode_groups of the source; starts: each trajectory's first row."""
    per_trajectory = trajectory_groups(groups, starts)
    representation = representation_diagnostics(trajectory_z, per_trajectory, fraction, seed)
    projection = representation.pop("projection")
    probes = representation["probe"]
    summary = ", ".join(f"{key} {probes[key]['accuracy']:.2f} (chance {probes[key]['chance']:.2f})"
                        for key in ("domain", "quality") if probes.get(key) is not None)
    out.mkdir(parents=True, exist_ok=True)
    plot_projection(out / "z_projection.png", projection, per_trajectory,
                    f"z of {len(trajectory_z)} source trajectories, PCA\nlinear probe accuracy on held-out "
                    f"trajectories: {summary or 'n/a'}")
    print(f"representation: linear probe accuracy on held-out trajectories: {summary or 'n/a'}")
    return representation | {"projection_png": "z_projection.png"}
