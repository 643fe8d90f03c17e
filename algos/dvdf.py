"""DVDF: dynamics- and value-aligned data filtering for cross-domain offline RL; IGDF is its lam = 1 case.

Qiao et al., "Cross-Domain Offline Policy Adaptation with Dynamics- and Value-Aligned Data Filtering" (DVDF),
arXiv:2512.02435, on top of IGDF (Wen et al., ICML 2024, arXiv:2405.06192) and IQL (Kostrikov et al., ICLR 2022).

    python algos/dvdf.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/dvdf.py ... --lam 1                           # IGDF
    python algos/dvdf.py ... --lam 0 0.3 0.7 1 --xi 0.3 0.5    # a lam x xi x seed grid in one program
    python algos/dvdf.py ... --dynamics-score ot               # DVDF-OTDF: runs algos/dvdf_otdf.py

One training step, in the numbering the code cites (the IQL losses cite IQL's equations):
    1. Draw B source and B target transitions (the authors' 128 + 128).
    2. For the source batch: the dynamics score h(s, a, s') = cos(phi(s, a), psi(s')) of IGDF's frozen contrastive
       scorer (how target-like a transition is) and the advantage A(s, a) = min(Q1, Q2)(s, a) - V(s) of frozen SQL
       critics and value (how good its action is), Norm(A) = (A - min_batch A) / (max_batch A - min_batch A + 1e-8).
    3. The filter score g = lam h + (1 - lam) Norm(A).
    4. Keep the top int(B xi) source samples by g (a rank mask: dropped samples are masked out of every loss).
    5. One IQL step on kept source + target: V loss and actor unweighted, Q loss weighted by exp(h) on kept source
       samples and 1 on target samples (the authors' code).
    6. `--weighting g_indicator` weights kept source samples by g instead (the paper's notation; g can be negative).
The frozen inputs are pre-trained first, once with --seed and its target subsample, and cached under --cache-dir
(keyed by the datasets' fingerprints, the stage's flags and the seed, so a sweep trains them once; envs/run.py):
stage 1/3 SQL (Xu et al., ICLR 2023) on the source, as algos/sql_pretrain.py makes it; stage 2/3 IGDF's scorer, a
binary NCE of target transitions against source next states, as algos/igdf_scorer.py makes it (--sql-artifact and
--scorer-artifact take those scripts' artefacts instead). Stage 3/3 trains every (lam, xi, seed) run of the grid in
one jitted program (lam outermost, seed innermost; lam and int(B xi) are traced). Evaluation: --eval-episodes
episodes of tanh(mu(s)) per run in the target domain, normalised with its reference returns. Seed k of an N-seed run
is the 1-seed run with --seed <seed + k> given the same stages, up to float rounding of the batched matmuls, which
grows with training (the two agree closely early on, not bit for bit). DVDF's second variant, DVDF-OTDF (OTDF's
optimal-transport deviation in place of h, and its dataset constraint), is algos/dvdf_otdf.py.

Outputs in --out (default runs/<dvdf|igdf>/<source>_to_<target>-<quality>/lam<lams>_xi<xis>/seed<seed>,
envs.run.default_out: a dataset flag's name in place of its domain, -<hash> when other flags are off their
defaults), as envs/run.py describes; results.json adds the grid, its settings, the stages (where each came from, the
scorer's held-out separation) and per evaluation each setting's mean and std over seeds and the filter's diagnostics
(envs/diagnostics.py: h, A and g of kept and dropped source samples, and each episode-metadata group's share).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/dvdf.py` puts algos/ on the path, not the repository root that holds envs/.
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

from envs import domain_info, reference_info
from envs.diagnostics import (SOURCE_HOLDOUT_SEED, episode_groups, filter_diagnostics, filter_sums, held_out,
                              held_out_separation, holdout_split)
from envs.run import (CrossDomainArgs, cached_stage, check_common_flags, dataset_arrays, datasets_line, default_out,
                      fingerprint, grid_level, load_source_target, open_run, read_artifact, run_stage, save_stage,
                      scan_chunk, settings_line, stage_path, start_block, train_grid, value_bound_of, variant_script)


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
    """Adam learning rate of every network (SQL and scorer stages included); the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every network (IQL, SQL and the scorer's encoders)"""
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
    """weight of the dynamics score in g = lam h + (1 - lam) Norm(A), in [0, 1]; 1 is IGDF; several values run
    as one grid"""
    xi: tuple[float, ...] = (0.5,)
    """fraction of each source batch kept (the top by g), in (0, 1]; several values run as one grid"""
    weighting: Literal["exp_h", "g_indicator"] = "exp_h"
    """Q-loss weight of a kept source sample: exp(h) (authors' code) or g (the paper's indicator times g)"""
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
    # --- stage 2: the contrastive dynamics scorer ---
    scorer_steps: int = 7_000
    """gradient steps of the scorer"""
    scorer_batch_size: int = 128
    """B of the binary NCE: B target transitions and B - 1 shared source next states per step"""
    repr_dim: int = 64
    """size of the representations phi(s, a) and psi(s')"""
    holdout_fraction: float = 0.1
    """fraction of each dataset (at most 10,000 transitions) held out of the scorer's training to measure how
    well it separates target from source, in (0, 0.5]"""
    scorer_artifact: Optional[str] = None
    """use these encoders (scorer.msgpack of algos/igdf_scorer.py, its first seed) instead of stage 2"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds
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


class Scorer(nn.Module):
    """IGDF's two encoders: phi(s, a) and psi(s'), no output activation. next_obs may have another batch size."""
    hidden: tuple[int, ...]
    repr_dim: int

    @nn.compact
    def __call__(self, obs, action, next_obs):
        sa_repr = MLP(self.hidden, self.repr_dim, name="phi")(jnp.concatenate([obs, action], axis=-1))
        next_repr = MLP(self.hidden, self.repr_dim, name="psi")(next_obs)
        return sa_repr, next_repr


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


class Frozen(NamedTuple):
    """The pre-trained stages, shared by every run and never trained here."""
    sql_critic: Any
    sql_value: Any
    scorer: Any


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array
    lam: jax.Array  # float32
    keep_count: jax.Array  # int32, int(B xi) computed on the host
    seed_index: jax.Array  # int32, which seed's target subsample the run trains on


# ---------------------------------------------------------------- the filter (DVDF steps 2-4) and the Q weights (5-6)
def dynamics_score(sa_repr, next_repr, eps=1e-8):
    """h(s, a, s') = cos(phi(s, a), psi(s')) in [-1, 1], per transition (torch's cosine_similarity, eps 1e-8)."""
    norms = jnp.linalg.norm(sa_repr, axis=-1) * jnp.linalg.norm(next_repr, axis=-1)
    return (sa_repr * next_repr).sum(-1) / jnp.maximum(norms, eps)


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


# ---------------------------------------------------------------- stage 3: filtered IQL
def make_train(args: Args, obs_dim: int, act_dim: int, sql_hidden, scorer_hidden, repr_dim: int,
               groups: tuple = (), sql_layer_norm: bool = False):
    """Returns init(rng) -> Runner and train(runner, data, frozen, hparams, num_steps) -> (runner, metrics).

    Pure functions of one run; main() runs them as jax.jit(jax.vmap(...)) over the (lam, xi, seed) grid with data
    and the frozen stages shared. groups: ((metadata key, number of values), ...) matching data.source_groups.
    metrics = (mean losses over the chunk, summed filter statistics over the chunk).
    """
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden), ValueNet(args.hidden)
    sql_critic_net = TwinCritic(tuple(sql_hidden), sql_layer_norm)
    sql_value_net = ValueNet(tuple(sql_hidden), sql_layer_norm)
    scorer_net = Scorer(tuple(scorer_hidden), repr_dim)
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

    def filter_source(source_batch: Transitions, frozen: Frozen, hparams: Hyperparams):
        """h, A, g and the keep mask of one source batch (DVDF steps 2-4); the frozen stages get no gradient."""
        frozen = jax.lax.stop_gradient(frozen)
        obs, actions = source_batch.observations, source_batch.actions
        h = dynamics_score(*scorer_net.apply(frozen.scorer, obs, actions, source_batch.next_observations))
        advantage = (sql_critic_net.apply(frozen.sql_critic, obs, actions).min(0)
                     - sql_value_net.apply(frozen.sql_value, obs))  # online critics, not the target ones
        score = filter_score(h, advantage, hparams.lam)
        return h, advantage, score, keep_mask(score, hparams.keep_count)

    def update(state: IQLState, source_batch: Transitions, target_batch: Transitions, labels: tuple, frozen: Frozen,
               hparams: Hyperparams):
        """Filter the source batch, then one IQL step on kept source + target (DVDF step 5)."""
        h, sql_advantage, score, keep = filter_source(source_batch, frozen, hparams)
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
                return gaussian_actor_loss(mean, log_std, batch.actions, weight, mask)
            return deterministic_actor_loss(mean, batch.actions, weight, mask)

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        losses = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": actor_loss,
                  "advantage_mean": masked_mean(advantage, mask), "q_mean": q_mean,
                  "weight_mean": masked_mean(weight, mask)}
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
            state, losses, sums = update(runner.state, source_batch, target_batch, labels, frozen, hparams)
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


# ---------------------------------------------------------------- stage 2: the scorer (as igdf_scorer.py)
class ScorerRunner(NamedTuple):
    """One seed's whole scorer training state; many seeds stack it along a leading axis."""
    state: TrainState
    rng: jax.Array


class ScorerData(NamedTuple):
    target_observations: jax.Array  # [N_t, obs_dim] target transitions: the positives and the rows
    target_actions: jax.Array  # [N_t, act_dim]
    target_next_observations: jax.Array  # [N_t, obs_dim]
    source_next_observations: jax.Array  # [N_s, obs_dim] source next states: the shared negatives


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


def scorer_stage(args: Args, source, target, obs_dim: int, act_dim: int) -> tuple[dict, dict]:
    """Stage 2: the frozen scorer, from --scorer-artifact, the cache, or trained now (on the first seed's target
    subsample, as igdf_scorer.py's seed --seed) and cached; with its held-out separation."""
    target_fingerprint = fingerprint(dataset_arrays(target))
    if args.scorer_artifact:
        params, info = read_artifact(args.scorer_artifact, "scorer", "--scorer-artifact", obs_dim, act_dim)
        if info.get("source_fingerprint") != fingerprint(dataset_arrays(source)) or \
                (info.get("target_fingerprints") or [None])[0] != target_fingerprint:
            print("note: --scorer-artifact was trained on other source or target data than this run's first seed.")
        return params, info | {"origin": "artifact"}
    info = {"kind": "scorer", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "target_fingerprints": [target_fingerprint], "obs_dim": obs_dim, "act_dim": act_dim,
            "steps": args.scorer_steps, "batch_size": args.scorer_batch_size, "lr": args.lr,
            "hidden": list(args.hidden), "repr_dim": args.repr_dim, "holdout_fraction": args.holdout_fraction,
            "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "scorer", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "scorer", info)
    source_train, source_held = holdout_split(source.size, args.holdout_fraction, SOURCE_HOLDOUT_SEED)
    target_train, target_held = holdout_split(target.size, args.holdout_fraction, args.seed)
    data = ScorerData(target.observations[target_train][None], target.actions[target_train][None],
                      target.next_observations[target_train][None], source.next_observations[source_train])
    init, train = make_scorer_train(tuple(args.hidden), args.repr_dim, args.lr, args.scorer_batch_size,
                                    obs_dim, act_dim)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage 2/3: scorer {args.source}->{args.target}", path, runner,
        train, (0, ScorerData(0, 0, 0, None)), (jax.device_put(data),), args.scorer_steps)
    separation = held_out_separation(make_score_fn(tuple(args.hidden), args.repr_dim), runner.state.params,
                                     tuple(x[None] for x in held_out(target, target_held)),
                                     held_out(source, source_held))
    print(f"scorer: held-out AUC of h (target above source) {separation['auc'][0]:.3f}, mean h target "
          f"{separation['target_score_mean'][0]:.3f} vs source {separation['source_score_mean'][0]:.3f}")
    artifact = {"scorer": serialization.to_state_dict(jax.device_get(runner.state.params))}
    info |= {"step": args.scorer_steps, "finished": True, "source": args.source, "target": args.target,
             "source_dataset": source.name, "source_size": source.size, "target_size": target.size,
             "source_held_out": len(source_held), "target_held_out": len(target_held), "separation": separation,
             "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


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


def grid_data(source, groups: dict, target_full, targets: list, references: dict) -> tuple[Data, dict]:
    """Stage 3's data on the device (the source with its metadata labels; one target subsample per seed, stacked),
    and its description for results.json."""
    data = jax.device_put(Data(
        source=to_transitions(source), source_groups=tuple(labels for _, labels in groups.values()),
        target=Transitions(*(np.stack(fields) for fields in zip(*(to_transitions(t) for t in targets))))))
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
def algo_name(args: Args) -> str:
    return "igdf" if set(args.lam) == {1.0} else "dvdf"


def stages_of(args: Args) -> list:
    """The stages main() runs, as the start block lists them: (name, steps[, runs])."""
    stages = [] if args.sql_artifact else [("sql", args.sql_steps)]
    stages += [] if args.scorer_artifact else [("scorer", args.scorer_steps)]
    return stages + [(algo_name(args), args.steps, len(args.lam) * len(args.xi) * args.num_seeds)]


def main(argv: Optional[list[str]] = None) -> dict:
    variant, argv = variant_script(argv, "--dynamics-score", {"ot": "dvdf_otdf"}, default="contrastive")
    if variant:
        return variant()  # DVDF-OTDF (algos/dvdf_otdf.py) with the other flags
    args = tyro.cli(Args, args=argv)
    check_common_flags(args)  # every flag's range, the stages', the batch halves' and --lam / --xi among them
    algo = algo_name(args)
    out, saved = open_run(args, default_out(args, algo, grid_level(args), shown=("lam", "xi")))
    start_block(args, argv, out, stages_of(args), saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = target_full.obs_dim, target_full.act_dim

    # stages 1 and 2: frozen, shared by every run of the grid
    start = time.perf_counter()
    sql_params, sql_info = sql_stage(args, source, obs_dim, act_dim)
    scorer_params, scorer_info = scorer_stage(args, source, targets[0], obs_dim, act_dim)
    stages = {"sql": sql_info, "scorer": scorer_info}
    stage_seconds = time.perf_counter() - start
    frozen = jax.device_put(Frozen(sql_params["critic"], sql_params["value"], scorer_params["scorer"]))

    data, data_info = grid_data(source, episode_groups(source), target_full, targets, references)
    group_names = data_info["source_groups"]

    # stage 3: the filtered IQL of every (lam, xi, seed) run at once
    settings, grid, hparams = make_grid(args, seeds)
    init, train = make_train(args, obs_dim, act_dim, sql_info["hidden"], scorer_info["hidden"],
                             scorer_info["repr_dim"], tuple((key, len(names)) for key, names in group_names.items()),
                             sql_info.get("layer_norm", False))
    results = train_grid(
        args, out, saved, algo=algo, stage=len(stages) + 1, grid=grid, settings=settings, init=init, train=train,
        inputs=(data, frozen, hparams), policy=make_policy(args, act_dim),
        ref_scores=(references["random"], references["expert"]),
        filter_stats=lambda sums, steps: filter_diagnostics(sums, group_names, steps, args.batch_size // 2),
        report=report, timing={"stage_seconds": stage_seconds}, header={"data": data_info, "stages": stages})
    print(f"{algo} {datasets_line(args)}, seeds {seeds}, after {results['step']} steps: "
          f"{settings_line(results['final'], 'final score')}; results in {out}")
    return results


if __name__ == "__main__":
    main()
