"""IGDF's contrastive dynamics scorer: how likely a source transition (s, a, s') is under the target dynamics.

Wen et al., "Contrastive Representation for Data Filtering in Cross-Domain Offline Reinforcement Learning"
(IGDF), ICML 2024, arXiv:2405.06192, as the DVDF authors run it (no state normalisation). Two encoders,
phi(s, a): [s, a] -> 256 -> 256 -> 64 and psi(s'): s' -> 256 -> 256 -> 64, are trained with a binary NCE: row i of
a batch pairs phi(s_i, a_i) of a TARGET transition with its own next state s'_i (label 1, column 0) and with the
same B - 1 SOURCE next states (label 0, columns 1..B-1); the loss is the mean over all B x B logits
phi . psi of the binary cross-entropy with logits (not a softmax InfoNCE). The dynamics score of a transition is
h(s, a, s') = cos(phi(s, a), psi(s')) in [-1, 1]. DVDF and IGDF filter and weight source samples by it; hand this
file's artefact to `python algos/dvdf.py --scorer-artifact <out>/scorer.msgpack`.

    python algos/igdf_scorer.py --source halfcheetah-kinematic --target halfcheetah --quality medium

Data: the source dataset and a target subsample as in iql.py (--target-fraction or --target-size, seed k draws its
subsample with seed + k). A random --holdout-fraction of each (at most 10,000 transitions each) is held out of
training: the source hold-out is fixed (drawn with seed 0, the same for every seed), the target hold-out is drawn
from each seed's subsample with that seed. Every --eval-every steps the scorer is asked how well h separates the
held-out target transitions from the held-out source ones: the ROC AUC (the chance that a target transition scores
above a source one; 0.5 is no separation) and the mean h of each, printed and saved. Many seeds run in one jitted
program (`jax.jit(jax.vmap(train))`, sharded across accelerators when there are several); seed k of an N-seed run is
the 1-seed run with --seed <seed + k>.

Outputs in --out (default runs/igdf_scorer/<source>_to_<target>-<quality>/seed<seed>), written atomically:
    scorer.msgpack      the artefact: {"scorer": encoder params, stacked over seeds}; dvdf.py uses the first seed's
    scorer.json         what it was trained on (datasets, fingerprints, flags, step, seeds) and its separation
    results.json        flags, seeds, every evaluation (losses and held-out separation per seed), timing, versions
    checkpoint.msgpack  everything --resume needs; a resumed run ends bit for bit where an uninterrupted one would
"""
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Literal, NamedTuple, Optional

# `python algos/igdf_scorer.py` puts algos/ on the path, not the repository root that holds envs/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization
from flax.training.train_state import TrainState
from tqdm import tqdm

from envs import check_domain, load_dataset, subsample

Quality = Literal["random", "medium", "medium-replay", "medium-expert", "expert"]


@dataclass
class Args:
    # --- experiment ---
    seed: int = 0
    """seed of the first run; seed k of --num-seeds uses seed + k (initialisation, batches, target subsample)"""
    num_seeds: int = 1
    """seeds trained at once, vmapped in one jitted program"""
    out: Optional[str] = None
    """output folder; default runs/igdf_scorer/<source>_to_<target>-<quality>/seed<seed>"""
    resume: bool = False
    """continue the interrupted run in --out from its last checkpoint (same flags)"""
    # --- data ---
    source: str = "halfcheetah-kinematic"
    """source domain (python -m envs list)"""
    target: str = "halfcheetah"
    """target domain"""
    quality: Quality = "medium"
    """quality of the generated source and target datasets"""
    target_fraction: float = 0.1
    """fraction of the target dataset kept, in (0, 1]"""
    target_size: Optional[int] = None
    """keep exactly this many target transitions instead of --target-fraction (the papers' low-data 5000)"""
    source_dataset: Optional[str] = None
    """a Minari id or D4RL-format HDF5 path to use instead of the generated source dataset"""
    target_dataset: Optional[str] = None
    """a Minari id or D4RL-format HDF5 path to use instead of the generated target dataset"""
    physics: Literal["papers", "v5"] = "papers"
    """simulator of the generated datasets and of the evaluation: papers (gym v3 on mujoco-py, the papers' and
    D4RL's, reproduced in current MuJoCo) or v5 (Gymnasium's v5 environments as they ship)"""
    holdout_fraction: float = 0.1
    """fraction of each dataset (at most 10,000 transitions) held out to measure the separation, in (0, 0.5]"""
    # --- training ---
    steps: int = 7_000
    """gradient steps"""
    eval_every: int = 1_000
    """gradient steps between held-out evaluations (and checkpoints and artefact updates)"""
    # --- optimisation ---
    batch_size: int = 128
    """B: target transitions per step; B - 1 source next states are the shared negatives"""
    lr: float = 3e-4
    """Adam learning rate of both encoders"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of both encoders"""
    # --- algorithm ---
    repr_dim: int = 64
    """size of the representations phi(s, a) and psi(s')"""


HOLDOUT_MAX = 10_000  # held-out transitions per dataset at most: enough for a precise AUC, cheap to score
SOURCE_HOLDOUT_SEED = 0  # the source hold-out is the same for every seed, so seed k equals a 1-seed run


# ---------------------------------------------------------------- networks
class MLP(nn.Module):
    hidden: tuple[int, ...]
    out_dim: int

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.out_dim)(x)


class Scorer(nn.Module):
    """IGDF's two encoders: phi(s, a) and psi(s'), no output activation. next_obs may have another batch size."""
    hidden: tuple[int, ...]
    repr_dim: int

    @nn.compact
    def __call__(self, obs, action, next_obs):
        sa_repr = MLP(self.hidden, self.repr_dim, name="phi")(jnp.concatenate([obs, action], axis=-1))
        next_repr = MLP(self.hidden, self.repr_dim, name="psi")(next_obs)
        return sa_repr, next_repr


# ---------------------------------------------------------------- train state
class ScorerRunner(NamedTuple):
    """One seed's whole scorer training state; many seeds stack it along a leading axis."""
    state: TrainState
    rng: jax.Array


class ScorerData(NamedTuple):
    target_observations: jax.Array  # [N_t, obs_dim] target transitions: the positives and the rows
    target_actions: jax.Array  # [N_t, act_dim]
    target_next_observations: jax.Array  # [N_t, obs_dim]
    source_next_observations: jax.Array  # [N_s, obs_dim] source next states: the shared negatives


# ---------------------------------------------------------------- losses
def nce_loss(sa_repr, target_next_repr, source_next_repr):
    """IGDF's binary NCE; returns (loss, logits [B, B]).

    sa_repr, target_next_repr: [B, D] from B target transitions; source_next_repr: [B - 1, D], the negatives
    shared by every row. logits_i0 = phi_i . psi(s'_i) (label 1), logits_ij = phi_i . psi(source s'_j) (label 0);
    the loss is the mean over all B x B entries of the binary cross-entropy with logits.
    """
    batch, dim = sa_repr.shape
    chex.assert_shape([target_next_repr], (batch, dim))
    chex.assert_shape([source_next_repr], (batch - 1, dim))
    positive = (sa_repr * target_next_repr).sum(-1, keepdims=True)
    negatives = sa_repr @ source_next_repr.T
    logits = jnp.concatenate([positive, negatives], axis=1)
    labels = jnp.zeros_like(logits).at[:, 0].set(1.0)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), logits


def dynamics_score(sa_repr, next_repr, eps=1e-8):
    """h(s, a, s') = cos(phi(s, a), psi(s')) in [-1, 1], per transition (torch's cosine_similarity, eps 1e-8)."""
    norms = jnp.linalg.norm(sa_repr, axis=-1) * jnp.linalg.norm(next_repr, axis=-1)
    return (sa_repr * next_repr).sum(-1) / jnp.maximum(norms, eps)


# ---------------------------------------------------------------- training
def make_scorer_train(hidden, repr_dim, lr, batch_size, obs_dim, act_dim):
    """Returns init(rng) -> ScorerRunner and train(runner, data, num_steps) -> (runner, chunk metrics).

    Pure functions of one seed; run as jax.jit(jax.vmap(...)) over seeds (dvdf.py runs a copy on one seed).
    """
    scorer_net = Scorer(hidden, repr_dim)

    def init(rng) -> ScorerRunner:
        rng, key = jax.random.split(rng)
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        params = scorer_net.init(key, obs, action, obs)
        return ScorerRunner(TrainState.create(apply_fn=scorer_net.apply, params=params, tx=optax.adam(lr)), rng)

    def step(runner: ScorerRunner, data: ScorerData):
        rng, batch_key = jax.random.split(runner.rng)
        target_key, source_key = jax.random.split(batch_key)
        rows = jax.random.randint(target_key, (batch_size,), 0, data.target_observations.shape[0])
        negatives = jax.random.randint(source_key, (batch_size - 1,), 0, data.source_next_observations.shape[0])
        next_obs = jnp.concatenate([data.target_next_observations[rows], data.source_next_observations[negatives]])

        def loss_fn(params):
            sa_repr, next_repr = scorer_net.apply(params, data.target_observations[rows],
                                                  data.target_actions[rows], next_obs)
            return nce_loss(sa_repr, next_repr[:batch_size], next_repr[batch_size:])

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(runner.state.params)
        labels = jnp.zeros_like(logits).at[:, 0].set(1.0)
        metrics = {"nce_loss": loss, "positive_logit": logits[:, 0].mean(), "negative_logit": logits[:, 1:].mean(),
                   "nce_accuracy": ((logits > 0) == (labels > 0)).mean()}
        return ScorerRunner(runner.state.apply_gradients(grads=grads), rng), metrics

    def train(runner: ScorerRunner, data: ScorerData, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""
        runner, metrics = jax.lax.scan(lambda r, _: step(r, data), runner, None, length=num_steps)
        return runner, jax.tree.map(jnp.mean, metrics)

    return init, train


def make_score_fn(hidden, repr_dim):
    """score(params, obs, actions, next_obs) -> h [N]: the dynamics score of one seed's scorer."""
    scorer_net = Scorer(hidden, repr_dim)

    def score(params, obs, actions, next_obs):
        return dynamics_score(*scorer_net.apply(params, obs, actions, next_obs))

    return score


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


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_domain(args.source, flag="--source")
    check_domain(args.target, flag="--target")

    def need(ok: bool, message: str):
        if not ok:
            raise SystemExit(message)

    need(0.0 < args.target_fraction <= 1.0, f"--target-fraction must be in (0, 1], got {args.target_fraction}.")
    need(args.target_size is None or args.target_size >= 1,
         f"--target-size must be a positive number of transitions, got {args.target_size}.")
    need(0.0 < args.holdout_fraction <= 0.5, f"--holdout-fraction must be in (0, 0.5], got {args.holdout_fraction}.")
    for flag in ("steps", "eval_every", "num_seeds", "repr_dim"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    need(args.seed >= 0, f"--seed must be 0 or more, got {args.seed}.")
    need(args.batch_size >= 2, f"--batch-size must be at least 2 (one positive and one negative per row), got "
                               f"{args.batch_size}.")
    need(len(args.hidden) >= 1 and min(args.hidden) >= 1,
         f"--hidden must be one or more positive layer widths, got {args.hidden}.")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}.")


def fingerprint(transitions) -> str:
    """A short sha256 of a dataset's arrays: artefacts and caches name the exact data they were trained on."""
    digest = hashlib.sha256()
    for array in transitions:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def dataset_arrays(dataset) -> tuple:
    """The fields a fingerprint covers, in a fixed order."""
    return (dataset.observations, dataset.actions, dataset.rewards, dataset.next_observations, dataset.terminals)


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


def load_data(args: Args, seeds: list[int]):
    """Training data per seed (stacked), held-out sets, and a description of the data."""
    target_full = load_dataset(args.target_dataset, domain=args.target, physics=args.physics,
                               quality=None if args.target_dataset else args.quality)
    source = load_dataset(args.source_dataset, domain=args.source, physics=args.physics,
                          quality=None if args.source_dataset else args.quality)
    if (source.obs_dim, source.act_dim) != (target_full.obs_dim, target_full.act_dim):
        raise SystemExit(f"The source dataset has observation/action sizes {source.obs_dim}/{source.act_dim} "
                         f"but the target has {target_full.obs_dim}/{target_full.act_dim}; pick domains of "
                         f"the same task.")
    size = {"count": args.target_size} if args.target_size else {"fraction": args.target_fraction}
    targets = [subsample(target_full, **size, seed=seed) for seed in seeds]
    source_train, source_held = holdout_split(source.size, args.holdout_fraction, SOURCE_HOLDOUT_SEED)
    splits = [holdout_split(target.size, args.holdout_fraction, seed) for target, seed in zip(targets, seeds)]
    per_seed = [(t.observations[train], t.actions[train], t.next_observations[train])
                for t, (train, _) in zip(targets, splits)]
    data = ScorerData(*(np.stack(field) for field in zip(*per_seed)),
                      source_next_observations=source.next_observations[source_train])  # shared by all seeds
    target_held = tuple(np.stack(field) for field in zip(*(held_out(t, held) for t, (_, held) in zip(targets,
                                                                                                      splits))))
    info = {"source_dataset": source.name, "source_size": source.size,
            "source_fingerprint": fingerprint(dataset_arrays(source)),
            "target_dataset": target_full.name, "target_full_size": target_full.size, "target_size": targets[0].size,
            "target_fingerprints": [fingerprint(dataset_arrays(t)) for t in targets],
            "source_held_out": len(source_held), "target_held_out": len(splits[0][1]),
            "obs_dim": source.obs_dim, "act_dim": source.act_dim}
    return jax.device_put(data), (target_held, held_out(source, source_held)), info


# ---------------------------------------------------------------- devices
def run_shardings(num_runs: int):
    """(per-run, shared) shardings that spread the leading run axis (the vmapped seeds) over every accelerator
    and copy shared data to each, so one jitted program runs each device's share of the runs; None on a single
    device, or when the runs do not divide evenly among the devices (then everything runs on the first)."""
    devices = jax.devices()
    if len(devices) < 2 or num_runs % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("runs",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# ---------------------------------------------------------------- files
def write_atomic(path: Path, content: bytes) -> None:
    """Write to a temporary file next to `path`, then rename it over `path`: whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "gymnasium", "mujoco", "minari", "tyro"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------- main
def open_run(args: Args) -> tuple[Path, Optional[dict]]:
    """The output folder, and the checkpoint to continue with --resume (whose flags must be this run's)."""
    physics_tag = "-v5physics" if args.physics == "v5" else ""  # the papers' physics names no folder
    out = Path(args.out or f"runs/igdf_scorer/{args.source}_to_{args.target}-{args.quality}{physics_tag}/"
               f"seed{args.seed}")
    checkpoint_path = out / "checkpoint.msgpack"
    if args.resume and not checkpoint_path.exists():
        raise SystemExit(f"--resume found no checkpoint at {checkpoint_path}; run without --resume to start.")
    if not args.resume and checkpoint_path.exists():
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    if not args.resume:
        return out, None
    saved = serialization.msgpack_restore(checkpoint_path.read_bytes())
    saved_flags = json.loads(saved["flags"])
    for name, value in run_flags(args).items():
        if value != saved_flags.get(name):
            raise SystemExit(f"--resume needs the interrupted run's flags, but --{name.replace('_', '-')} is "
                             f"{value} here and {saved_flags.get(name)} in {checkpoint_path}.")
    return out, saved


def run_flags(args: Args) -> dict:
    """The flags that define a run (all but --resume and --out), as JSON values."""
    return json.loads(json.dumps({k: v for k, v in asdict(args).items() if k not in ("resume", "out")}))


def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args)
    wall_start = time.perf_counter()

    seeds = [args.seed + k for k in range(args.num_seeds)]
    data, (target_held, source_held), data_info = load_data(args, seeds)
    obs_dim, act_dim = data_info["obs_dim"], data_info["act_dim"]
    init, train = make_scorer_train(args.hidden, args.repr_dim, args.lr, args.batch_size, obs_dim, act_dim)
    score = make_score_fn(args.hidden, args.repr_dim)

    start = time.perf_counter()
    runner = jax.block_until_ready(jax.jit(jax.vmap(init))(jnp.stack([jax.random.PRNGKey(s) for s in seeds])))
    compile_seconds = time.perf_counter() - start
    start_step, evaluations = 0, []
    if saved is not None:
        runner = serialization.from_state_dict(runner, saved["runner"])
        start_step, evaluations = int(saved["step"]), json.loads(saved["evaluations"])
    shardings = run_shardings(args.num_seeds)
    if shardings is not None:  # several accelerators: each trains its share of the seeds
        per_run, shared = shardings
        runner = jax.device_put(runner, per_run)
        data = ScorerData(*jax.device_put(tuple(data[:3]), per_run), jax.device_put(data[3], shared))
    elif jax.device_count() > 1:
        print(f"{args.num_seeds} seeds do not divide among {jax.device_count()} devices: all run on the first.")

    # One program per chunk length (--eval-every, and the remainder), compiled ahead of time: no chunk recompiles.
    chunks = [min(args.eval_every, args.steps - step) for step in range(start_step, args.steps, args.eval_every)]
    compiled = {}
    for num_steps in sorted(set(chunks)):
        start = time.perf_counter()
        train_chunk = jax.jit(jax.vmap(partial(train, num_steps=num_steps), in_axes=(0, ScorerData(0, 0, 0, None))))
        compiled[num_steps] = train_chunk.lower(runner, data).compile()
        compile_seconds += time.perf_counter() - start

    def write_artifact(step: int) -> None:
        """The encoders of every seed, what they were trained on, and how well they separate held-out data."""
        info = {"kind": "scorer", "step": step, "steps": args.steps, "finished": step == args.steps, "seeds": seeds,
                "source": args.source, "target": args.target,
                "quality": None if args.source_dataset and args.target_dataset else args.quality,
                **{k: data_info[k] for k in ("source_dataset", "source_size", "source_fingerprint", "target_dataset",
                                             "target_size", "target_fingerprints", "obs_dim", "act_dim")},
                "hidden": list(args.hidden), "repr_dim": args.repr_dim, "batch_size": args.batch_size,
                "lr": args.lr, "holdout_fraction": args.holdout_fraction, "separation": evaluations[-1]["separation"]}
        artifact = {"scorer": serialization.to_state_dict(jax.device_get(runner.state.params))}
        write_atomic(out / "scorer.msgpack", serialization.msgpack_serialize(artifact))
        write_atomic(out / "scorer.json", json.dumps(info, indent=1).encode())

    def write_results(step: int, timing: Optional[dict]) -> dict:
        final = evaluations[-1] if step == args.steps else None
        auc = None if final is None else np.asarray(final["separation"]["auc"], dtype=np.float64)
        results = {
            "algo": "igdf_scorer", "finished": final is not None, "step": step, "args": asdict(args), "seeds": seeds,
            "data": data_info, "artifact": str(out / "scorer.msgpack"), "evaluations": evaluations,
            "final": None if final is None else {"step": step, "separation": final["separation"],
                                                 "auc_mean": float(auc.mean()), "auc_std": float(auc.std())},
            "timing": timing, "versions": package_versions()}
        write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
        return results

    out.mkdir(parents=True, exist_ok=True)
    step, train_seconds = start_step, 0.0
    if not chunks:  # --resume of a finished run: results.json again from the checkpoint, with its last timing
        previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
        results = write_results(step, previous.get("timing"))
    pbar = tqdm(total=args.steps, initial=start_step, unit="step", dynamic_ncols=True,
                desc=f"igdf scorer {args.source}->{args.target} x{args.num_seeds}")
    for num_steps in chunks:
        start = time.perf_counter()
        runner, metrics = jax.block_until_ready(compiled[num_steps](runner, data))
        train_seconds += time.perf_counter() - start
        step += num_steps

        separation = held_out_separation(score, runner.state.params, target_held, source_held)
        evaluations.append({"step": step, "separation": separation,
                            "losses": {name: np.asarray(value, dtype=np.float64).tolist()
                                       for name, value in metrics.items()}})
        # artefact and checkpoint first: if killed before results.json is rewritten, --resume rewrites it
        write_artifact(step)
        checkpoint = {"runner": serialization.to_state_dict(jax.device_get(runner)), "step": step,
                      "evaluations": json.dumps(evaluations), "flags": json.dumps(run_flags(args))}
        write_atomic(out / "checkpoint.msgpack", serialization.msgpack_serialize(checkpoint))
        timed_steps = step - start_step
        results = write_results(step, {
            "steps_per_second": timed_steps / train_seconds,  # gradient steps, every seed at once
            "updates_per_second": timed_steps * args.num_seeds / train_seconds,
            "compile_seconds": compile_seconds, "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - wall_start, "timed_steps": timed_steps,
            "resumed_from_step": start_step, "device_kind": jax.devices()[0].device_kind,
            "platform": jax.default_backend(),
            "devices": jax.device_count() if shardings else 1})

        auc = np.asarray(separation["auc"])
        pbar.update(num_steps)
        pbar.set_postfix(auc=f"{auc.mean():.3f}")
        tqdm.write(f"step {step}: NCE loss {np.mean(metrics['nce_loss']):.4g}, held-out AUC {auc.mean():.3f} +- "
                   f"{auc.std():.3f}, h target {np.mean(separation['target_score_mean']):.3f} vs source "
                   f"{np.mean(separation['source_score_mean']):.3f}")
    pbar.close()

    final = results["final"]
    data = f"{args.source_dataset or args.source} -> {args.target_dataset or args.target}"
    print(f"igdf scorer {data}, seeds {seeds}: held-out AUC of h (target above source) "
          f"{final['auc_mean']:.3f} +- {final['auc_std']:.3f} after {step} steps; encoders in "
          f"{out / 'scorer.msgpack'}, results in {out}")
    return results


if __name__ == "__main__":
    main()
