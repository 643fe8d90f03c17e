"""V2A-OTDF: V2A's modality-aware filter with OTDF's optimal-transport deviation as the dynamics score.

"Unifying Value Alignment and Assignment in Cross-Domain Offline Reinforcement Learning with Heterogeneous
Datasets" (V2A, ICML 2026), its OT variant: algos/v2a.py with OTDF's deviation and dataset constraint (Lyu et al.,
"Cross-Domain Offline Policy Adaptation with Optimal Transport and Dataset Constraint", ICLR 2025) in place of IGDF's
scorer, as algos/dvdf_otdf.py is dvdf.py's; `v2a.py --dynamics-score ot` runs this file.

    python algos/v2a_otdf.py --source-dataset <heterogeneous source.hdf5> --source halfcheetah-morph \
        --target halfcheetah
    python algos/v2a_otdf.py ... --lam 0.4 0.6 1 --xi 0.3 0.5    # a lam x xi x seed grid in one program

The method, in V2A's numbering (v2a.py's docstring gives each step's settings):
    1. Temporally-consistent modality representation (stage 1/5, then the relabelling): v2a.py's GRU encoder q(z |
       trajectory) with its delta-state decoders; each source trajectory gets one z, the encoder mean.
    2. Modality-aware advantage (stage 2/5): SQL's critics Q1, Q2(s, a, z) and value V(s, z);
       A(s, a, z) = min(Q1, Q2)(s, a, z) - V(s, z) with the online critics.
    3. Filtering and learning (stage 5/5): h = c, OTDF's batch-normalised deviation c = (d - max_batch d) /
       (max_batch d - min_batch d) in [-1, 0] of the frozen OT deviations d (stage 3/5, algos/otdf.py's, cached);
       g = lam c + (1 - lam) Norm(A(s, a, z)); keep the top int(B xi) source samples; IQL on kept source + target
       with Q-loss weights exp(c) (`--weighting g_indicator`: g) on kept source samples and 1 on target; the actor
       subtracts reg_weight * log beta(pi(s) | s) of OTDF's target-behaviour CVAE (stage 4/5) at tanh(mu(s));
       --no-dataset-constraint drops it (neither paper says whether V2A-OTDF keeps it; 4 stages then). lam 0.6,
       xi 0.5. The final Q, V and policy do not take z.
Stages 1-4 are trained once with --seed, shared by every run, and cached under --cache-dir (envs/run.py) with
v2a.py's and otdf.py's keys, so the three scripts share them.

Outputs in --out (default runs/v2a-otdf/<source>_to_<target>-<quality>/lam<lams>_xi<xis>/seed<seed>,
envs.run.default_out), as envs/run.py describes, and z_projection.png (a PCA of the trajectories' z, coloured by
domain); results.json adds v2a.py's keys (the grid, the settings, the stages, "representation", the filter's
diagnostics per evaluation) and reg_weight.
"""
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Optional

# `python algos/v2a_otdf.py` puts algos/ on the path, not the repository root that holds envs/.
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
from tqdm import tqdm

from envs import reference_info
from envs.diagnostics import describe_representation, episode_groups, filter_diagnostics, filter_sums
from envs.run import (CrossDomainArgs, Progress, STAGE_SAVE_SECONDS, cached_stage, check_common_flags, dataset_arrays,
                      datasets_line, default_out, fingerprint, grid_level, load_source_target, need, open_run,
                      run_stage, save_stage, scan_chunk, set_aside, settings_line, stage_path, start_block, stopped,
                      train_grid, value_bound_of, write_atomic)


@dataclass
class Args(CrossDomainArgs):
    # envs.run.CrossDomainArgs' flags come first (experiment, data, training and evaluation: --seed to --eval-episodes)
    cache_dir: str = "runs/cache"
    """where the pre-training stages are cached, keyed by everything they depend on"""
    # --- optimisation ---
    batch_size: int = 256
    """source + target transitions drawn per step, half each (the authors' 128 + 128); the filter keeps
    int(batch_size / 2 * xi) of the source half"""
    lr: float = 3e-4
    """Adam learning rate of every network (all stages included); the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every MLP (IQL, SQL with z, the delta-state decoders)"""
    # --- IQL ---
    discount: float = 0.99
    """discount of IQL and of the SQL-with-z stage"""
    tau: float = 0.005
    """Polyak rate of the target critics (IQL and the SQL-with-z stage)"""
    expectile: float = 0.7
    """expectile of the value loss, in (0, 1)"""
    temperature: float = 3.0
    """inverse temperature of the actor's advantage weights exp(temperature * A)"""
    max_weight: float = 100.0
    """clip of the actor's advantage weights"""
    actor: Literal["deterministic", "gaussian"] = "deterministic"
    """weighted squared error on tanh(mu(s)) (authors), or weighted Gaussian log-likelihood (original IQL)"""
    # --- the filter ---
    lam: tuple[float, ...] = (0.6,)
    """weight of the dynamics score in g = lam c + (1 - lam) Norm(A(s, a, z)), in [0, 1]; several values run as
    one grid"""
    xi: tuple[float, ...] = (0.5,)
    """fraction of each source batch kept (the top by g), in (0, 1]; several values run as one grid"""
    weighting: Literal["exp_h", "g_indicator"] = "exp_h"
    """Q-loss weight of a kept source sample: exp(c) (the authors' exp(h)) or g (the paper's indicator times g),
    clamped at 100"""
    # --- stage 1: the trajectory encoder ---
    encoder_steps: int = 100_000
    """gradient steps of the encoder (each an encoder step and a decoder step on the same batch)"""
    encoder_batch_size: int = 16
    """trajectories per encoder step, one window of each"""
    window: int = 200
    """steps of a training window at most"""
    gru_hidden: int = 256
    """hidden units of the encoder's GRU"""
    z_dim: int = 128
    """size of the trajectory representation z"""
    ensemble_size: int = 3
    """delta-state decoders in the ensemble"""
    kl_weight: float = 1e-3
    """weight of KL(q(z | trajectory) || N(0, I)) against the reconstruction MSE"""
    grad_clip: float = 10.0
    """global gradient-norm clip of the encoder and the decoders"""
    relabel_window: Optional[int] = None
    """encode each whole trajectory in one pass (default), or average the encoder means of its consecutive windows
    of this many steps (weighted by their lengths)"""
    probe_fraction: float = 0.3
    """fraction of each domain's (quality's) trajectories held out of the probe's fit to measure its accuracy, in
    (0, 0.5]"""
    # --- stage 2: SQL with z on the source dataset ---
    sqlz_steps: int = 5_000
    """gradient steps of SQL with z"""
    sqlz_batch_size: int = 256
    """source transitions per SQL step"""
    alpha: float = 0.2
    """SQL's regularisation strength"""
    sql_layer_norm: bool = True
    """LayerNorm after every hidden layer of SQL's critics and value (--no-sql-layer-norm: the authors' networks)"""
    sql_reward_scaling: bool = True
    """SQL on source rewards x 1000 / (max - min episode return) (IQL's and IVR's normalisation);
    --no-sql-reward-scaling: the authors' raw rewards"""
    sqlz_target_every: int = 2
    """gradient steps between two Polyak updates of SQL's target critics"""
    # --- stages 3 and 4: the dynamics score from optimal transport and the dataset constraint (algos/otdf.py's) ---
    dataset_constraint: bool = True
    """OTDF's actor regulariser -reg_weight log beta(pi(s) | s) (--no-dataset-constraint: the filter alone)"""
    reg_weight: Optional[float] = None
    """weight of the dataset constraint; default 0.1 when a domain is halfcheetah-kinematic, else 0.5 (OTDF)"""
    log_beta: Literal["released", "iwae"] = "released"
    """log beta(pi | s): OTDF's released logsumexp of decoder log-likelihoods, or the importance-weighted bound"""
    beta: float = 0.4
    """the decoder's variance is beta / 4 in log beta"""
    num_samples: int = 10
    """latent samples z of log beta"""
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
    cvae_steps: int = 10_000
    """gradient steps of the target-behaviour CVAE"""
    cvae_batch_size: int = 128
    """target transitions per CVAE step"""
    cvae_hidden: tuple[int, ...] = (750, 750)
    """hidden layer widths of the CVAE's encoder and decoder"""
    cvae_lr: float = 1e-3
    """Adam learning rate of the CVAE"""
    cvae_kl_weight: float = 0.5
    """weight of the KL term in the CVAE loss"""



LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's log-std bounds, and V2A's bounds of the encoder's log-std
CVAE_LOG_STD_MIN, CVAE_LOG_STD_MAX = -4.0, 15.0  # the CVAE encoder's log-std bounds (BCQ's, as OTDF's)
CACHE_VERSION = 1  # part of every stage's cache key: bump it when a stage's computation changes
FILTER_WEIGHT_MAX = 100.0  # V2A clamps the Q-loss weights of kept source samples (exp(h) <= e: a safeguard)
RELABEL_CHUNK = 256  # trajectories (or windows) encoded per call when relabelling


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


class Actor(nn.Module):
    """obs -> (tanh(mu(s)), log_std): log_std is one learned vector for the Gaussian actor, None otherwise."""
    act_dim: int
    hidden: tuple[int, ...]
    gaussian: bool = False

    @nn.compact
    def __call__(self, obs):
        mean = jnp.tanh(MLP(self.hidden, self.act_dim)(obs))
        if not self.gaussian:
            return mean, None
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class GRUWeights(nn.Module):
    """The parameters of flax's GRUCell under its names (ir, iz, in with biases; hr, hz without; hn with), created by
    its initialisers in its order, so that an encoder saved by flax's GRUCell loads here and the same key gives the same
    values. Returned fused: the input kernels [F, 3H] and biases [3H] (gates r, z, n), the hidden ones [H, 3H], [3H]."""
    hidden: int

    @nn.compact
    def __call__(self, features: int):
        def weights(name, fan_in, init, bias):
            return GateWeights((fan_in, self.hidden), init, bias, name=name)()

        lecun, orthogonal = nn.initializers.lecun_normal(), nn.initializers.orthogonal()
        ir, iz = weights("ir", features, lecun, True), weights("iz", features, lecun, True)
        hr, hz = weights("hr", self.hidden, orthogonal, False), weights("hz", self.hidden, orthogonal, False)
        inn, hn = weights("in", features, lecun, True), weights("hn", self.hidden, orthogonal, True)
        fuse = lambda *pairs, at: jnp.concatenate([pair[at] for pair in pairs], axis=-1)
        return fuse(ir, iz, inn, at=0), fuse(ir, iz, inn, at=1), fuse(hr, hz, hn, at=0), fuse(hr, hz, hn, at=1)


class GateWeights(nn.Module):
    """One Dense layer's kernel [in, out] and bias [out] (zeros, and no parameter, when use_bias is False)."""
    shape: tuple[int, int]
    kernel_init: Callable
    use_bias: bool

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", self.kernel_init, self.shape)
        bias = self.param("bias", nn.initializers.zeros_init(), self.shape[1:]) if self.use_bias else \
            jnp.zeros(self.shape[1:], kernel.dtype)
        return kernel, bias


class MaskedGRU(nn.Module):
    """flax's GRUCell run over a window [B, T, F] with a mask [B, T]: where the mask is 0 (padding) the carried state
    passes through unchanged; the state after the last step is returned. The input projections of all T steps are one
    matmul before the scan, and each step's three hidden projections are one [H, 3H] matmul."""
    hidden: int

    @nn.compact
    def __call__(self, steps, mask):
        input_kernel, input_bias, hidden_kernel, hidden_bias = GRUWeights(self.hidden, name="cell")(steps.shape[-1])
        inputs = jnp.swapaxes(steps @ input_kernel + input_bias, 0, 1)  # [T, B, 3H]

        def step(h, inputs_and_valid):
            x, valid = inputs_and_valid
            x_r, x_z, x_n = jnp.split(x, 3, axis=-1)
            h_r, h_z, h_n = jnp.split(h @ hidden_kernel + hidden_bias, 3, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + r * h_n)
            return jnp.where(valid[:, None] > 0, (1.0 - z) * n + z * h, h), None

        start = jnp.zeros((steps.shape[0], self.hidden), steps.dtype)
        return jax.lax.scan(step, start, (inputs, jnp.swapaxes(mask, 0, 1)))[0]


class MaskedGRUCellStep(nn.Module):
    """flax's GRUCell for one time step of a batch; where valid is 0 (padding) the carried state passes through."""
    hidden: int

    @nn.compact
    def __call__(self, carry, inputs):
        step, valid = inputs  # [B, F], [B]
        new_carry, _ = nn.GRUCell(self.hidden, name="cell")(carry, step)
        return jnp.where(valid[:, None] > 0, new_carry, carry), None


class TrajectoryEncoder(nn.Module):
    """q(z | window): a GRU over the steps [s, a, s' - s]; its state after the last valid step (padded steps do not
    update it) feeds linear heads for the mean and the log-std (clamped) of z. steps [B, T, F], mask [B, T].

    fused: MaskedGRU (one matmul for the window's input projections, one per step for the hidden ones: fewer kernels,
    for accelerators) or flax's GRUCell stepped by nn.scan (faster on a CPU, whose XLA runs it 20-30% quicker:
    benchmarks/results/speed_step.md); None picks the fused one except on a CPU. Both hold the same parameters."""
    gru_hidden: int
    z_dim: int
    fused: Optional[bool] = None

    @nn.compact
    def __call__(self, steps, mask):
        if self.fused if self.fused is not None else jax.default_backend() != "cpu":
            last = MaskedGRU(self.gru_hidden, name="gru")(steps, mask)
        else:
            gru = nn.scan(MaskedGRUCellStep, variable_broadcast="params", split_rngs={"params": False}, in_axes=1)
            last, _ = gru(self.gru_hidden, name="gru")(jnp.zeros((steps.shape[0], self.gru_hidden), steps.dtype),
                                                       (steps, mask))
        mean = nn.Dense(self.z_dim, name="mean")(last)
        log_std = jnp.clip(nn.Dense(self.z_dim, name="log_std")(last), LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std


class DeltaDecoder(nn.Module):
    """An ensemble of MLPs on [s, a, z] predicting s' - s, evaluated as one batched network: [ensemble, ..., obs]."""
    hidden: tuple[int, ...]
    obs_dim: int
    ensemble_size: int

    @nn.compact
    def __call__(self, obs, actions, z):
        ensemble = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.ensemble_size)
        return ensemble(self.hidden, self.obs_dim)(jnp.concatenate([obs, actions, z], axis=-1))


# ---------------------------------------------------------------- train state and data
class IQLState(NamedTuple):
    actor: TrainState
    critic: TrainState
    critic_target_params: Any
    value: TrainState


class Runner(NamedTuple):
    """One run's whole training state; the runs of the grid stack it along a leading axis."""
    state: IQLState
    rng: jax.Array


class Transitions(NamedTuple):
    observations: jax.Array  # [N, obs_dim]
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N]
    next_observations: jax.Array  # [N, obs_dim]
    terminals: jax.Array  # [N], 1.0 on true termination only (bootstrap through time limits)


class Data(NamedTuple):
    source: Transitions  # shared by every run
    source_trajectory: jax.Array  # [N_source] int32: which trajectory each source transition belongs to
    trajectory_z: jax.Array  # [E, z_dim]: the representation of each source trajectory (the encoder mean)
    source_groups: tuple  # per metadata key the dataset has: [N_source] int32 label of each transition
    target: Transitions  # one subsample per seed, stacked along a leading seed axis; runs index it by seed_index
    deviation: jax.Array  # [N_source] OT deviation d of each source transition (stage 3)


class Frozen(NamedTuple):
    """The pre-trained stages, shared by every run and never trained here."""
    sql_critic: Any  # Q1, Q2(s, a, z)
    sql_value: Any  # V(s, z)
    cvae: Any  # the target-behaviour CVAE of the dataset constraint; None without it


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array
    lam: jax.Array  # float32
    keep_count: jax.Array  # int32, int(B xi) computed on the host
    seed_index: jax.Array  # int32, which seed's target subsample the run trains on


# ---------------------------------------------------------------- the filter (V2A step 3: DVDF's steps 2-6)
def normalise_advantage(advantage):
    """Norm(A) = (A - min_batch A) / (max_batch A - min_batch A + 1e-8), in [0, 1) (DVDF step 2)."""
    low, high = advantage.min(), advantage.max()
    return (advantage - low) / (high - low + 1e-8)


def filter_score(dynamics_score, advantage, lam):
    """g = lam h + (1 - lam) Norm(A) (DVDF step 3): lam = 1 ranks by the dynamics score alone (IGDF), lam = 0 by A."""
    return lam * dynamics_score + (1.0 - lam) * normalise_advantage(advantage)


def keep_count(source_size: int, xi: float) -> int:
    """The kept count int(B xi) of DVDF step 4, on the host in float64 as the authors' Python computes it."""
    return int(source_size * xi)


def keep_mask(score, keep_count):
    """1.0 on the keep_count samples with the highest score, 0.0 elsewhere: exactly keep_count ones (DVDF step 4).

    The rank of sample i is the number of samples with a higher score plus those with an equal score and a lower
    index (lax.top_k's tie rule); keep rank < keep_count. A mask instead of a gather keeps shapes static, so
    keep_count can be a traced (vmapped) value.
    """
    index = jnp.arange(score.shape[0])
    ahead = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (index[None, :] < index[:, None]))
    return (ahead.sum(1) < keep_count).astype(score.dtype)


def q_weights(dynamics_score, score, keep, target_size: int, weighting: str):
    """Per-sample Q-loss weights of [source batch, target batch]: exp(h) (or g) clamped at 100 on kept source
    samples (V2A step 3; DVDF steps 5-6), 0 on dropped ones (masked out anyway), 1 on target samples."""
    source_weight = jnp.minimum(jnp.exp(dynamics_score) if weighting == "exp_h" else score, FILTER_WEIGHT_MAX)
    return jnp.concatenate([keep * source_weight, jnp.ones(target_size, keep.dtype)])


# ---------------------------------------------------------------- IQL losses over kept source + target samples
def normalise_deviation(deviation):
    """c = (d - max_batch d) / (max_batch d - min_batch d), in [-1, 0] (OTDF step 2); 0 for a constant batch."""
    low, high = deviation.min(), deviation.max()
    return jnp.where(high > low, (deviation - high) / jnp.where(high > low, high - low, 1.0), 0.0)


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


def deterministic_actor_loss(mean, actions, weight, mask):
    """Weighted behaviour cloning: masked mean over samples, mean over action dims, of weight (tanh(mu(s)) - a)^2."""
    per_sample = ((mean - actions) ** 2).mean(-1)
    chex.assert_equal_shape([weight, per_sample])
    return masked_mean(weight * per_sample, mask)


def gaussian_actor_loss(mean, log_std, actions, weight, mask):
    """Weighted negative log-likelihood of a under N(tanh(mu(s)), exp(log_std)^2), summed over action dims."""
    log_prob = (-0.5 * ((actions - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    chex.assert_equal_shape([weight, log_prob])
    return -masked_mean(weight * log_prob, mask)


# ---------------------------------------------------------------- stage 5: filtered IQL
def make_train(args: Args, obs_dim: int, act_dim: int, sql_hidden, groups: tuple = (), sql_layer_norm: bool = False,
               cvae_hidden=(), reg_weight: float = 0.0):
    """Returns init(rng) -> Runner and train(runner, data, frozen, hparams, num_steps) -> (runner, metrics).

    dvdf.py's make_train with the modality-aware advantage A(s, a, z): each source sample brings its trajectory's
    z to the frozen SQL-with-z critics and value; the IQL networks do not see z. Pure functions of one run, run as
    jax.jit(jax.vmap(...)) over the (lam, xi, seed) grid. metrics = (mean losses, summed filter statistics).
    h is the batch-normalised data.deviation; with the dataset constraint the actor loss uses frozen.cvae.
    """
    constrained = args.dataset_constraint
    cvae = CVAE(act_dim, 2 * act_dim, tuple(cvae_hidden)) if constrained else None
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden), ValueNet(args.hidden)
    _, _, modality_advantage = make_sqlz_losses(tuple(sql_hidden), args.discount, sql_layer_norm)
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

    def filter_source(source_batch: Transitions, z, deviation, frozen: Frozen, hparams: Hyperparams):
        """h, A(s, a, z), g and the keep mask of one source batch (V2A step 3: DVDF steps 2-4 with A(s, a, z));
        the frozen stages get no gradient; h is the batch-normalised OT deviation c (OTDF step 2)."""
        frozen = jax.lax.stop_gradient(frozen)
        obs, actions = source_batch.observations, source_batch.actions
        h = normalise_deviation(deviation)
        advantage = modality_advantage(frozen.sql_critic, frozen.sql_value, obs, actions, z)  # online critics
        score = filter_score(h, advantage, hparams.lam)
        return h, advantage, score, keep_mask(score, hparams.keep_count)

    def update(state: IQLState, source_batch: Transitions, source_z, deviation, target_batch: Transitions,
               labels: tuple, frozen: Frozen, hparams: Hyperparams, key):
        """Filter the source batch, then one IQL step on kept source + target (no z from here on)."""
        h, sql_advantage, score, keep = filter_source(source_batch, source_z, deviation, frozen, hparams)
        mask = jnp.concatenate([keep, jnp.ones(target_size)])
        q_weight = q_weights(h, score, keep, target_size, args.weighting)
        batch = jax.tree.map(lambda s, t: jnp.concatenate([s, t]), source_batch, target_batch)

        # 1. value (unweighted): expectile regression towards the target critics' min (IQL eq. 5)
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return value_loss(value_net.apply(params, batch.observations), target_q, hparams.expectile, mask)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # 2. critics, weighted (DVDF step 5): y = r + discount (1 - d) V(s') with the value just updated (IQL eq. 6)
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return weighted_critic_loss(q, target, q_weight, mask), masked_mean(q.mean(0), mask)

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # 3. target critics
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, args.tau)

        # 4. actor (no filter weight): advantage-weighted regression with the advantage of step 1 (IQL eq. 7)
        weight = advantage_weight(advantage, hparams.temperature, args.max_weight)

        def actor_loss_fn(params):
            mean, log_std = actor_net.apply(params, batch.observations)
            if args.actor == "gaussian":
                loss = gaussian_actor_loss(mean, log_std, batch.actions, weight, mask)
            else:
                loss = deterministic_actor_loss(mean, batch.actions, weight, mask)
            if not constrained:
                return loss, jnp.zeros(())
            # OTDF's dataset constraint at the deterministic action (OTDF step 5)
            noise = jax.random.normal(key, (mean.shape[0], args.num_samples, 2 * act_dim))
            constraint = masked_mean(log_beta(cvae.apply, frozen.cvae, batch.observations, mean, noise, args.beta,
                                              args.log_beta == "iwae"), mask)
            return loss - reg_weight * constraint, constraint

        (actor_loss, constraint), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        losses = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": actor_loss,
                  "advantage_mean": masked_mean(advantage, mask), "q_mean": q_mean,
                  "weight_mean": masked_mean(weight, mask)} | ({"log_beta": constraint} if constrained else {})
        sums = filter_sums(keep, h, sql_advantage, score, q_weight[:source_size], groups, labels)
        return IQLState(actor, critic, critic_target_params, value), losses, sums

    def train(runner: Runner, data: Data, frozen: Frozen, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; losses are their means, filter statistics their sums."""

        def step(runner: Runner, _):
            rng, batch_key = jax.random.split(runner.rng)
            source_key, target_key = jax.random.split(batch_key)
            source_indices = jax.random.randint(source_key, (source_size,), 0, data.source.rewards.shape[0])
            target_indices = jax.random.randint(target_key, (target_size,), 0, data.target.rewards.shape[1])
            source_batch = jax.tree.map(lambda x: x[source_indices], data.source)
            source_z = data.trajectory_z[data.source_trajectory[source_indices]]
            target_batch = jax.tree.map(lambda x: x[hparams.seed_index, target_indices], data.target)
            labels = tuple(label[source_indices] for label in data.source_groups)
            # the constraint's latent noise from a key of its own: v2a.py's runs draw what they always drew
            state, losses, sums = update(runner.state, source_batch, source_z, data.deviation[source_indices],
                                         target_batch, labels, frozen, hparams, jax.random.fold_in(batch_key, 1))
            return Runner(state, rng), (losses, sums)

        runner, (losses, sums) = scan_chunk(step, runner, num_steps, means=False)
        return runner, (jax.tree.map(lambda total: total / num_steps, losses), sums)

    return init, train


def make_policy(args: Args, act_dim: int):
    """The deterministic evaluation action tanh(mu(s)), for one run's actor parameters."""
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")

    def policy(actor_params, obs):
        return actor_net.apply(actor_params, obs)[0]

    return policy


# ---------------------------------------------------------------- stage 1: the trajectory encoder (V2A step 1)
class EncoderState(NamedTuple):
    encoder: TrainState
    decoder: TrainState


class EncoderRunner(NamedTuple):
    state: EncoderState
    rng: jax.Array


class EncoderData(NamedTuple):
    steps: jax.Array  # [N, 2 obs_dim + act_dim]: [s, a, s' - s] of every source transition, in dataset order
    starts: jax.Array  # [E] int32: index of each trajectory's first transition
    lengths: jax.Array  # [E] int32: its number of transitions


def gaussian_kl(mean, log_std):
    """KL(N(mean, exp(log_std)^2) || N(0, I)) per row, summed over the last axis."""
    return 0.5 * (jnp.exp(2.0 * log_std) + mean**2 - 1.0 - 2.0 * log_std).sum(-1)


def encoder_decoder_loss(prediction, delta, mask, mean, log_std, kl_weight):
    """Reconstruction MSE + kl_weight KL(q || N(0, I)); returns (loss, (reconstruction, kl)).

    prediction: [K, B, T, D] of the K decoders; delta: [B, T, D] the true s' - s; mask: [B, T], 1 on valid steps.
    The squared error is a mean over decoders and state dims, then a mean over the valid steps of the batch (padded
    steps add nothing and are not counted); the KL is summed over z dims and averaged over the B windows.
    """
    per_step = ((prediction - delta) ** 2).mean(axis=(0, -1))
    reconstruction = masked_mean(per_step, mask)
    kl = gaussian_kl(mean, log_std).mean()
    return reconstruction + kl_weight * kl, (reconstruction, kl)


def make_window_loss(gru_hidden, z_dim, hidden, ensemble_size, kl_weight, obs_dim, act_dim):
    """loss(encoder_params, decoder_params, steps [B, T, F], mask [B, T], noise [B, z_dim] or None) ->
    (loss, (reconstruction, kl)); z = mean + std * noise (reparameterisation), or the mean when noise is None."""
    encoder_net, decoder_net = TrajectoryEncoder(gru_hidden, z_dim), DeltaDecoder(hidden, obs_dim, ensemble_size)

    def loss(encoder_params, decoder_params, steps, mask, noise):
        mean, log_std = encoder_net.apply(encoder_params, steps, mask)
        z = mean if noise is None else mean + jnp.exp(log_std) * noise
        obs, actions = steps[..., :obs_dim], steps[..., obs_dim:obs_dim + act_dim]
        delta = steps[..., obs_dim + act_dim:]
        z_per_step = jnp.broadcast_to(z[:, None, :], (*steps.shape[:2], z_dim))  # one z for the whole window
        prediction = decoder_net.apply(decoder_params, obs, actions, z_per_step)
        return encoder_decoder_loss(prediction, delta, mask, mean, log_std, kl_weight)

    return loss


def sample_windows(key, data: EncoderData, batch_size: int, window: int):
    """batch_size trajectories drawn uniformly, and from each min(length, window) consecutive steps at a uniform
    random start: (steps [B, window, F], mask [B, window]); padded steps are zeros with mask 0."""
    trajectory_key, start_key = jax.random.split(key)
    trajectory = jax.random.randint(trajectory_key, (batch_size,), 0, data.starts.shape[0])
    length = data.lengths[trajectory]
    valid_length = jnp.minimum(length, window)
    offset = jax.random.randint(start_key, (batch_size,), 0, length - valid_length + 1)
    position = jnp.arange(window)
    mask = position[None, :] < valid_length[:, None]
    index = jnp.where(mask, data.starts[trajectory][:, None] + offset[:, None] + position[None, :], 0)
    return jnp.where(mask[..., None], data.steps[index], 0.0), mask.astype(data.steps.dtype)


def make_encoder_train(gru_hidden, z_dim, hidden, ensemble_size, kl_weight, lr, grad_clip, batch_size, window,
                       obs_dim, act_dim):
    """init(rng) -> EncoderRunner and train(runner, data, num_steps) -> (runner, chunk metrics), for one seed.

    One step: an encoder step with the decoders frozen (z by reparameterisation), then a decoder step on the same
    batch with the just-updated encoder frozen and z = its mean.
    """
    encoder_net, decoder_net = TrajectoryEncoder(gru_hidden, z_dim), DeltaDecoder(hidden, obs_dim, ensemble_size)
    window_loss = make_window_loss(gru_hidden, z_dim, hidden, ensemble_size, kl_weight, obs_dim, act_dim)
    step_dim = 2 * obs_dim + act_dim

    def optimiser():
        return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(lr))

    def init(rng) -> EncoderRunner:
        rng, encoder_key, decoder_key = jax.random.split(rng, 3)
        encoder_params = encoder_net.init(encoder_key, jnp.zeros((1, 1, step_dim)), jnp.ones((1, 1)))
        decoder_params = decoder_net.init(decoder_key, jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim)),
                                          jnp.zeros((1, z_dim)))
        return EncoderRunner(EncoderState(
            encoder=TrainState.create(apply_fn=encoder_net.apply, params=encoder_params, tx=optimiser()),
            decoder=TrainState.create(apply_fn=decoder_net.apply, params=decoder_params, tx=optimiser())), rng)

    def step(runner: EncoderRunner, data: EncoderData):
        rng, window_key, noise_key = jax.random.split(runner.rng, 3)
        steps, mask = sample_windows(window_key, data, batch_size, window)
        noise = jax.random.normal(noise_key, (batch_size, z_dim))
        state = runner.state

        decoder_params = jax.lax.stop_gradient(state.decoder.params)
        (loss, (reconstruction, kl)), grads = jax.value_and_grad(
            lambda params: window_loss(params, decoder_params, steps, mask, noise), has_aux=True)(state.encoder.params)
        encoder = state.encoder.apply_gradients(grads=grads)

        encoder_params = jax.lax.stop_gradient(encoder.params)
        (_, (decoder_reconstruction, _)), grads = jax.value_and_grad(
            lambda params: window_loss(encoder_params, params, steps, mask, None), has_aux=True)(state.decoder.params)
        decoder = state.decoder.apply_gradients(grads=grads)
        metrics = {"loss": loss, "reconstruction": reconstruction, "kl": kl,
                   "decoder_reconstruction": decoder_reconstruction, "window_length": mask.sum(1).mean()}
        return EncoderRunner(EncoderState(encoder, decoder), rng), metrics

    def train(runner: EncoderRunner, data: EncoderData, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""
        return scan_chunk(lambda r, _: step(r, data), runner, num_steps)

    return init, train


def trajectory_bounds(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the trajectories: the runs of equal episode_ids (non-decreasing) in dataset order."""
    boundaries = np.flatnonzero(np.diff(dataset.episode_ids) != 0) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int32)
    return starts, np.diff(np.append(starts, dataset.size)).astype(np.int32)


def encoder_steps(dataset) -> np.ndarray:
    """[N, 2 obs_dim + act_dim]: the encoder's input [s, a, s' - s] of every transition."""
    return np.concatenate([dataset.observations, dataset.actions,
                           dataset.next_observations - dataset.observations], axis=1).astype(np.float32)


def encoder_stage(args: Args, source, obs_dim: int, act_dim: int, stages: int = 4) -> tuple[dict, dict]:
    """Stage 1: the trajectory encoder and its decoders, from the cache or trained now and cached."""
    starts, lengths = trajectory_bounds(source)
    info = {"kind": "encoder", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "episodes_fingerprint": fingerprint((source.episode_ids,)), "obs_dim": obs_dim, "act_dim": act_dim,
            "steps": args.encoder_steps, "batch_size": args.encoder_batch_size, "window": args.window,
            "gru_hidden": args.gru_hidden, "z_dim": args.z_dim, "hidden": list(args.hidden),
            "ensemble_size": args.ensemble_size, "kl_weight": args.kl_weight, "lr": args.lr,
            "grad_clip": args.grad_clip, "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "encoder", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "encoder", info)
    init, train = make_encoder_train(args.gru_hidden, args.z_dim, tuple(args.hidden), args.ensemble_size,
                                     args.kl_weight, args.lr, args.grad_clip, args.encoder_batch_size, args.window,
                                     obs_dim, act_dim)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    data = jax.device_put(EncoderData(encoder_steps(source), starts, lengths))
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage 1/{stages}: trajectory encoder ({len(starts)} trajectories)", path, runner, train, (0, None), (data,),
        args.encoder_steps)
    host_state = jax.device_get(runner.state)
    artifact = {"encoder": serialization.to_state_dict(host_state.encoder.params),
                "decoder": serialization.to_state_dict(host_state.decoder.params)}
    info |= {"step": args.encoder_steps, "finished": True, "source": args.source, "source_dataset": source.name,
             "source_size": source.size, "trajectories": len(starts), "trajectory_length_min": int(lengths.min()),
             "trajectory_length_max": int(lengths.max()), "final_losses": metrics,
             "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


# ---------------------------------------------------------------- the relabelling: one z per trajectory (V2A step 1)
def relabel_rows(starts, lengths, window: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row starts, row lengths, owner trajectory of each row): one row per trajectory (window None), or its
    consecutive windows of `window` steps (the last one shorter)."""
    if window is None:
        return starts, lengths, np.arange(len(starts))
    per_trajectory = -(-lengths // window)  # ceil
    owner = np.repeat(np.arange(len(starts)), per_trajectory)
    first_row = np.cumsum(per_trajectory) - per_trajectory
    offset = (np.arange(owner.size) - first_row[owner]) * window
    row_lengths = np.minimum(window, lengths[owner] - offset)
    return (starts[owner] + offset).astype(np.int32), row_lengths.astype(np.int32), owner


def make_encode_fn(gru_hidden, z_dim):
    """encode(params, steps [N, F], row_starts [R], row_lengths [R], width) -> encoder means [R, z_dim] of the rows,
    each padded to `width` steps and masked."""
    encoder_net = TrajectoryEncoder(gru_hidden, z_dim)

    @partial(jax.jit, static_argnames="width")
    def encode(params, steps, row_starts, row_lengths, width: int):
        position = jnp.arange(width)
        mask = position[None, :] < row_lengths[:, None]
        index = jnp.where(mask, row_starts[:, None] + position[None, :], 0)
        window_steps = jnp.where(mask[..., None], steps[index], 0.0)
        return encoder_net.apply(params, window_steps, mask.astype(steps.dtype))[0]

    return encode


def relabel(encoder_params, dataset, gru_hidden: int, z_dim: int, window: Optional[int]):
    """One z per trajectory, the encoder mean (V2A step 1): returns (trajectory index of each transition [N] int32,
    z of each trajectory [E, z_dim] float32). window None: each full trajectory in one masked pass, padded to the
    longest (a 1000-step episode runs the GRU for 1000 steps although it was trained on windows of at most 200);
    window W: the length-weighted mean of the encoder means of its consecutive windows of W steps (the encoder never
    sees more steps than it was trained on)."""
    starts, lengths = trajectory_bounds(dataset)
    row_starts, row_lengths, owner = relabel_rows(starts, lengths, window)
    width = int(row_lengths.max())
    encode, steps = make_encode_fn(gru_hidden, z_dim), jax.device_put(encoder_steps(dataset))
    means = []
    chunks = tqdm(range(0, len(row_starts), RELABEL_CHUNK), unit="chunk", dynamic_ncols=True,
                  desc=f"relabel: z of {len(starts)} source trajectories")
    for first in chunks:  # fixed-size chunks: one compilation
        chunk = slice(first, first + RELABEL_CHUNK)
        pad = RELABEL_CHUNK - len(row_starts[chunk])
        chunk_starts = np.pad(row_starts[chunk], (0, pad))
        chunk_lengths = np.pad(row_lengths[chunk], (0, pad), constant_values=1)
        chunk_means = encode(encoder_params, steps, chunk_starts, chunk_lengths, width)
        means.append(np.asarray(chunk_means)[:RELABEL_CHUNK - pad])
    means = np.concatenate(means).astype(np.float64)
    trajectory_z = np.zeros((len(starts), z_dim))
    np.add.at(trajectory_z, owner, means * row_lengths[:, None])  # length-weighted mean of a trajectory's windows
    trajectory_z /= lengths[:, None]
    return np.repeat(np.arange(len(starts), dtype=np.int32), lengths), trajectory_z.astype(np.float32)


# ---------------------------------------------------------------- stage 2: SQL with z (V2A step 2)
class SQLState(NamedTuple):
    critic: TrainState
    critic_target_params: Any
    value: TrainState


class SQLRunner(NamedTuple):
    state: SQLState
    rng: jax.Array


class SQLHyperparams(NamedTuple):
    alpha: jax.Array


class SQLZData(NamedTuple):
    source: Transitions
    source_trajectory: jax.Array  # [N] int32
    trajectory_z: jax.Array  # [E, z_dim]


def sql_value_loss(v, target_q, alpha):
    """SQL's sparse value loss on u = min(Q1', Q2')(s, a) - V(s) with the target critics; returns (loss, u).

    mean(1[1 + u / (2 alpha) > 0] (1 + u / (2 alpha))^2 + V(s) / alpha): the squared hinge pushes V up towards
    the Q of in-sample actions, the linear term pushes it down; their balance is a sparse "max" over actions.
    """
    advantage = target_q - v
    hinge = 1.0 + advantage / (2.0 * alpha)
    return (jnp.where(hinge > 0, hinge**2, 0.0) + v / alpha).mean(), advantage


def critic_loss(q, target, weight):
    """Sum over the two critics of mean_i weight_i (Q_k(s_i, a_i) - y_i)^2 (IQL eq. 6).

    q: [2, B]; target, weight: [B]. weight is 1 for plain IQL; DVDF/IGDF pass exp(h) per source sample.
    """
    per_sample = ((q - target) ** 2).sum(0)
    chex.assert_equal_shape([weight, per_sample])  # a [B, 1] weight would broadcast to [B, B] (IGDF's bug)
    return (weight * per_sample).mean()


def with_z(obs, z):
    """The input [s, z] of V(s, z), and of Q(s, a, z) with a."""
    return jnp.concatenate([obs, z], axis=-1)


def make_sqlz_losses(hidden, discount, layer_norm: bool = False):
    """(value_loss, critic_loss, advantage) of SQL with z, pure functions of the parameters:

    value_loss(value_params, critic_target_params, batch, z, alpha) -> (SQL's V loss on u = min(Q1', Q2')(s, a, z)
        - V(s, z), u)
    critic_loss(critic_params, value_params, batch, z) -> sum over both critics of the MSE to r + discount (1 - d)
        V(s', z): s' belongs to the same trajectory, so it gets the same z
    advantage(critic_params, value_params, obs, actions, z) -> A(s, a, z) = min(Q1, Q2)(s, a, z) - V(s, z)
    """
    critic_net, value_net = TwinCritic(hidden, layer_norm), ValueNet(hidden, layer_norm)

    def value_loss(value_params, critic_target_params, batch: Transitions, z, alpha):
        obs_z = with_z(batch.observations, z)
        target_q = critic_net.apply(critic_target_params, obs_z, batch.actions).min(0)
        return sql_value_loss(value_net.apply(value_params, obs_z), target_q, alpha)

    def sqlz_critic_loss(critic_params, value_params, batch: Transitions, z):
        next_v = value_net.apply(value_params, with_z(batch.next_observations, z))
        target = batch.rewards + discount * (1.0 - batch.terminals) * next_v
        q = critic_net.apply(critic_params, with_z(batch.observations, z), batch.actions)
        return critic_loss(q, target, jnp.ones_like(target))

    def advantage(critic_params, value_params, obs, actions, z):
        obs_z = with_z(obs, z)
        return critic_net.apply(critic_params, obs_z, actions).min(0) - value_net.apply(value_params, obs_z)

    return value_loss, sqlz_critic_loss, advantage


def make_sqlz_train(hidden, lr, batch_size, discount, tau, target_every, obs_dim, act_dim, z_dim,
                    layer_norm: bool = False):
    """init(rng) -> SQLRunner and train(runner, data, hparams, num_steps): SQL's critics and value (as dvdf.py's
    stage 1) on [s, z], with the target critics updated every target_every steps."""
    critic_net, value_net = TwinCritic(hidden, layer_norm), ValueNet(hidden, layer_norm)
    value_loss, sqlz_critic_loss, _ = make_sqlz_losses(hidden, discount, layer_norm)

    def init(rng) -> SQLRunner:
        rng, _actor_key, critic_key, value_key = jax.random.split(rng, 4)  # sql_pretrain.py's split
        obs_z, action = jnp.zeros((1, obs_dim + z_dim)), jnp.zeros((1, act_dim))
        critic_params = critic_net.init(critic_key, obs_z, action)
        state = SQLState(
            critic=TrainState.create(apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(lr)),
            critic_target_params=jax.tree.map(jnp.copy, critic_params),
            value=TrainState.create(apply_fn=value_net.apply, params=value_net.init(value_key, obs_z),
                                    tx=optax.adam(lr)))
        return SQLRunner(state, rng)

    def update(state: SQLState, batch: Transitions, z, hparams: SQLHyperparams):
        (v_loss, advantage), grads = jax.value_and_grad(value_loss, has_aux=True)(
            state.value.params, state.critic_target_params, batch, z, hparams.alpha)
        value = state.value.apply_gradients(grads=grads)
        q_loss, grads = jax.value_and_grad(sqlz_critic_loss)(state.critic.params, value.params, batch, z)
        q_mean = critic_net.apply(state.critic.params, with_z(batch.observations, z), batch.actions).mean()
        critic = state.critic.apply_gradients(grads=grads)
        polyak = optax.incremental_update(critic.params, state.critic_target_params, tau)
        due = critic.step % target_every == 0  # critic.step counts the steps taken, this one included
        critic_target_params = jax.tree.map(lambda new, old: jnp.where(due, new, old), polyak,
                                            state.critic_target_params)
        metrics = {"value_loss": v_loss, "critic_loss": q_loss, "advantage_mean": advantage.mean(), "q_mean": q_mean}
        return SQLState(critic, critic_target_params, value), metrics

    def train(runner: SQLRunner, data: SQLZData, hparams: SQLHyperparams, num_steps: int):
        def step(runner: SQLRunner, _):
            rng, batch_key = jax.random.split(runner.rng)
            indices = jax.random.randint(batch_key, (batch_size,), 0, data.source.rewards.shape[0])
            batch = jax.tree.map(lambda x: x[indices], data.source)
            z = data.trajectory_z[data.source_trajectory[indices]]
            state, metrics = update(runner.state, batch, z, hparams)
            return SQLRunner(state, rng), metrics

        return scan_chunk(step, runner, num_steps)

    return init, train


def reward_scale_of(dataset) -> float:
    """IQL's MuJoCo reward scale, 1000 / (max - min episode return) over the dataset's episodes."""
    _, episode = np.unique(dataset.episode_ids, return_inverse=True)
    returns = np.bincount(episode, weights=dataset.rewards.astype(np.float64))
    if returns.max() - returns.min() <= 0:
        raise SystemExit("Reward scaling needs episodes with different returns, but every episode of the source "
                         "dataset has the same return: turn the scaling off for this dataset.")
    return float(1000.0 / (returns.max() - returns.min()))


def sqlz_stage(args: Args, source, source_trajectory, trajectory_z, encoder_info: dict, obs_dim: int,
               act_dim: int, stages: int = 4) -> tuple[dict, dict]:
    """Stage 2: the frozen SQL-with-z critics and value, from the cache or trained now and cached."""
    info = {"kind": "sqlz", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "encoder": Path(encoder_info["path"]).stem, "relabel_window": args.relabel_window, "obs_dim": obs_dim,
            "act_dim": act_dim, "z_dim": int(trajectory_z.shape[1]), "steps": args.sqlz_steps,
            "batch_size": args.sqlz_batch_size, "alpha": args.alpha, "target_every": args.sqlz_target_every,
            "lr": args.lr, "hidden": list(args.hidden), "discount": args.discount, "tau": args.tau,
            "seeds": [args.seed], "layer_norm": args.sql_layer_norm,
            "reward_scale": reward_scale_of(source) if args.sql_reward_scaling else 1.0}
    cached = cached_stage(args.cache_dir, "sqlz", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "sqlz", info)
    init, train = make_sqlz_train(tuple(args.hidden), args.lr, args.sqlz_batch_size, args.discount, args.tau,
                                  args.sqlz_target_every, obs_dim, act_dim, int(trajectory_z.shape[1]),
                                  args.sql_layer_norm)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    transitions = to_transitions(source)
    transitions = transitions._replace(rewards=(transitions.rewards * info["reward_scale"]).astype(np.float32))
    data = jax.device_put(SQLZData(transitions, source_trajectory, trajectory_z))
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage 2/{stages}: sql with z", path, runner, train, (0, None, 0),
        (data, SQLHyperparams(alpha=jnp.full(1, args.alpha, jnp.float32))), args.sqlz_steps,
        value_bound_of(transitions.rewards, args.discount),
        "try --sql-reward-scaling --sql-layer-norm, or a larger --alpha")
    host_state = jax.device_get(runner.state)
    artifact = {"critic": serialization.to_state_dict(host_state.critic.params),
                "value": serialization.to_state_dict(host_state.value.params)}
    info |= {"step": args.sqlz_steps, "finished": True, "source": args.source, "source_dataset": source.name,
             "source_size": source.size, "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


# ---------------------------------------------------------------- stages 3 and 4: otdf.py's OT deviation and CVAE
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


# ---------------------------------------------------------------- data and the grid
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    need(args.encoder_steps >= 0,
         f"--encoder-steps must be 0 (an untrained encoder) or more, got {args.encoder_steps}.")
    for flag in ("encoder_batch_size", "window", "gru_hidden", "z_dim", "ensemble_size", "sqlz_steps",
                 "sqlz_batch_size", "sqlz_target_every"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    need(args.relabel_window is None or args.relabel_window >= 1,
         f"--relabel-window must be at least 1 step, got {args.relabel_window}.")
    need(args.kl_weight >= 0, f"--kl-weight must be 0 or more, got {args.kl_weight}.")
    need(args.grad_clip > 0, f"--grad-clip must be positive, got {args.grad_clip}.")
    need(0.0 < args.probe_fraction <= 0.5, f"--probe-fraction must be in (0, 0.5], got {args.probe_fraction}.")


def to_transitions(dataset) -> Transitions:
    return Transitions(observations=dataset.observations, actions=dataset.actions, rewards=dataset.rewards,
                       next_observations=dataset.next_observations, terminals=dataset.terminals)


def make_grid(args: Args, seeds: list[int]) -> tuple[list, list, Hyperparams]:
    """The runs of the (lam, xi, seed) grid, lam outermost and seed innermost: (the (lam, xi) settings, one row per
    run, the runs' traced Hyperparams). The runs of one seed start from the same initialisation and draw the same
    batch indices whatever lam and xi: common random numbers across settings."""
    settings = [(lam, xi) for lam in args.lam for xi in args.xi]
    grid = [{"lam": lam, "xi": xi, "seed": seed, "keep_count": keep_count(args.batch_size // 2, xi)}
            for lam, xi in settings for seed in seeds]
    hparams = Hyperparams(expectile=jnp.full(len(grid), args.expectile, jnp.float32),
                          temperature=jnp.full(len(grid), args.temperature, jnp.float32),
                          lam=jnp.array([run["lam"] for run in grid], jnp.float32),
                          keep_count=jnp.array([run["keep_count"] for run in grid], jnp.int32),
                          seed_index=jnp.array([seeds.index(run["seed"]) for run in grid], jnp.int32))
    return settings, grid, hparams


def grid_data(source, source_trajectory, trajectory_z, groups: dict, target_full, targets: list,
              references: dict, deviation) -> tuple[Data, dict]:
    """Stage 5's data on the device (the source with each transition's trajectory, the trajectories' z and the
    metadata labels; one target subsample per seed, stacked), and its description for results.json."""
    data = jax.device_put(Data(
        source=to_transitions(source), source_trajectory=source_trajectory, trajectory_z=trajectory_z,
        source_groups=tuple(labels for _, labels in groups.values()),
        target=Transitions(*(np.stack(fields) for fields in zip(*(to_transitions(t) for t in targets)))),
        deviation=deviation))
    return data, {"source_dataset": source.name, "source_size": source.size, "target_dataset": target_full.name,
                  "target_full_size": target_full.size, "target_size": targets[0].size,
                  "source_trajectories": len(trajectory_z),
                  "source_groups": {key: names for key, (names, _) in groups.items()},
                  "ref_min_score": references["random"], "ref_max_score": references["expert"],
                  "references": references["source"]}


def report(step: int, entry: dict, metrics) -> tuple[str, str]:
    """The progress bar's best score and the log line of an evaluation: each setting's score, the kept share of
    each domain."""
    shares = entry["filter"]["kept_share"].get("domain", {})
    return (f"score={max(setting['score_mean'] for setting in entry['by_setting']):.1f}",
            f"step {step}: {settings_line(entry)}" + "".join(
                f"; kept share of {name} {np.mean([v for v in values if v is not None] or [np.nan]):.2f}"
                for name, values in shares.items()))


# ---------------------------------------------------------------- main
def stages_of(args: Args) -> list:
    """The stages main() runs, as the start block lists them: (name, steps[, runs])."""
    stages = [("encoder", args.encoder_steps), ("sqlz", args.sqlz_steps), ("ot", None)]
    stages += [("cvae", args.cvae_steps)] if args.dataset_constraint else []
    return stages + [("v2a-otdf", args.steps, len(args.lam) * len(args.xi) * args.num_seeds)]


def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    algo, last = "v2a-otdf", 5 if args.dataset_constraint else 4
    out, saved = open_run(args, default_out(args, algo, grid_level(args), shown=("lam", "xi")))
    start_block(args, argv, out, stages_of(args), saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = source.obs_dim, source.act_dim  # load_source_target checked that they are the target's

    # stage 1 and the relabelling: one z per source trajectory, and how well it tells the domains apart
    start = time.perf_counter()
    encoder_params, encoder_info = encoder_stage(args, source, obs_dim, act_dim, stages=last)
    source_trajectory, trajectory_z = relabel(encoder_params["encoder"], source, args.gru_hidden, args.z_dim,
                                              args.relabel_window)
    groups = episode_groups(source)
    representation = describe_representation(out, trajectory_z, groups, trajectory_bounds(source)[0],
                                             args.probe_fraction, args.seed) | {"relabel_window": args.relabel_window}

    # stages 2-4: frozen, shared by every run of the grid (the OT deviation and the CVAE: otdf.py's, cached alike)
    sqlz_params, sqlz_info = sqlz_stage(args, source, source_trajectory, trajectory_z, encoder_info, obs_dim, act_dim,
                                        stages=last)
    ot_params, ot_info = ot_stage(args, source, targets[0], obs_dim, act_dim, stage=f"3/{last}")
    stages, cvae = {"encoder": encoder_info, "sqlz": sqlz_info, "ot": ot_info}, None
    if args.dataset_constraint:
        cvae_params, stages["cvae"] = cvae_stage(args, targets[0], obs_dim, act_dim, stage=f"4/{last}")
        cvae = cvae_params["cvae"]
    stage_seconds = time.perf_counter() - start
    frozen = jax.device_put(Frozen(sqlz_params["critic"], sqlz_params["value"], cvae))
    data, data_info = grid_data(source, source_trajectory, trajectory_z, groups, target_full, targets, references,
                                np.asarray(ot_params["deviation"], np.float32))
    group_names = data_info["source_groups"]
    reg_weight = args.reg_weight if args.reg_weight is not None else default_reg_weight(args.source, args.target)

    # stage 5 (4 without the constraint): the filtered IQL of every (lam, xi, seed) run at once
    settings, grid, hparams = make_grid(args, seeds)
    init, train = make_train(args, obs_dim, act_dim, sqlz_info["hidden"],
                             tuple((key, len(names)) for key, names in group_names.items()),
                             sqlz_info.get("layer_norm", False), stages.get("cvae", {}).get("hidden", ()), reg_weight)
    results = train_grid(
        args, out, saved, algo=algo, stage=len(stages) + 1, grid=grid, settings=settings, init=init, train=train,
        inputs=(data, frozen, hparams), policy=make_policy(args, act_dim),
        ref_scores=(references["random"], references["expert"]),
        filter_stats=lambda sums, steps: filter_diagnostics(sums, group_names, steps, args.batch_size // 2),
        report=report, timing={"stage_seconds": stage_seconds},
        header={"data": data_info, "stages": stages, "reg_weight": reg_weight, "representation": representation})
    print(f"{algo} {datasets_line(args)}, seeds {seeds}, after {results['step']} steps: "
          f"{settings_line(results['final'], 'final score')}; results in {out}")
    return results


if __name__ == "__main__":
    main()
