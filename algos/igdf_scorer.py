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

Outputs in --out (default runs/igdf_scorer/<source>_to_<target>-<quality>/seed<seed>[-<hash>]), laid out as envs/run.py
describes: results.json (flags, seeds, every evaluation: losses and held-out separation per seed; the final
separation with its mean and std over seeds) and checkpoint.msgpack (a resumed run ends bit for bit where an
uninterrupted one would, on CPU); and, written before each checkpoint, the artefact: scorer.msgpack ({"scorer":
encoder params, stacked over seeds}; dvdf.py uses the first seed's) and scorer.json (what it was trained on:
datasets, fingerprints, flags, step, seeds, and its separation).
"""
import sys
from dataclasses import dataclass
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

from envs.catalog import Quality
from envs.diagnostics import SOURCE_HOLDOUT_SEED, held_out, held_out_separation, holdout_split
from envs.run import (check_common_flags, dataset_arrays, default_out, fingerprint, json_bytes, load_source_target,
                      losses_entry, need, open_run, scan_chunk, start_block, train_loop, write_atomic)


@dataclass
class Args:
    # --- experiment ---
    seed: int = 0
    """seed of the first run; seed k of --num-seeds uses seed + k (initialisation, batches, target subsample)"""
    num_seeds: int = 1
    """seeds trained at once, vmapped in one jitted program"""
    out: Optional[str] = None
    """output folder; default runs/igdf_scorer/<source>_to_<target>-<quality>/seed<seed>[-<hash>]"""
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
        return scan_chunk(lambda r, _: step(r, data), runner, num_steps)

    return init, train


def make_score_fn(hidden, repr_dim):
    """score(params, obs, actions, next_obs) -> h [N]: the dynamics score of one seed's scorer."""
    scorer_net = Scorer(hidden, repr_dim)

    def score(params, obs, actions, next_obs):
        return dynamics_score(*scorer_net.apply(params, obs, actions, next_obs))

    return score


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    need(args.batch_size >= 2, f"--batch-size must be at least 2 (one positive and one negative per row), got "
                               f"{args.batch_size}.")


def load_data(args: Args, seeds: list[int]):
    """Training data per seed (stacked), held-out sets, and a description of the data."""
    source, target_full, targets = load_source_target(args, seeds)
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


def separation_summary(entry: dict) -> dict:
    """The "final" of results.json: the last held-out separation, with the mean and std of its AUC over seeds."""
    auc = np.asarray(entry["separation"]["auc"], dtype=np.float64)
    return {"step": entry["step"], "separation": entry["separation"], "auc_mean": float(auc.mean()),
            "auc_std": float(auc.std())}


# ---------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, "igdf_scorer"))
    start_block(args, argv, out, [("igdf_scorer", args.steps, args.num_seeds)], saved, episodes=0)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    data, (target_held, source_held), data_info = load_data(args, seeds)
    init, train = make_scorer_train(args.hidden, args.repr_dim, args.lr, args.batch_size, data_info["obs_dim"],
                                    data_info["act_dim"])
    score = make_score_fn(args.hidden, args.repr_dim)
    trained_on = {"seeds": seeds, "source": args.source, "target": args.target,
                  "quality": None if args.source_dataset and args.target_dataset else args.quality,
                  **{key: data_info[key] for key in ("source_dataset", "source_size", "source_fingerprint",
                                                     "target_dataset", "target_size", "target_fingerprints",
                                                     "obs_dim", "act_dim")},
                  "hidden": list(args.hidden), "repr_dim": args.repr_dim, "batch_size": args.batch_size,
                  "lr": args.lr, "holdout_fraction": args.holdout_fraction}
    latest = {}  # the last evaluation's separation, which the artefact records

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        latest["separation"] = held_out_separation(score, runner.state.params, target_held, source_held)
        return {"step": step, "separation": latest["separation"], "losses": losses_entry(metrics)}

    def report(step: int, entry: dict, metrics) -> tuple[str, str]:
        separation = entry["separation"]
        auc = np.asarray(separation["auc"])
        return f"auc={auc.mean():.3f}", (
            f"step {step}: NCE loss {np.mean(metrics['nce_loss']):.4g}, held-out AUC {auc.mean():.3f} +- "
            f"{auc.std():.3f}, h target {np.mean(separation['target_score_mean']):.3f} vs source "
            f"{np.mean(separation['source_score_mean']):.3f}")

    def write_artifact(runner, step: int) -> None:
        """The encoders of every seed, what they were trained on, and how well they separate held-out data."""
        artifact = {"scorer": serialization.to_state_dict(jax.device_get(runner.state.params))}
        write_atomic(out / "scorer.msgpack", serialization.msgpack_serialize(artifact))
        write_atomic(out / "scorer.json", json_bytes({"kind": "scorer", "step": step, "steps": args.steps,
                                                      "finished": step == args.steps, **trained_on,
                                                      "separation": latest["separation"]}))

    results = train_loop(args, out, saved, algo="igdf_scorer", init=init,
                         title=f"igdf scorer {args.source}->{args.target} x{args.num_seeds}",
                         keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train, inputs=(data,),
                         in_axes=(ScorerData(0, 0, 0, None),), evaluate=evaluate_chunk, report=report,
                         header={"data": data_info, "artifact": str(out / "scorer.msgpack")},
                         final=separation_summary, before_checkpoint=write_artifact, name="The IGDF scorer")
    final = results["final"]
    data = f"{args.source_dataset or args.source} -> {args.target_dataset or args.target}"
    print(f"igdf scorer {data}, seeds {seeds}: held-out AUC of h (target above source) "
          f"{final['auc_mean']:.3f} +- {final['auc_std']:.3f} after {results['step']} steps; encoders in "
          f"{out / 'scorer.msgpack'}, results in {out}")
    return results


if __name__ == "__main__":
    main()
