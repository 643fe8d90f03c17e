"""DVDF-OTDF: DVDF's dynamics- and value-aligned filter with OTDF's optimal-transport deviation as the dynamics score.

Qiao et al., "Cross-Domain Offline Policy Adaptation with Dynamics- and Value-Aligned Data Filtering" (DVDF),
arXiv:2512.02435, its second variant: DVDF's filter on top of OTDF (Lyu et al., "Cross-Domain Offline Policy
Adaptation with Optimal Transport and Dataset Constraint", ICLR 2025) instead of IGDF; the IQL losses are IQL's
(Kostrikov et al., ICLR 2022). algos/dvdf.py is the IGDF-based variant; `dvdf.py --dynamics-score ot` runs this file.

    python algos/dvdf_otdf.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/dvdf_otdf.py ... --lam 0 0.7 1 --xi 0.3 0.5    # a lam x xi x seed grid in one program
    python algos/dvdf_otdf.py ... --no-dataset-constraint       # the filter alone

One training step, in the numbering the code cites (DVDF's steps; OTDF's where they replace them):
    1. Draw B source and B target transitions (the authors' 128 + 128).
    2. For the source batch: h = c, OTDF's batch-normalised deviation c = (d - max_batch d) / (max_batch d -
       min_batch d) in [-1, 0] of the frozen OT deviations d (OTDF step 2: how well a transition matches the target
       data), and the advantage A(s, a) = min(Q1, Q2)(s, a) - V(s) of frozen SQL critics and value,
       Norm(A) = (A - min_batch A) / (max_batch A - min_batch A + 1e-8).
    3. The filter score g = lam c + (1 - lam) Norm(A).
    4. Keep the top int(B xi) source samples by g (a rank mask: dropped samples are masked out of every loss).
    5. One IQL step on kept source + target: V loss unweighted, Q loss weighted by exp(c) on kept source samples and
       1 on target samples; the actor loss subtracts reg_weight * log beta(pi(s) | s) of the target-behaviour CVAE
       (OTDF step 5, its dataset constraint) at the deterministic action pi(s) = tanh(mu(s)).
    6. `--weighting g_indicator` weights kept source samples by g instead (the paper's notation).
Neither paper says whether DVDF-OTDF keeps OTDF's dataset constraint; it does here (a variant of OTDF whose filter
adds the value term); --no-dataset-constraint drops it. The frozen inputs are pre-trained first, once with --seed
and its target subsample, and cached under --cache-dir (keyed by the datasets' fingerprints, the stage's flags and
the seed, so a sweep and algos/otdf.py share them; envs/run.py): stage 1/4 SQL (Xu et al., ICLR 2023) on the
source, as algos/sql_pretrain.py makes it (--sql-artifact takes its artefact instead); stage 2/4 every source
transition's OT deviation d_i = -sum_j P_ij C_ij against the target data (ott-jax's Sinkhorn, cosine cost), stage
3/4 the target CVAE, both as algos/otdf.py computes them; stage 4/4 trains every (lam, xi, seed) run of the grid in
one jitted program (lam outermost, seed innermost; lam and int(B xi) are traced). Without the constraint there is
no CVAE stage (3 stages). Evaluation: --eval-episodes episodes of tanh(mu(s)) per run in the target domain,
normalised with its reference returns.

Outputs in --out (default runs/dvdf-otdf/<source>_to_<target>-<quality>/lam<lams>_xi<xis>/seed<seed>,
envs.run.default_out), as envs/run.py describes; results.json adds the grid, its settings, the stages, reg_weight
and per evaluation each setting's mean and std over seeds and the filter's diagnostics (envs/diagnostics.py: h, A
and g of kept and dropped source samples, and each episode-metadata group's share).
"""
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/dvdf_otdf.py` puts algos/ on the path, not the repository root that holds envs/.
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

from envs import domain_info, reference_info
from envs.diagnostics import episode_groups, filter_diagnostics, filter_sums
from envs.run import (CrossDomainArgs, Progress, STAGE_SAVE_SECONDS, cached_stage, check_common_flags, dataset_arrays,
                      datasets_line, default_out, fingerprint, grid_level, load_source_target, open_run, read_artifact,
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
    """Adam learning rate of IQL's networks and the SQL stage; the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of IQL's and SQL's networks"""
    # --- IQL ---
    discount: float = 0.99
    """discount of IQL and of the SQL stage"""
    tau: float = 0.005
    """Polyak rate of the target critics (IQL and the SQL stage)"""
    expectile: float = 0.7
    """expectile of the value loss, in (0, 1)"""
    temperature: float = 3.0
    """inverse temperature of the actor's advantage weights exp(temperature * A)"""
    max_weight: float = 100.0
    """clip of the actor's advantage weights"""
    actor: Literal["deterministic", "gaussian"] = "deterministic"
    """weighted squared error on tanh(mu(s)) (authors), or weighted Gaussian log-likelihood (original IQL)"""
    # --- DVDF ---
    lam: tuple[float, ...] = (0.7,)
    """weight of the dynamics score in g = lam c + (1 - lam) Norm(A), in [0, 1]; 1 ranks by c alone (OTDF's filter
    at xi); several values run as one grid"""
    xi: tuple[float, ...] = (0.5,)
    """fraction of each source batch kept (the top by g), in (0, 1]; several values run as one grid"""
    weighting: Literal["exp_h", "g_indicator"] = "exp_h"
    """Q-loss weight of a kept source sample: exp(c) (the authors' exp(h)) or g (the paper's indicator times g)"""
    # --- stage 1: SQL pre-training on the source dataset ---
    sql_steps: int = 1_000_000
    """gradient steps of SQL"""
    sql_batch_size: int = 128
    """source transitions per SQL step"""
    alpha: Optional[float] = None
    """SQL's regularisation strength; default 0.1, or 0.2 when the source is an Ant domain (DVDF's configs)"""
    sql_layer_norm: bool = True
    """LayerNorm after every hidden layer of SQL's critics and value (--no-sql-layer-norm: the authors' networks)"""
    sql_reward_scaling: bool = True
    """SQL on source rewards x 1000 / (max - min episode return) (IQL's and IVR's normalisation);
    --no-sql-reward-scaling: the authors' raw rewards"""
    sql_artifact: Optional[str] = None
    """use these critics and value (sql.msgpack of algos/sql_pretrain.py, its first seed) instead of stage 1"""
    # --- stages 2 and 3: the dynamics score from optimal transport and the dataset constraint (algos/otdf.py's) ---
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


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds
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
    source_groups: tuple  # per metadata key the dataset has: [N_source] int32 label of each transition
    target: Transitions  # one subsample per seed, stacked along a leading seed axis; runs index it by seed_index
    deviation: jax.Array  # [N_source] OT deviation d of each source transition (stage 2)


class Frozen(NamedTuple):
    """The pre-trained stages, shared by every run and never trained here."""
    sql_critic: Any
    sql_value: Any
    cvae: Any  # the target-behaviour CVAE of the dataset constraint; None without it


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array
    lam: jax.Array  # float32
    keep_count: jax.Array  # int32, int(B xi) computed on the host
    seed_index: jax.Array  # int32, which seed's target subsample the run trains on


# ---------------------------------------------------------------- the filter (DVDF 2-4), Q weights (5-6), constraint
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
    """Per-sample Q-loss weights of [source batch, target batch]: exp(h) (DVDF step 5, the authors' code) or g (step
    6, the paper's notation) on kept source samples, 0 on dropped ones (masked out anyway), 1 on target samples."""
    source_weight = jnp.exp(dynamics_score) if weighting == "exp_h" else score
    return jnp.concatenate([keep * source_weight, jnp.ones(target_size, keep.dtype)])


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


# ---------------------------------------------------------------- stage 4: filtered IQL
def make_train(args: Args, obs_dim: int, act_dim: int, sql_hidden, groups: tuple = (), sql_layer_norm: bool = False,
               cvae_hidden=(), reg_weight: float = 0.0):
    """Returns init(rng) -> Runner and train(runner, data, frozen, hparams, num_steps) -> (runner, metrics).

    Pure functions of one run; main() runs them as jax.jit(jax.vmap(...)) over the (lam, xi, seed) grid with data
    and the frozen stages shared. groups: ((metadata key, number of values), ...) matching data.source_groups.
    metrics = (mean losses over the chunk, summed filter statistics over the chunk). h is the batch-normalised
    data.deviation; with the dataset constraint the actor loss uses frozen.cvae (hidden cvae_hidden).
    """
    constrained = args.dataset_constraint
    cvae = CVAE(act_dim, 2 * act_dim, tuple(cvae_hidden)) if constrained else None
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden), ValueNet(args.hidden)
    sql_critic_net = TwinCritic(tuple(sql_hidden), sql_layer_norm)
    sql_value_net = ValueNet(tuple(sql_hidden), sql_layer_norm)
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

    def filter_source(source_batch: Transitions, deviation, frozen: Frozen, hparams: Hyperparams):
        """h = c, A, g and the keep mask of one source batch (DVDF steps 2-4, c of OTDF step 2); the frozen stages get
        no gradient."""
        frozen = jax.lax.stop_gradient(frozen)
        obs, actions = source_batch.observations, source_batch.actions
        h = normalise_deviation(deviation)
        advantage = (sql_critic_net.apply(frozen.sql_critic, obs, actions).min(0)
                     - sql_value_net.apply(frozen.sql_value, obs))  # online critics, not the target ones
        score = filter_score(h, advantage, hparams.lam)
        return h, advantage, score, keep_mask(score, hparams.keep_count)

    def update(state: IQLState, source_batch: Transitions, deviation, target_batch: Transitions, labels: tuple,
               frozen: Frozen, hparams: Hyperparams, key):
        """Filter the source batch, then one IQL step on kept source + target (DVDF step 5)."""
        h, sql_advantage, score, keep = filter_source(source_batch, deviation, frozen, hparams)
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
            target_batch = jax.tree.map(lambda x: x[hparams.seed_index, target_indices], data.target)
            labels = tuple(label[source_indices] for label in data.source_groups)
            # the constraint's latent noise from a key of its own: dvdf.py's runs draw what they always drew
            state, losses, sums = update(runner.state, source_batch, data.deviation[source_indices], target_batch,
                                         labels, frozen, hparams, jax.random.fold_in(batch_key, 1))
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


# ---------------------------------------------------------------- stage 1: SQL (sql_pretrain.py's critics and value)
def default_alpha(source: str) -> float:
    """DVDF's configs: alpha 0.2 for Ant, 0.1 for HalfCheetah, Hopper and Walker2d."""
    return 0.2 if domain_info(source).task == "ant" else 0.1


class SQLState(NamedTuple):
    critic: TrainState
    critic_target_params: Any
    value: TrainState


class SQLRunner(NamedTuple):
    state: SQLState
    rng: jax.Array


class SQLHyperparams(NamedTuple):
    alpha: jax.Array


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


def make_sql_train(hidden, lr, batch_size, discount, tau, obs_dim, act_dim, layer_norm: bool = False):
    """init(rng) -> SQLRunner and train(runner, source, hparams, num_steps): sql_pretrain.py without the policy."""
    critic_net, value_net = TwinCritic(hidden, layer_norm), ValueNet(hidden, layer_norm)

    def init(rng) -> SQLRunner:
        rng, _actor_key, critic_key, value_key = jax.random.split(rng, 4)  # sql_pretrain.py's split
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        critic_params = critic_net.init(critic_key, obs, action)
        state = SQLState(
            critic=TrainState.create(apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(lr)),
            critic_target_params=jax.tree.map(jnp.copy, critic_params),
            value=TrainState.create(apply_fn=value_net.apply, params=value_net.init(value_key, obs),
                                    tx=optax.adam(lr)))
        return SQLRunner(state, rng)

    def update(state: SQLState, batch: Transitions, hparams: SQLHyperparams):
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return sql_value_loss(value_net.apply(params, batch.observations), target_q, hparams.alpha)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return critic_loss(q, target, jnp.ones_like(target)), q.mean()

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, tau)
        metrics = {"value_loss": v_loss, "critic_loss": q_loss, "advantage_mean": advantage.mean(), "q_mean": q_mean}
        return SQLState(critic, critic_target_params, value), metrics

    def train(runner: SQLRunner, source: Transitions, hparams: SQLHyperparams, num_steps: int):
        def step(runner: SQLRunner, _):
            rng, batch_key = jax.random.split(runner.rng)
            indices = jax.random.randint(batch_key, (batch_size,), 0, source.rewards.shape[0])
            state, metrics = update(runner.state, jax.tree.map(lambda x: x[indices], source), hparams)
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


def sql_stage(args: Args, source, obs_dim: int, act_dim: int, stage: str = "1/3") -> tuple[dict, dict]:
    """Stage 1: the frozen SQL critics and value, from --sql-artifact, the cache, or trained now and cached."""
    if args.sql_artifact:
        params, info = read_artifact(args.sql_artifact, "sql", "--sql-artifact", obs_dim, act_dim)
        if info.get("source_fingerprint") != fingerprint(dataset_arrays(source)):
            print(f"note: --sql-artifact was trained on {info.get('source_dataset')}, not on this source dataset.")
        return params, info | {"origin": "artifact"}
    alpha = args.alpha if args.alpha is not None else default_alpha(args.source)
    info = {"kind": "sql", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "obs_dim": obs_dim, "act_dim": act_dim, "steps": args.sql_steps, "batch_size": args.sql_batch_size,
            "alpha": alpha, "lr": args.lr, "hidden": list(args.hidden), "discount": args.discount, "tau": args.tau,
            "seeds": [args.seed], "layer_norm": args.sql_layer_norm,
            "reward_scale": reward_scale_of(source) if args.sql_reward_scaling else 1.0}
    cached = cached_stage(args.cache_dir, "sql", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "sql", info)
    init, train = make_sql_train(tuple(args.hidden), args.lr, args.sql_batch_size, args.discount, args.tau,
                                 obs_dim, act_dim, args.sql_layer_norm)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    transitions = to_transitions(source)
    transitions = transitions._replace(rewards=(transitions.rewards * info["reward_scale"]).astype(np.float32))
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage {stage}: sql {args.source}", path, runner, train, (0, None, 0),
        (jax.device_put(transitions), SQLHyperparams(alpha=jnp.full(1, alpha, jnp.float32))), args.sql_steps,
        value_bound_of(transitions.rewards, args.discount),
        "try --sql-reward-scaling --sql-layer-norm, or a larger --alpha")
    host_state = jax.device_get(runner.state)
    artifact = {"critic": serialization.to_state_dict(host_state.critic.params),
                "value": serialization.to_state_dict(host_state.value.params)}
    info |= {"step": args.sql_steps, "finished": True, "source": args.source, "source_dataset": source.name,
             "source_size": source.size, "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


# ---------------------------------------------------------------- stages 2 and 3: otdf.py's OT deviation and CVAE
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


def grid_data(source, groups: dict, target_full, targets: list, references: dict,
              deviation) -> tuple[Data, dict]:
    """Stage 4's data on the device (the source with its metadata labels; one target subsample per seed, stacked),
    and its description for results.json."""
    data = jax.device_put(Data(
        source=to_transitions(source), source_groups=tuple(labels for _, labels in groups.values()),
        target=Transitions(*(np.stack(fields) for fields in zip(*(to_transitions(t) for t in targets)))),
        deviation=deviation))
    return data, {"source_dataset": source.name, "source_size": source.size, "target_dataset": target_full.name,
                  "target_full_size": target_full.size, "target_size": targets[0].size,
                  "source_groups": {key: names for key, (names, _) in groups.items()},
                  "ref_min_score": references["random"], "ref_max_score": references["expert"],
                  "references": references["source"]}


def report(step: int, entry: dict, metrics) -> tuple[str, str]:
    """The progress bar's best score and the log line of an evaluation: each setting's score, the mean h of kept
    source samples."""
    kept_h = [v for v in entry["filter"]["dynamics_score_kept"] if v is not None]
    return (f"score={max(setting['score_mean'] for setting in entry['by_setting']):.1f}",
            f"step {step}: {settings_line(entry)}; mean h of kept source {np.mean(kept_h):.3f}")


# ---------------------------------------------------------------- main
def stages_of(args: Args) -> list:
    """The stages main() runs, as the start block lists them: (name, steps[, runs])."""
    stages = ([] if args.sql_artifact else [("sql", args.sql_steps)]) + [("ot", None)]
    stages += [("cvae", args.cvae_steps)] if args.dataset_constraint else []
    return stages + [("dvdf-otdf", args.steps, len(args.lam) * len(args.xi) * args.num_seeds)]


def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_common_flags(args)  # every flag's range, the stages', the batch halves' and --lam / --xi among them
    algo, last = "dvdf-otdf", 4 if args.dataset_constraint else 3
    out, saved = open_run(args, default_out(args, algo, grid_level(args), shown=("lam", "xi")))
    start_block(args, argv, out, stages_of(args), saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = target_full.obs_dim, target_full.act_dim

    # stages 1-3: frozen, shared by every run of the grid (the OT deviation and the CVAE: otdf.py's, cached alike)
    start = time.perf_counter()
    sql_params, sql_info = sql_stage(args, source, obs_dim, act_dim, stage=f"1/{last}")
    ot_params, ot_info = ot_stage(args, source, targets[0], obs_dim, act_dim, stage=f"2/{last}")
    stages, cvae = {"sql": sql_info, "ot": ot_info}, None
    if args.dataset_constraint:
        cvae_params, stages["cvae"] = cvae_stage(args, targets[0], obs_dim, act_dim, stage=f"3/{last}")
        cvae = cvae_params["cvae"]
    stage_seconds = time.perf_counter() - start
    frozen = jax.device_put(Frozen(sql_params["critic"], sql_params["value"], cvae))

    deviation = np.asarray(ot_params["deviation"], np.float32)
    data, data_info = grid_data(source, episode_groups(source), target_full, targets, references, deviation)
    group_names = data_info["source_groups"]
    reg_weight = args.reg_weight if args.reg_weight is not None else default_reg_weight(args.source, args.target)

    # stage 4 (3 without the constraint): the filtered IQL of every (lam, xi, seed) run at once
    settings, grid, hparams = make_grid(args, seeds)
    init, train = make_train(args, obs_dim, act_dim, sql_info["hidden"],
                             tuple((key, len(names)) for key, names in group_names.items()),
                             sql_info.get("layer_norm", False), stages.get("cvae", {}).get("hidden", ()), reg_weight)
    results = train_grid(
        args, out, saved, algo=algo, stage=len(stages) + 1, grid=grid, settings=settings, init=init, train=train,
        inputs=(data, frozen, hparams), policy=make_policy(args, act_dim),
        ref_scores=(references["random"], references["expert"]),
        filter_stats=lambda sums, steps: filter_diagnostics(sums, group_names, steps, args.batch_size // 2),
        report=report, timing={"stage_seconds": stage_seconds},
        header={"data": data_info, "stages": stages, "reg_weight": reg_weight})
    print(f"{algo} {datasets_line(args)}, seeds {seeds}, after {results['step']} steps: "
          f"{settings_line(results['final'], 'final score')}; results in {out}")
    return results


if __name__ == "__main__":
    main()
