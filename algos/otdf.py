"""OTDF: optimal-transport data filtering with a dataset constraint, for cross-domain offline RL, many seeds at once.

Lyu, Yan, Qiao, Liu, Ma, Ye, Yang, Lu and Li, "Cross-Domain Offline Policy Adaptation with Optimal Transport and
Dataset Constraint", ICLR 2025 (https://openreview.net/forum?id=LRrbD8EZJl), on IQL (Kostrikov et al., ICLR 2022),
as its released code (github.com/dmksjfl/OTDF) computes it.

    python algos/otdf.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/otdf.py ... --ot-target-size 5000     # OT against 5,000 target transitions: sized for a CPU

Stage 1/3, the optimal-transport deviation of every source transition (once per source/target pair, cached):
    u = [s, a, s'] of each transition; source chunks of --ot-chunk (10,000) against the target set by entropic OT
    (ott-jax's Sinkhorn, uniform weights, the cosine cost scaled by its maximum for the solver, threshold 1e-9, at
    most 100 iterations); d_i = -sum_j P_ij C_ij with the plan P and the unscaled cosine cost C (higher: better
    aligned with the target data). The target set is the first seed's target subsample (--ot-target-size: a random
    part of it), as the other stages' are.
Stage 2/3, the dataset constraint: a CVAE of the target behaviour, beta(a | s), trained on the same target data
    (10,000 steps, hidden 750, latent 2 x action dim, lr 1e-3, loss reconstruction MSE + 0.5 KL).
Stage 3/3, IQL on filtered source + target, per step (the numbers the code cites):
    1. Draw B source and B target transitions (the authors' 128 + 128).
    2. Batch-normalise the deviation, c = (d - max_batch d) / (max_batch d - min_batch d), in [-1, 0].
    3. Keep the top int(B proportion) source samples by c (proportion 0.8; a rank mask, as dvdf.py's).
    4. IQL's V loss on kept source + target; Q loss weighted by exp(c) on kept source samples and 1 on target ones.
    5. Actor: IQL's advantage-weighted behaviour cloning, summed over action dims, minus reg_weight * log beta(pi|s)
       of an action pi sampled from the tanh-Gaussian policy (reg_weight 0.5; 0.1 for halfcheetah-kinematic).
       log beta is the released code's estimate, logsumexp over 10 latent samples z ~ q(z | s, pi) of
       log N(pi; decoder(s, z), beta / 4) with beta 0.4; `--log-beta iwae` adds log p(z) - log q(z | s, pi) - log 10
       (the importance-weighted bound the paper's notation suggests).
Evaluation: --eval-episodes episodes per seed of the deterministic action tanh(mu(s)) in the target domain, normalised
with its reference returns. Seed k of an N-seed run is the 1-seed run with --seed <seed + k> given the same stages
(up to float rounding of the batched matmuls).

Outputs in --out (default runs/otdf/<source>_to_<target>-<quality>/seed<seed>[-<hash>]), as envs/run.py describes;
results.json adds the stages (where each came from; the deviation's statistics) and per evaluation the filter's
diagnostics (envs/diagnostics.py: c of kept and dropped source samples, each episode-metadata group's share).
"""
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/otdf.py` puts algos/ on the path, not the repository root that holds envs/.
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
from ott.geometry import costs, pointcloud
from ott.solvers import linear

from envs import domain_info, evaluate, reference_info
from envs.diagnostics import episode_groups, filter_diagnostics, filter_sums
from envs.run import (CrossDomainArgs, Progress, STAGE_SAVE_SECONDS, cached_stage, check_common_flags, dataset_arrays,
                      datasets_line, default_out, evaluation_entry, fingerprint, load_source_target, need, open_run,
                      run_stage, save_stage, scan_chunk, set_aside, stage_path, start_block, stopped, train_loop,
                      write_atomic)


@dataclass
class Args(CrossDomainArgs):
    # envs.run.CrossDomainArgs' flags come first (experiment, data, training and evaluation: --seed to --eval-episodes)
    cache_dir: str = "runs/cache"
    """where the stages (deviations, CVAE) are cached, keyed by everything they depend on"""
    # --- optimisation ---
    batch_size: int = 256
    """source + target transitions drawn per step, half each (the authors' 128 + 128)"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and value; the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of actor, critics and value"""
    # --- IQL ---
    discount: float = 0.99
    """discount factor; bootstraps through time limits, not through terminals"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    expectile: float = 0.7
    """expectile of the value loss, in (0, 1)"""
    temperature: float = 3.0
    """inverse temperature of the actor's advantage weights exp(temperature * A)"""
    max_weight: float = 100.0
    """clip of the actor's advantage weights"""
    # --- OTDF ---
    proportion: float = 0.8
    """fraction of each source batch kept, the top by the deviation, in (0, 1]"""
    deviation_weight: bool = True
    """weight kept source samples' Q loss by exp(c) (OTDF's --weight); --no-deviation-weight: by 1"""
    dataset_constraint: bool = True
    """the actor's CVAE regulariser -reg_weight log beta(pi | s); --no-dataset-constraint: IQL's actor alone"""
    reg_weight: Optional[float] = None
    """weight of the dataset constraint; default 0.1 when a domain is halfcheetah-kinematic, else 0.5 (OTDF)"""
    log_beta: Literal["released", "iwae"] = "released"
    """log beta(pi | s): the released code's logsumexp of decoder log-likelihoods, or the importance-weighted bound"""
    beta: float = 0.4
    """the decoder's variance is beta / 4 in log beta"""
    num_samples: int = 10
    """latent samples z of log beta"""
    # --- stage 1: the optimal-transport deviation ---
    ot_chunk: int = 10_000
    """source transitions matched against the target set at once (memory: 8 bytes x chunk x target size)"""
    ot_target_size: Optional[int] = None
    """match against this many target transitions, a random part of the target data (default: all of it)"""
    ot_epsilon: Optional[float] = None
    """entropic regularisation of the scaled cost; default ott-jax's, 0.05 x the std of the scaled cost matrix"""
    ot_iterations: int = 100
    """most Sinkhorn iterations per chunk"""
    ot_threshold: float = 1e-9
    """Sinkhorn's convergence threshold on the marginals' error"""
    # --- stage 2: the target-behaviour CVAE ---
    cvae_steps: int = 10_000
    """gradient steps of the CVAE"""
    cvae_batch_size: int = 128
    """target transitions per CVAE step"""
    cvae_hidden: tuple[int, ...] = (750, 750)
    """hidden layer widths of the CVAE's encoder and decoder"""
    cvae_lr: float = 1e-3
    """Adam learning rate of the CVAE"""
    cvae_kl_weight: float = 0.5
    """weight of the KL term in the CVAE loss"""


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # OTDF's policy log-std bounds
CVAE_LOG_STD_MIN, CVAE_LOG_STD_MAX = -4.0, 15.0  # the CVAE encoder's log-std bounds (BCQ's, as OTDF's)
CACHE_VERSION = 1  # part of every stage's cache key: bump it when a stage's computation changes


# ---------------------------------------------------------------- networks
class MLP(nn.Module):
    hidden: tuple[int, ...]
    out_dim: int
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.Dense(width)(x)
            x = nn.relu(nn.LayerNorm()(x) if self.layer_norm else x)
        return nn.Dense(self.out_dim)(x)


class TwinCritic(nn.Module):
    """Two independent critics Q(s, a) evaluated as one batched network: output [2, batch]."""
    hidden: tuple[int, ...]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=2)
        return twin(self.hidden, 1, self.layer_norm)(jnp.concatenate([obs, action], axis=-1)).squeeze(-1)


class ValueNet(nn.Module):
    hidden: tuple[int, ...]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs):
        return MLP(self.hidden, 1, self.layer_norm)(obs).squeeze(-1)


class GaussianActor(nn.Module):
    """OTDF's policy: obs -> (mu, log_std) of a tanh-Gaussian, one network with 2 x act_dim outputs."""
    act_dim: int
    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs):
        mu, log_std = jnp.split(MLP(self.hidden, 2 * self.act_dim)(obs), 2, axis=-1)
        return mu, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class CVAE(nn.Module):
    """The target-behaviour model beta(a | s): encoder q(z | s, a) -> (mean, std), decoder (s, z) -> tanh action."""
    act_dim: int
    latent_dim: int
    hidden: tuple[int, ...]

    def setup(self):
        self.encoder = MLP(self.hidden[:-1], self.hidden[-1])
        self.mean, self.log_std = nn.Dense(self.latent_dim), nn.Dense(self.latent_dim)
        self.decoder = MLP(self.hidden, self.act_dim)

    def encode(self, obs, action):
        features = nn.relu(self.encoder(jnp.concatenate([obs, action], axis=-1)))
        return self.mean(features), jnp.exp(jnp.clip(self.log_std(features), CVAE_LOG_STD_MIN, CVAE_LOG_STD_MAX))

    def decode(self, obs, z):
        return jnp.tanh(self.decoder(jnp.concatenate([obs, z], axis=-1)))

    def __call__(self, obs, action, noise):
        """(reconstruction with z = mean + std noise, mean, std)."""
        mean, std = self.encode(obs, action)
        return self.decode(obs, mean + std * noise), mean, std


# ---------------------------------------------------------------- stage 1: the OT deviation (OTDF's make_otdf_cost.py)
def transition_vectors(dataset) -> np.ndarray:
    """u = [s, a, s'] of every transition, [N, 2 obs_dim + act_dim]."""
    return np.concatenate([dataset.observations, dataset.actions, dataset.next_observations], axis=1)


def ot_deviation(source_u, target_u, epsilon: Optional[float], threshold: float, iterations: int):
    """d_i = -sum_j P_ij C_ij for each source row: P the entropic OT plan between the source rows and the target
    rows (uniform weights, ott-jax's Sinkhorn on the cosine cost scaled by its maximum), C the unscaled cosine cost
    1 - cos(u_i, u_j). Higher is better aligned with the target data."""
    geometry = pointcloud.PointCloud(source_u, target_u, cost_fn=costs.Cosine(), scale_cost="max_cost",
                                     epsilon=epsilon)
    solution = linear.solve(geometry, threshold=threshold, max_iterations=iterations)
    plan = geometry.transport_from_potentials(solution.f, solution.g)
    return -(plan * costs.Cosine().all_pairs(source_u, target_u)).sum(1)


def ot_stage(args: Args, source, target, obs_dim: int, act_dim: int, stage: str = "1/3") -> tuple[dict, dict]:
    """Stage `stage`: every source transition's deviation against the first seed's target subsample, from the cache or
    computed now chunk by chunk (saved about every minute, so an interrupted stage resumes) and cached."""
    target_u = transition_vectors(target)
    if args.ot_target_size is not None and args.ot_target_size < len(target_u):
        chosen = np.random.default_rng(args.seed).choice(len(target_u), args.ot_target_size, replace=False)
        target_u = target_u[np.sort(chosen)]
    info = {"kind": "ot", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "target_fingerprints": [fingerprint(dataset_arrays(target))], "obs_dim": obs_dim, "act_dim": act_dim,
            "chunk": args.ot_chunk, "target_transitions": len(target_u), "epsilon": args.ot_epsilon,
            "iterations": args.ot_iterations, "threshold": args.ot_threshold, "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "ot", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "ot", info)
    partial_path = path.with_name(path.stem + ".partial.msgpack")
    source_u = transition_vectors(source)
    deviation, done = np.zeros(len(source_u), np.float32), 0
    if partial_path.exists():
        try:
            saved = serialization.msgpack_restore(partial_path.read_bytes())
            deviation, done = np.array(saved["deviation"], np.float32), int(saved["step"])
            print(f"stage {stage}: ot: resuming at transition {done} ({partial_path})")
        except Exception:  # a truncated or overwritten partial file: the stage starts again
            set_aside(partial_path)
    solve = jax.jit(partial(ot_deviation, epsilon=args.ot_epsilon, threshold=args.ot_threshold,
                            iterations=args.ot_iterations))
    target_u, start, last_save, compiled = jax.device_put(target_u), time.perf_counter(), time.perf_counter(), {}
    progress = Progress(f"stage {stage}: ot {len(source_u)} source x {target_u.shape[0]} target", len(source_u),
                        done, unit="transition", name="ot")
    try:
        while done < len(source_u):
            chunk = source_u[done:done + args.ot_chunk]
            if len(chunk) not in compiled:  # compiled apart, so that the rate and ETA count the solves alone
                compiled[len(chunk)] = solve.lower(chunk, target_u).compile()
            chunk_start = time.perf_counter()
            deviation[done:done + len(chunk)] = np.asarray(progress.wait(compiled[len(chunk)](chunk, target_u),
                                                                         len(chunk)))
            done += len(chunk)
            progress.advance(len(chunk), time.perf_counter() - chunk_start)
            if time.perf_counter() - last_save > STAGE_SAVE_SECONDS and done < len(source_u):
                write_atomic(partial_path, serialization.msgpack_serialize({"deviation": deviation, "step": done}))
                last_save = time.perf_counter()
        progress.close()
    except KeyboardInterrupt:  # what was solved is saved, and the stage resumes there
        progress.close()
        if done:
            write_atomic(partial_path, serialization.msgpack_serialize({"deviation": deviation, "step": done}))
        raise stopped(f"in stage {stage} (ot) at transition {done:,} of {len(source_u):,}",
                      f"the deviations solved so far are saved in {partial_path}" if done else
                      "no chunk was solved yet") from None
    if not np.isfinite(deviation).all():
        raise SystemExit(f"stage {stage}: the OT deviation of {int((~np.isfinite(deviation)).sum())} source transitions "
                         f"is not finite; nothing is cached: try a larger --ot-epsilon.")
    info |= {"step": len(source_u), "steps": len(source_u), "finished": True, "source": args.source,
             "target": args.target, "source_dataset": source.name, "source_size": source.size,
             "target_size": target.size, "train_seconds": time.perf_counter() - start,
             "deviation": {"mean": float(deviation.mean()), "std": float(deviation.std()),
                           "min": float(deviation.min()), "max": float(deviation.max())}}
    return save_stage(path, partial_path, {"deviation": deviation[None]}, info)


# ---------------------------------------------------------------- stage 2: the target-behaviour CVAE
class CVAERunner(NamedTuple):
    state: TrainState
    rng: jax.Array


class CVAEData(NamedTuple):
    observations: jax.Array  # [N_t, obs_dim] target transitions
    actions: jax.Array  # [N_t, act_dim]


def cvae_loss(reconstruction, actions, mean, std, kl_weight):
    """mean (reconstruction - a)^2 + kl_weight * mean KL(N(mean, std^2) || N(0, 1)), both over batch and dims."""
    kl = -0.5 * (1.0 + jnp.log(std**2) - mean**2 - std**2).mean()
    return ((reconstruction - actions) ** 2).mean() + kl_weight * kl


def make_cvae_train(act_dim: int, latent_dim: int, hidden, lr: float, batch_size: int, kl_weight: float, obs_dim: int):
    """init(rng) -> CVAERunner and train(runner, data, num_steps) -> (runner, chunk metrics), for one seed."""
    cvae = CVAE(act_dim, latent_dim, tuple(hidden))

    def init(rng) -> CVAERunner:
        rng, key = jax.random.split(rng)
        params = cvae.init(key, jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)), jnp.zeros((1, latent_dim)))
        return CVAERunner(TrainState.create(apply_fn=cvae.apply, params=params, tx=optax.adam(lr)), rng)

    def step(runner: CVAERunner, data: CVAEData):
        rng, index_key, noise_key = jax.random.split(runner.rng, 3)
        rows = jax.random.randint(index_key, (batch_size,), 0, data.observations.shape[0])
        noise = jax.random.normal(noise_key, (batch_size, latent_dim))

        def loss_fn(params):
            reconstruction, mean, std = cvae.apply(params, data.observations[rows], data.actions[rows], noise)
            return cvae_loss(reconstruction, data.actions[rows], mean, std, kl_weight)

        loss, grads = jax.value_and_grad(loss_fn)(runner.state.params)
        return CVAERunner(runner.state.apply_gradients(grads=grads), rng), {"cvae_loss": loss}

    def train(runner: CVAERunner, data: CVAEData, num_steps: int):
        return scan_chunk(lambda r, _: step(r, data), runner, num_steps)

    return init, train


def cvae_stage(args: Args, target, obs_dim: int, act_dim: int, stage: str = "2/3") -> tuple[dict, dict]:
    """Stage `stage`: the CVAE of the first seed's target subsample, from the cache or trained now and cached."""
    info = {"kind": "cvae", "version": CACHE_VERSION, "target_fingerprints": [fingerprint(dataset_arrays(target))],
            "obs_dim": obs_dim, "act_dim": act_dim, "latent_dim": 2 * act_dim, "steps": args.cvae_steps,
            "batch_size": args.cvae_batch_size, "lr": args.cvae_lr, "hidden": list(args.cvae_hidden),
            "kl_weight": args.cvae_kl_weight, "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "cvae", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "cvae", info)
    init, train = make_cvae_train(act_dim, 2 * act_dim, args.cvae_hidden, args.cvae_lr, args.cvae_batch_size,
                                  args.cvae_kl_weight, obs_dim)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage {stage}: cvae {args.target}", path, runner, train, (0, 0),
        (jax.device_put(CVAEData(target.observations[None], target.actions[None])),), args.cvae_steps)
    info |= {"step": args.cvae_steps, "finished": True, "target": args.target, "target_size": target.size,
             "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, {"cvae": serialization.to_state_dict(jax.device_get(runner.state.params))},
                      info)


# ---------------------------------------------------------------- the filter (OTDF steps 2-4) and the constraint (5)
def normalise_deviation(deviation):
    """c = (d - max_batch d) / (max_batch d - min_batch d), in [-1, 0] (OTDF step 2); 0 for a constant batch."""
    low, high = deviation.min(), deviation.max()
    return jnp.where(high > low, (deviation - high) / jnp.where(high > low, high - low, 1.0), 0.0)


def keep_count(source_size: int, proportion: float) -> int:
    """The kept count int(B proportion) of OTDF step 3, on the host in float64 as the authors' Python computes it."""
    return int(source_size * proportion)


def keep_mask(score, keep_count):
    """1.0 on the keep_count samples with the highest score, 0.0 elsewhere: exactly keep_count ones (DVDF step 4).

    The rank of sample i is the number of samples with a higher score plus those with an equal score and a lower
    index (lax.top_k's tie rule); keep rank < keep_count. A mask instead of a gather keeps shapes static, so
    keep_count can be a traced (vmapped) value.
    """
    index = jnp.arange(score.shape[0])
    ahead = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (index[None, :] < index[:, None]))
    return (ahead.sum(1) < keep_count).astype(score.dtype)


def log_beta(cvae_apply, cvae_params, obs, action, noise, beta: float, importance_weighted: bool = False):
    """log beta(a | s) of the target-behaviour CVAE, per sample (OTDF step 5); noise: [B, K, latent] standard normal.

    z_k = mean + std noise_k with (mean, std) = q(z | s, a); log p(a | z_k) = sum over action dims of
    log N(a; decoder(s, z_k), beta / 4). The released code returns logsumexp_k log p(a | z_k); importance_weighted
    adds log p(z_k) - log q(z_k | s, a) inside and subtracts log K (a lower bound on log beta(a | s)).
    """
    mean, std = cvae_apply(cvae_params, obs, action, method=CVAE.encode)
    z = mean[:, None] + std[:, None] * noise
    samples = noise.shape[1]
    decoded = cvae_apply(cvae_params, jnp.repeat(obs[:, None], samples, 1), z, method=CVAE.decode)
    chex.assert_equal_shape([decoded, jnp.repeat(action[:, None], samples, 1)])

    def gaussian(x, loc, scale):
        return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)

    log_likelihood = gaussian(action[:, None], decoded, jnp.sqrt(beta / 4.0)).sum(-1)  # [B, K]
    if not importance_weighted:
        return jax.nn.logsumexp(log_likelihood, axis=1)
    log_prior = gaussian(z, 0.0, 1.0).sum(-1)
    log_posterior = gaussian(z, mean[:, None], std[:, None]).sum(-1)
    return jax.nn.logsumexp(log_likelihood + log_prior - log_posterior, axis=1) - jnp.log(samples)


def default_reg_weight(source: str, target: str) -> float:
    """OTDF's configs: 0.1 when the kinematic halfcheetah takes part, 0.5 for the other tasks and shifts."""
    return 0.1 if "halfcheetah-kinematic" in (source, target) else 0.5


# ---------------------------------------------------------------- IQL losses over kept source + target samples
def masked_mean(values, mask):
    """Mean of values over the samples where mask is 1: over the concatenation of kept source and target samples,
    exactly (a dropped sample adds nothing to the sum and is not counted)."""
    chex.assert_equal_shape([values, mask])
    return (values * mask).sum() / mask.sum()


def expectile_loss(diff, expectile):
    """Per-sample asymmetric squared error |expectile - 1[diff < 0]| * diff^2 (IQL eq. 5)."""
    return jnp.where(diff < 0, 1.0 - expectile, expectile) * diff**2


def value_loss(v, target_q, expectile, mask):
    """Unweighted IQL V loss on u = min(Q1', Q2')(s, a) - V(s) with the target critics; returns (loss, u)."""
    advantage = target_q - v
    return masked_mean(expectile_loss(advantage, expectile), mask), advantage


def weighted_critic_loss(q, target, weight, mask):
    """Sum over the two critics of the masked mean of weight_i (Q_k(s_i, a_i) - y_i)^2. q: [2, B]; the rest [B]."""
    per_sample = ((q - target) ** 2).sum(0)
    chex.assert_equal_shape([weight, per_sample])  # a [B, 1] weight would broadcast to [B, B] (IGDF's bug)
    return masked_mean(weight * per_sample, mask)


def advantage_weight(advantage, temperature, max_weight):
    """min(exp(temperature * A), max_weight) (IQL eq. 7), a constant for the actor."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(temperature * advantage), max_weight))


def summed_bc_loss(mean, actions, weight, mask):
    """OTDF's weighted behaviour cloning: masked mean over samples of weight * sum over action dims (tanh(mu) - a)^2."""
    per_sample = ((mean - actions) ** 2).sum(-1)
    chex.assert_equal_shape([weight, per_sample])
    return masked_mean(weight * per_sample, mask)


# ---------------------------------------------------------------- train state and data
class IQLState(NamedTuple):
    actor: TrainState
    critic: TrainState
    critic_target_params: Any
    value: TrainState


class Runner(NamedTuple):
    """One seed's whole training state; many seeds stack it along a leading axis."""
    state: IQLState
    rng: jax.Array


class Transitions(NamedTuple):
    observations: jax.Array  # [N, obs_dim]
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N]
    next_observations: jax.Array  # [N, obs_dim]
    terminals: jax.Array  # [N], 1.0 on true termination only (bootstrap through time limits)


class Data(NamedTuple):
    source: Transitions  # shared by every seed
    deviation: jax.Array  # [N_source] the stage-1 deviation d of each source transition
    source_groups: tuple  # per metadata key the dataset has: [N_source] int32 label of each transition
    target: Transitions  # one subsample per seed, stacked along a leading seed axis


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array
    keep_count: jax.Array  # int32, int(B proportion) computed on the host
    reg_weight: jax.Array


# ---------------------------------------------------------------- stage 3: filtered IQL with the dataset constraint
def make_train(args: Args, obs_dim: int, act_dim: int, cvae_hidden, latent_dim: int, groups: tuple = ()):
    """Returns init(rng) -> Runner and train(runner, data, cvae_params, hparams, num_steps) -> (runner, metrics).

    Pure functions of one seed; main() runs them as jax.jit(jax.vmap(...)) over seeds with the source, its
    deviations and the CVAE shared. metrics = (mean losses over the chunk, summed filter statistics over the chunk).
    """
    actor_net, critic_net, value_net = GaussianActor(act_dim, args.hidden), TwinCritic(args.hidden), ValueNet(
        args.hidden)
    cvae = CVAE(act_dim, latent_dim, tuple(cvae_hidden))
    source_size = args.batch_size // 2
    target_size = args.batch_size - source_size

    def init(rng) -> Runner:
        rng, actor_key, critic_key, value_key = jax.random.split(rng, 4)
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        critic_params = critic_net.init(critic_key, obs, action)
        state = IQLState(
            actor=TrainState.create(apply_fn=actor_net.apply, params=actor_net.init(actor_key, obs),
                                    tx=optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))),
            critic=TrainState.create(apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(args.lr)),
            critic_target_params=jax.tree.map(jnp.copy, critic_params),
            value=TrainState.create(apply_fn=value_net.apply, params=value_net.init(value_key, obs),
                                    tx=optax.adam(args.lr)),
        )
        return Runner(state, rng)

    def update(state: IQLState, source_batch: Transitions, deviation, target_batch: Transitions, labels: tuple,
               cvae_params, hparams: Hyperparams, key):
        """Filter the source batch by its deviation, then one IQL step on kept source + target (OTDF steps 2-5)."""
        c = normalise_deviation(deviation)
        keep = keep_mask(c, hparams.keep_count)
        mask = jnp.concatenate([keep, jnp.ones(target_size)])
        source_weight = jnp.exp(c) if args.deviation_weight else jnp.ones_like(c)
        q_weight = jnp.concatenate([keep * source_weight, jnp.ones(target_size)])
        batch = jax.tree.map(lambda s, t: jnp.concatenate([s, t]), source_batch, target_batch)

        # 1. value (unweighted): expectile regression towards the target critics' min (IQL eq. 5)
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return value_loss(value_net.apply(params, batch.observations), target_q, hparams.expectile, mask)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # 2. critics, weighted by exp(c) on kept source samples (OTDF step 4): y = r + discount (1 - d) V(s')
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return weighted_critic_loss(q, target, q_weight, mask), masked_mean(q.mean(0), mask)

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # 3. target critics
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, args.tau)

        # 4. actor: weighted BC minus reg_weight log beta(pi | s) of a sampled action (OTDF step 5)
        weight = advantage_weight(advantage, hparams.temperature, args.max_weight)
        action_key, latent_key = jax.random.split(key)
        action_noise = jax.random.normal(action_key, batch.actions.shape)
        latent_noise = jax.random.normal(latent_key, (batch.actions.shape[0], args.num_samples, latent_dim))

        def actor_loss_fn(params):
            mu, log_std = actor_net.apply(params, batch.observations)
            bc = summed_bc_loss(jnp.tanh(mu), batch.actions, weight, mask)
            if not args.dataset_constraint:
                return bc, (bc, jnp.zeros(()))
            sampled = jnp.tanh(mu + jnp.exp(log_std) * action_noise)  # reparameterised, as torch's rsample
            constraint = masked_mean(log_beta(cvae.apply, jax.lax.stop_gradient(cvae_params), batch.observations,
                                              sampled, latent_noise, args.beta, args.log_beta == "iwae"), mask)
            return bc - hparams.reg_weight * constraint, (bc, constraint)

        (actor_loss, (bc, constraint)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        losses = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": actor_loss, "bc_loss": bc,
                  "log_beta": constraint, "advantage_mean": masked_mean(advantage, mask), "q_mean": q_mean,
                  "weight_mean": masked_mean(weight, mask)}
        sums = filter_sums(keep, c, None, c, q_weight[:source_size], groups, labels)
        return IQLState(actor, critic, critic_target_params, value), losses, sums

    def train(runner: Runner, data: Data, cvae_params, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; losses are their means, filter statistics their sums."""

        def step(runner: Runner, _):
            rng, source_key, target_key, update_key = jax.random.split(runner.rng, 4)
            source_indices = jax.random.randint(source_key, (source_size,), 0, data.source.rewards.shape[0])
            target_indices = jax.random.randint(target_key, (target_size,), 0, data.target.rewards.shape[0])
            source_batch = jax.tree.map(lambda x: x[source_indices], data.source)
            target_batch = jax.tree.map(lambda x: x[target_indices], data.target)
            labels = tuple(label[source_indices] for label in data.source_groups)
            state, losses, sums = update(runner.state, source_batch, data.deviation[source_indices], target_batch,
                                         labels, cvae_params, hparams, update_key)
            return Runner(state, rng), (losses, sums)

        runner, (losses, sums) = scan_chunk(step, runner, num_steps, means=False)
        return runner, (jax.tree.map(lambda total: total / num_steps, losses), sums)

    return init, train


def make_policy(args: Args, act_dim: int):
    """The deterministic evaluation action tanh(mu(s)), for one seed's actor parameters."""
    actor_net = GaussianActor(act_dim, args.hidden)

    def policy(actor_params, obs):
        return jnp.tanh(actor_net.apply(actor_params, obs)[0])

    return policy


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    need(0.0 < args.proportion <= 1.0 and keep_count(args.batch_size // 2, args.proportion) >= 1,
         f"--proportion must be in (0, 1] and keep at least one of {args.batch_size // 2} source samples, got "
         f"{args.proportion}.")


def to_transitions(dataset) -> Transitions:
    return Transitions(observations=dataset.observations, actions=dataset.actions, rewards=dataset.rewards,
                       next_observations=dataset.next_observations, terminals=dataset.terminals)


def report(step: int, entry: dict, metrics) -> tuple[str, str]:
    losses = metrics[0]
    return f"score={entry['score_mean']:.1f}", (
        f"step {step}: score {entry['score_mean']:.1f} +- {entry['score_std']:.1f}, return "
        f"{entry['return_mean']:.1f}, critic loss {float(np.mean(losses['critic_loss'])):.3g}, log beta "
        f"{float(np.mean(losses['log_beta'])):.3g}")


# ---------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, "otdf"))
    start_block(args, argv, out, [("ot", None), ("cvae", args.cvae_steps), ("otdf", args.steps, args.num_seeds)], saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = target_full.obs_dim, target_full.act_dim
    domain_info(args.target)  # exits with one sentence on an unknown domain before the stages run

    # stages 1 and 2: frozen, shared by every seed
    start = time.perf_counter()
    ot_params, ot_info = ot_stage(args, source, targets[0], obs_dim, act_dim)
    cvae_params, cvae_info = cvae_stage(args, targets[0], obs_dim, act_dim)
    stage_seconds = time.perf_counter() - start

    groups = episode_groups(source)
    group_names = {key: names for key, (names, _) in groups.items()}
    data = jax.device_put(Data(
        source=to_transitions(source), deviation=np.asarray(ot_params["deviation"], np.float32),
        source_groups=tuple(labels for _, labels in groups.values()),
        target=Transitions(*(np.stack(fields) for fields in zip(*(to_transitions(t) for t in targets))))))
    reg_weight = args.reg_weight if args.reg_weight is not None else default_reg_weight(args.source, args.target)
    hparams = Hyperparams(expectile=jnp.full(len(seeds), args.expectile, jnp.float32),
                          temperature=jnp.full(len(seeds), args.temperature, jnp.float32),
                          keep_count=jnp.full(len(seeds), keep_count(args.batch_size // 2, args.proportion), jnp.int32),
                          reg_weight=jnp.full(len(seeds), reg_weight, jnp.float32))
    init, train = make_train(args, obs_dim, act_dim, cvae_info["hidden"], cvae_info["latent_dim"],
                             tuple((key, len(names)) for key, names in group_names.items()))
    policy, ref_scores = make_policy(args, act_dim), (references["random"], references["expert"])

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        result = evaluate(policy, runner.state.actor.params, args.target, num_episodes=args.eval_episodes,
                          seed=args.seed + step, ref_scores=ref_scores, physics=args.physics)
        chunk_steps = step - (step - 1) // args.eval_every * args.eval_every  # an evaluation ends every chunk
        return evaluation_entry(step, result, metrics[0]) | {
            "filter": filter_diagnostics(metrics[1], group_names, chunk_steps, args.batch_size // 2)}

    data_info = {"source_dataset": source.name, "source_size": source.size, "target_dataset": target_full.name,
                 "target_full_size": target_full.size, "target_size": targets[0].size, "source_groups": group_names,
                 "ref_min_score": ref_scores[0], "ref_max_score": ref_scores[1], "references": references["source"]}
    results = train_loop(
        args, out, saved, algo="otdf", title=f"stage 3/3: otdf {args.target} x{len(seeds)}", init=init,
        keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train,
        inputs=(data, cvae_params["cvae"], hparams), in_axes=(Data(None, None, None, 0), None, 0),
        evaluate=evaluate_chunk, report=report, losses_of=lambda metrics: metrics[0],
        header={"data": data_info, "reg_weight": reg_weight, "keep_count": keep_count(args.batch_size // 2,
                                                                                      args.proportion),
                "stages": {"ot": ot_info, "cvae": cvae_info}}, timing={"stage_seconds": stage_seconds})
    final = results["final"] or {}
    print(f"otdf {datasets_line(args)}, seeds {seeds}: final score {final.get('score_mean', float('nan')):.1f} +- "
          f"{final.get('score_std', float('nan')):.1f} after {results['step']} steps; results in {out}")
    return results


if __name__ == "__main__":
    main()
