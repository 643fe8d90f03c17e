"""BOSA: supported policy and value optimisation for cross-domain offline RL, on TD3, many seeds at once.

Liu, Jinxin et al., "Beyond OOD State Actions: Supported Cross-Domain Offline Reinforcement Learning", AAAI 2024,
arXiv:2306.12755, in the form of the ODRL benchmark's offline-offline BOSA (a TD3 backbone; its configuration:
VAEs of hidden width 750 trained with lr 1e-3 and beta 0.5, a 5-model dynamics ensemble, lambda_policy 0.1,
epsilon 0.01, conservation 0.1), a baseline of the DVDF and V2A papers' tables.

    python algos/bosa.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/bosa.py ... --dynamics-data merged --dynamics-mask all     # ODRL's code on both choices below

Stage 1/2 (pre-training, cached): two conditional VAEs, each trained by ODRL's loss, mean squared reconstruction
error + beta * KL(q(z | c, x) || N(0, I)) (every term a mean over its elements):
    - the behaviour model beta(a | s) of the MERGED data (half source, half target per batch; latent 2 x act_dim,
      decoder tanh-squashed);
    - the target dynamics P_T(s' | s, a): an ensemble of --ensemble-size such models of s' given [s, a] (latent
      2 x obs_dim), each with its own initialisation, on the same TARGET batches.
Their density is the importance-sampled estimate (IWAE) with --num-samples samples z ~ q(z | c, x),
    log p(x | c) ~ log mean_z [ N(x; decoder(c, z), beta/4 I) N(z; 0, I) / q(z | c, x) ],
with the prior N(0, I) (ODRL's dynamics estimate once had a prior std of zeros, fixed later).
Stage 2/2, one TD3 step on B/2 source + B/2 target transitions (s, a, r, s', d), in the order the code runs it:
    1. Supported value optimisation: a source transition takes part in the TD loss only where every member of the
       ensemble finds its next state likely, min_e log P_T,e(s' | s, a) > log epsilon_dyna (ODRL's min over the
       ensemble; the estimate is drawn afresh every step, as ODRL's). Target transitions always take part
       (--dynamics-mask all masks them too, as ODRL's code does).
    2. --- Update Q: TD3's target y = r + discount (1 - d) min_k Q'_k(s', clip(pi'(s') + clip(N(0, 0.2^2), -0.5,
       0.5), -1, 1)); loss = 0.5 sum_k mean_i mask_i (Q_k(s_i, a_i) - y_i)^2 + conservation sum_k mean_source Q_k,
       the second term ODRL's conservative push-down of the value of source actions.
    3. --- Update actor, every --policy-freq steps, with supported policy optimisation (SPOT's form):
       loss = -mean Q_1(s, pi(s)) / mean |Q_1(s, pi(s))| + lambda_policy * penalty(log beta(pi(s) | s)), where Q is
       normalised by its batch mean magnitude (a constant for the gradient) so that lambda_policy weighs the
       support term against a unit-scale value term. penalty: --support-penalty lagrangian (ODRL and SPOT: -log
       beta, the Lagrangian of the constraint log beta >= log epsilon_policy with a fixed multiplier, in which
       epsilon_policy is a constant and drops out) or hinge (max(0, log epsilon_policy - log beta): penalised only
       where the density falls below the threshold). Then the target actor and critics, Polyak with tau.
    Evaluation action: pi(s) = tanh(mu(s)).
Choices and departures, each stated: the dynamics ensemble learns from target data (the issue's and the paper's
reading; ODRL's code trains it on the merged batches, --dynamics-data merged); ODRL's config also carries
lamda_dyna = 0.1 and epsilon_policy_exp = 0.01, which its code never reads (the value side's weight it does use is
conservation_coef = 0.1, --conservation here; epsilon_policy is used by --support-penalty hinge only); ODRL counts
each VAE iteration twice, so its 100,000-iteration phase trains the VAEs 50,000 steps, here --vae-steps exactly;
flax's default initialisation replaces ODRL's ensemble layers' N(0, 1) weights; the actor's gradient is computed
every step and applied on every --policy-freq-th (vmapped programs compute both branches of a condition anyway).
The VAEs are trained once with --seed on the source data and the first seed's target subsample and cached under
--cache-dir (keyed by the datasets' fingerprints and the stage's flags, envs/run.py). Seed k of an N-seed run draws
its own target subsample with seed --seed + k and equals the 1-seed run with --seed <seed + k> given the same stage.

Outputs in --out (default runs/bosa/<source>_to_<target>-<quality>/seed<seed>[-<hash>]), as envs/run.py describes;
results.json adds "stages" ({"vae": where it came from, its final losses}) and "support" (the share of source and
target transitions the dynamics ensemble supports at --epsilon-dyna, and the mean log-densities of both models).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

# `python algos/bosa.py` puts algos/ on the path, not the repository root that holds envs/.
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

from envs import evaluate, reference_info
from envs.run import (CrossDomainArgs, cached_stage, check_common_flags, dataset_arrays, datasets_line, default_out,
                      evaluation_entry, fingerprint, load_source_target, need, open_run, run_stage, save_stage,
                      scan_chunk, stage_path, start_block, train_loop, value_bound_of)


@dataclass
class Args(CrossDomainArgs):
    # envs.run.CrossDomainArgs' flags come first (experiment, data, training and evaluation: --seed to --eval-episodes)
    cache_dir: str = "runs/cache"
    """where the VAE stage is cached, keyed by everything it depends on"""
    # --- optimisation ---
    batch_size: int = 256
    """transitions per TD3 step, half source and half target (ODRL's 128 + 128)"""
    lr: float = 3e-4
    """Adam learning rate of the actor and the critics"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of the actor and the critics"""
    # --- TD3 ---
    discount: float = 0.99
    """discount factor; bootstraps through time limits, not through terminals"""
    tau: float = 0.005
    """Polyak rate of the target actor and critics"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    policy_freq: int = 2
    """critic steps per actor (and target) update"""
    # --- BOSA ---
    lambda_policy: float = 0.1
    """weight of the support penalty on the actor (ODRL's lamda_policy)"""
    support_penalty: Literal["lagrangian", "hinge"] = "lagrangian"
    """the actor's penalty: -log beta(pi(s)|s) (ODRL, SPOT) or max(0, log epsilon_policy - log beta(pi(s)|s))"""
    epsilon_policy: float = 0.01
    """density threshold of the behaviour support, used by --support-penalty hinge"""
    epsilon_dyna: float = 0.01
    """density threshold of the target dynamics' support: a transition is supported where min_e log P_T,e(s'|s,a)
    > log epsilon_dyna (ODRL's epsilon_dyna_exp)"""
    dynamics_mask: Literal["source", "all"] = "source"
    """mask source transitions only (target ones always take part), or every transition (ODRL's code)"""
    conservation: float = 0.1
    """weight of the mean Q of source transitions added to the critic loss (ODRL's conservation_coef)"""
    num_samples: int = 1
    """samples z of the importance-sampled density estimates (ODRL's num_samples)"""
    # --- stage 1: the behaviour VAE and the dynamics ensemble ---
    vae_steps: int = 100_000
    """gradient steps of both VAEs"""
    vae_batch_size: int = 256
    """transitions per VAE step: the behaviour VAE's half source, half target; the dynamics' all target (or the
    same merged batch with --dynamics-data merged)"""
    vae_lr: float = 1e-3
    """Adam learning rate of both VAEs"""
    vae_hidden: tuple[int, ...] = (750, 750)
    """hidden layer widths of the VAEs' encoders and decoders"""
    vae_beta: float = 0.5
    """KL weight of the VAE loss; the density estimates' decoder variance is vae_beta / 4 (ODRL)"""
    ensemble_size: int = 5
    """models in the dynamics ensemble"""
    dynamics_data: Literal["target", "merged"] = "target"
    """what the dynamics ensemble learns from: target transitions, or the merged batches (ODRL's code)"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds (Actor's Gaussian)
VAE_LOG_STD_MIN, VAE_LOG_STD_MAX = -4.0, 15.0  # ODRL's clamp of the encoders' log-std
CACHE_VERSION = 1  # part of the VAE stage's cache key: bump it when the stage's computation changes
SUPPORT_SAMPLE = 10_000  # source transitions (at most) the support summary of results.json is measured on


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


class CVAE(nn.Module):
    """A conditional VAE of x given c: encoder q(z | c, x) = N(mean, std^2), decoder mean d(c, z).

    noise [S, B, latent] standard normal (S samples per transition) -> (decoded [S, B, out_dim], mean [B, latent],
    std [B, latent], z [S, B, latent]) with z = mean + std * noise.
    """
    hidden: tuple[int, ...]
    latent_dim: int
    out_dim: int
    squash: bool  # tanh on the decoder (actions in [-1, 1])

    @nn.compact
    def __call__(self, condition, x, noise):
        stats = MLP(self.hidden, 2 * self.latent_dim, name="encoder")(jnp.concatenate([condition, x], axis=-1))
        mean, log_std = jnp.split(stats, 2, axis=-1)  # two linear heads on the encoder's trunk
        std = jnp.exp(jnp.clip(log_std, VAE_LOG_STD_MIN, VAE_LOG_STD_MAX))
        z = mean + std * noise
        condition = jnp.broadcast_to(condition, z.shape[:-1] + condition.shape[-1:])
        decoded = MLP(self.hidden, self.out_dim, name="decoder")(jnp.concatenate([condition, z], axis=-1))
        return (jnp.tanh(decoded) if self.squash else decoded), mean, std, z


class DynamicsEnsemble(nn.Module):
    """ensemble_size CVAEs of s' given [s, a], one batch for all: noise [E, S, B, latent], every output gains E."""
    hidden: tuple[int, ...]
    latent_dim: int
    obs_dim: int
    ensemble_size: int

    @nn.compact
    def __call__(self, obs_action, next_obs, noise):
        ensemble = nn.vmap(CVAE, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(None, None, 0), out_axes=0, axis_size=self.ensemble_size)
        return ensemble(self.hidden, self.latent_dim, self.obs_dim, False)(obs_action, next_obs, noise)


# ---------------------------------------------------------------- train state and data
class TD3State(NamedTuple):
    actor: TrainState
    actor_target_params: Any
    critic: TrainState
    critic_target_params: Any


class Runner(NamedTuple):
    """One seed's whole training state; many seeds stack it along a leading axis."""
    state: TD3State
    rng: jax.Array


class Transitions(NamedTuple):
    observations: jax.Array  # [N, obs_dim]
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N]
    next_observations: jax.Array  # [N, obs_dim]
    terminals: jax.Array  # [N], 1.0 on true termination only (bootstrap through time limits)


class Data(NamedTuple):
    source: Transitions  # shared by every seed
    target: Transitions  # one subsample per seed, stacked along a leading seed axis


class Frozen(NamedTuple):
    """The pre-trained VAEs, shared by every seed and never trained here."""
    behaviour: Any
    dynamics: Any


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    lambda_policy: jax.Array
    epsilon_dyna: jax.Array
    conservation: jax.Array


# ---------------------------------------------------------------- densities of the VAEs
def gaussian_log_density(x, mean, std):
    """log N(x; mean, diag(std^2)), summed over the last axis (arguments broadcast)."""
    return (-0.5 * ((x - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)


def vae_loss(decoded, x, mean, std, beta):
    """ODRL's VAE loss: mean squared reconstruction error + beta * KL(N(mean, std^2) || N(0, I)), each a mean over
    all its elements (the KL per latent element: -0.5 (1 + log std^2 - mean^2 - std^2))."""
    kl = -0.5 * (1.0 + 2.0 * jnp.log(std) - mean**2 - std**2)
    return ((decoded - x) ** 2).mean() + beta * kl.mean()


def log_likelihood_estimate(x, decoded, mean, std, z, beta):
    """Importance-sampled log p(x | c) of one CVAE: log mean_s exp(log N(x; d(c, z_s), beta/4 I) + log N(z_s; 0, I)
    - log q(z_s | c, x)), z_s ~ q. x: [B, D]; decoded: [S, B, D]; mean, std: [B, L]; z: [S, B, L] -> [B].

    The prior is N(0, I): ODRL's dynamics estimate once used a prior std of zeros (a density of 0, log -inf).
    """
    chex.assert_equal_shape([decoded[0], x])
    chex.assert_equal_shape([z[0], mean, std])
    decoder_std = jnp.sqrt(beta / 4.0)
    log_weights = (gaussian_log_density(x, decoded, decoder_std) + gaussian_log_density(z, 0.0, 1.0)
                   - gaussian_log_density(z, mean, std))
    return jax.nn.logsumexp(log_weights, axis=0) - jnp.log(z.shape[0])


# ---------------------------------------------------------------- BOSA: supported value and policy optimisation
def dynamics_support_mask(log_likelihood, epsilon):
    """1.0 where every ensemble member finds the transition likely, min_e log P_e(s'|s,a) > log epsilon, else 0.0:
    [E, B] -> [B] (supported value optimisation, ODRL's min over the ensemble)."""
    return (log_likelihood.min(0) > jnp.log(epsilon)).astype(jnp.float32)


def critic_loss(q, target, weight):
    """Sum over the two critics of mean_i weight_i (Q_k(s_i, a_i) - y_i)^2 (IQL eq. 6).

    q: [2, B]; target, weight: [B]. weight is 1 for plain IQL; DVDF/IGDF pass exp(h) per source sample.
    """
    per_sample = ((q - target) ** 2).sum(0)
    chex.assert_equal_shape([weight, per_sample])  # a [B, 1] weight would broadcast to [B, B] (IGDF's bug)
    return (weight * per_sample).mean()


def supported_critic_loss(q, target, mask, source_q, conservation):
    """0.5 sum_k mean_i mask_i (Q_k(s_i, a_i) - y_i)^2 + conservation sum_k mean_source Q_k (ODRL's BOSA critic).

    q: [2, B] over the whole batch, target and mask [B]: a masked transition adds 0 to the mean over all B (ODRL's
    mean, not a mean over the supported ones); source_q: [2, B_source], the critics on the source transitions.
    """
    return critic_loss(q, target, 0.5 * mask) + conservation * source_q.mean(-1).sum()


def supported_actor_loss(q, log_beta, lambda_policy, epsilon, penalty: str):
    """-mean Q(s, pi(s)) / mean |Q| + lambda_policy * mean penalty(log beta(pi(s)|s)) (SPOT's normalised form).

    q, log_beta: [B]. The normaliser mean |Q| is a constant for the gradient. penalty "lagrangian": -log beta;
    "hinge": max(0, log epsilon - log beta), zero where pi(s) lies inside the support.
    """
    chex.assert_equal_shape([q, log_beta])
    support = -log_beta if penalty == "lagrangian" else jnp.maximum(jnp.log(epsilon) - log_beta, 0.0)
    return -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean()) + lambda_policy * support.mean()


# ---------------------------------------------------------------- stage 2: TD3 with supported value and policy
def make_train(args: Args, obs_dim: int, act_dim: int, vae_hidden, vae_beta: float, ensemble_size: int):
    """Returns init(rng) -> Runner and train(runner, data, frozen, hparams, num_steps) -> (runner, chunk metrics).

    Pure functions of one seed; main() runs them as jax.jit(jax.vmap(...)) over seeds, the source data and the frozen
    VAEs shared, the target subsample per seed.
    """
    actor_net, critic_net = Actor(act_dim, args.hidden), TwinCritic(args.hidden)
    behaviour_net = CVAE(tuple(vae_hidden), 2 * act_dim, act_dim, squash=True)
    dynamics_net = DynamicsEnsemble(tuple(vae_hidden), 2 * obs_dim, obs_dim, ensemble_size)
    source_size = args.batch_size // 2
    target_size = args.batch_size - source_size

    def init(rng) -> Runner:
        rng, actor_key, critic_key = jax.random.split(rng, 3)
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        actor_params, critic_params = actor_net.init(actor_key, obs), critic_net.init(critic_key, obs, action)
        state = TD3State(
            actor=TrainState.create(apply_fn=actor_net.apply, params=actor_params, tx=optax.adam(args.lr)),
            actor_target_params=jax.tree.map(jnp.copy, actor_params),
            critic=TrainState.create(apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(args.lr)),
            critic_target_params=jax.tree.map(jnp.copy, critic_params))
        return Runner(state, rng)

    def dynamics_log_likelihood(params, batch: Transitions, key):
        """[E, B]: each ensemble member's estimate of log P_T(s' | s, a)."""
        noise = jax.random.normal(key, (ensemble_size, args.num_samples, batch.rewards.shape[0], 2 * obs_dim))
        decoded, mean, std, z = dynamics_net.apply(
            params, jnp.concatenate([batch.observations, batch.actions], -1), batch.next_observations, noise)
        return jax.vmap(log_likelihood_estimate, in_axes=(None, 0, 0, 0, 0, None))(
            batch.next_observations, decoded, mean, std, z, vae_beta)

    def update(state: TD3State, batch: Transitions, frozen: Frozen, hparams: Hyperparams, key):
        """One TD3 step on [source batch, target batch]: the support mask, Q, then (every policy_freq) the actor."""
        frozen = jax.lax.stop_gradient(frozen)
        dynamics_key, smoothing_key, behaviour_key = jax.random.split(key, 3)

        # 1. supported value optimisation: the target dynamics' support of each transition
        supported = dynamics_support_mask(dynamics_log_likelihood(frozen.dynamics, batch, dynamics_key),
                                          hparams.epsilon_dyna)
        mask = supported if args.dynamics_mask == "all" else supported.at[source_size:].set(1.0)

        # --- Update Q: TD3's target with target policy smoothing, on the supported transitions
        smoothing = jnp.clip(args.policy_noise * jax.random.normal(smoothing_key, batch.actions.shape),
                             -args.noise_clip, args.noise_clip)
        next_actions = jnp.clip(actor_net.apply(state.actor_target_params, batch.next_observations)[0] + smoothing,
                                -1.0, 1.0)
        next_q = critic_net.apply(state.critic_target_params, batch.next_observations, next_actions).min(0)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_q

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return supported_critic_loss(q, target, mask, q[:, :source_size], hparams.conservation), q.mean()

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # --- Update actor: supported policy optimisation, with the critic just updated
        def actor_loss_fn(params):
            actions = actor_net.apply(params, batch.observations)[0]
            q = critic_net.apply(critic.params, batch.observations, actions)[0]
            noise = jax.random.normal(behaviour_key, (args.num_samples, actions.shape[0], 2 * act_dim))
            decoded, mean, std, z = behaviour_net.apply(frozen.behaviour, batch.observations, actions, noise)
            log_beta = log_likelihood_estimate(actions, decoded, mean, std, z, vae_beta)
            loss = supported_actor_loss(q, log_beta, hparams.lambda_policy, args.epsilon_policy, args.support_penalty)
            return loss, log_beta.mean()

        (actor_loss, log_beta_mean), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor_step = critic.step % args.policy_freq == 0  # critic.step counts this step: 1, 2, ...

        def on_actor_step(new, old):
            return jax.tree.map(lambda n, o: jnp.where(actor_step, n, o), new, old)

        actor = on_actor_step(state.actor.apply_gradients(grads=grads), state.actor)
        actor_target_params = on_actor_step(
            optax.incremental_update(actor.params, state.actor_target_params, args.tau), state.actor_target_params)
        critic_target_params = on_actor_step(
            optax.incremental_update(critic.params, state.critic_target_params, args.tau), state.critic_target_params)

        metrics = {"critic_loss": q_loss, "actor_loss": actor_loss, "q_mean": q_mean, "log_beta_mean": log_beta_mean,
                   "source_supported": supported[:source_size].mean(),
                   "target_supported": supported[source_size:].mean()}
        return TD3State(actor, actor_target_params, critic, critic_target_params), metrics

    def train(runner: Runner, data: Data, frozen: Frozen, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""

        def step(runner: Runner, _):
            rng, batch_key, update_key = jax.random.split(runner.rng, 3)
            source_key, target_key = jax.random.split(batch_key)
            source_indices = jax.random.randint(source_key, (source_size,), 0, data.source.rewards.shape[0])
            target_indices = jax.random.randint(target_key, (target_size,), 0, data.target.rewards.shape[0])
            batch = jax.tree.map(lambda s, t: jnp.concatenate([s[source_indices], t[target_indices]]),
                                 data.source, data.target)
            state, metrics = update(runner.state, batch, frozen, hparams, update_key)
            return Runner(state, rng), metrics

        return scan_chunk(step, runner, num_steps)

    return init, train


def make_policy(args: Args, act_dim: int):
    """The deterministic evaluation action pi(s) = tanh(mu(s)), for one seed's actor parameters."""
    actor_net = Actor(act_dim, args.hidden)

    def policy(actor_params, obs):
        return actor_net.apply(actor_params, obs)[0]

    return policy


# ---------------------------------------------------------------- stage 1: the behaviour VAE and the dynamics ensemble
class VAERunner(NamedTuple):
    behaviour: TrainState
    dynamics: TrainState
    rng: jax.Array


def make_vae_train(hidden, lr: float, batch_size: int, beta: float, ensemble_size: int, dynamics_data: str,
                   obs_dim: int, act_dim: int):
    """init(rng) -> VAERunner and train(runner, source, target, num_steps): both VAEs, one step each per step."""
    behaviour_net = CVAE(hidden, 2 * act_dim, act_dim, squash=True)
    dynamics_net = DynamicsEnsemble(hidden, 2 * obs_dim, obs_dim, ensemble_size)
    half = batch_size // 2

    def init(rng) -> VAERunner:
        rng, behaviour_key, dynamics_key = jax.random.split(rng, 3)
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        behaviour = behaviour_net.init(behaviour_key, obs, action, jnp.zeros((1, 1, 2 * act_dim)))
        dynamics = dynamics_net.init(dynamics_key, jnp.concatenate([obs, action], -1), obs,
                                     jnp.zeros((ensemble_size, 1, 1, 2 * obs_dim)))
        return VAERunner(TrainState.create(apply_fn=behaviour_net.apply, params=behaviour, tx=optax.adam(lr)),
                         TrainState.create(apply_fn=dynamics_net.apply, params=dynamics, tx=optax.adam(lr)), rng)

    def step(runner: VAERunner, source: Transitions, target: Transitions):
        rng, source_key, target_key, dynamics_key, behaviour_noise, dynamics_noise = jax.random.split(runner.rng, 6)
        source_indices = jax.random.randint(source_key, (half,), 0, source.rewards.shape[0])
        target_indices = jax.random.randint(target_key, (batch_size - half,), 0, target.rewards.shape[0])
        merged = jax.tree.map(lambda s, t: jnp.concatenate([s[source_indices], t[target_indices]]), source, target)
        dynamics_batch = merged
        if dynamics_data == "target":
            indices = jax.random.randint(dynamics_key, (batch_size,), 0, target.rewards.shape[0])
            dynamics_batch = jax.tree.map(lambda x: x[indices], target)

        def behaviour_loss_fn(params):
            noise = jax.random.normal(behaviour_noise, (1, batch_size, 2 * act_dim))
            decoded, mean, std, _ = behaviour_net.apply(params, merged.observations, merged.actions, noise)
            return vae_loss(decoded[0], merged.actions, mean, std, beta)

        def dynamics_loss_fn(params):
            noise = jax.random.normal(dynamics_noise, (ensemble_size, 1, batch_size, 2 * obs_dim))
            obs_action = jnp.concatenate([dynamics_batch.observations, dynamics_batch.actions], -1)
            decoded, mean, std, _ = dynamics_net.apply(params, obs_action, dynamics_batch.next_observations, noise)
            return vae_loss(decoded[:, 0], dynamics_batch.next_observations, mean, std, beta)

        behaviour_loss, behaviour_grads = jax.value_and_grad(behaviour_loss_fn)(runner.behaviour.params)
        dynamics_loss, dynamics_grads = jax.value_and_grad(dynamics_loss_fn)(runner.dynamics.params)
        metrics = {"behaviour_vae_loss": behaviour_loss, "dynamics_vae_loss": dynamics_loss}
        return VAERunner(runner.behaviour.apply_gradients(grads=behaviour_grads),
                         runner.dynamics.apply_gradients(grads=dynamics_grads), rng), metrics

    def train(runner: VAERunner, source: Transitions, target: Transitions, num_steps: int):
        return scan_chunk(lambda r, _: step(r, source, target), runner, num_steps)

    return init, train


def vae_stage(args: Args, source, target, obs_dim: int, act_dim: int) -> tuple[dict, dict]:
    """Stage 1: both VAEs, from the cache or trained now (with --seed, on the first seed's target subsample) and
    cached."""
    info = {"kind": "bosa_vae", "version": CACHE_VERSION, "source_fingerprint": fingerprint(dataset_arrays(source)),
            "target_fingerprints": [fingerprint(dataset_arrays(target))], "obs_dim": obs_dim, "act_dim": act_dim,
            "steps": args.vae_steps, "batch_size": args.vae_batch_size, "lr": args.vae_lr,
            "hidden": list(args.vae_hidden), "beta": args.vae_beta, "ensemble_size": args.ensemble_size,
            "dynamics_data": args.dynamics_data, "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "bosa_vae", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "bosa_vae", info)
    init, train = make_vae_train(tuple(args.vae_hidden), args.vae_lr, args.vae_batch_size, args.vae_beta,
                                 args.ensemble_size, args.dynamics_data, obs_dim, act_dim)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage 1/2: behaviour VAE and dynamics ensemble {args.source}->{args.target}", path, runner, train,
        (0, None, None), (jax.device_put(to_transitions(source)), jax.device_put(to_transitions(target))),
        args.vae_steps)
    host = jax.device_get(runner)
    artifact = {"behaviour": serialization.to_state_dict(host.behaviour.params),
                "dynamics": serialization.to_state_dict(host.dynamics.params)}
    info |= {"step": args.vae_steps, "finished": True, "source": args.source, "target": args.target,
             "source_dataset": source.name, "source_size": source.size, "target_size": target.size,
             "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


def support_summary(args: Args, frozen: Frozen, vae_info: dict, source, target, obs_dim: int, act_dim: int) -> dict:
    """The share of (at most SUPPORT_SAMPLE) source and of the first seed's target transitions that the dynamics
    ensemble supports at --epsilon-dyna, and both models' mean log-density estimates on the data."""
    behaviour_net = CVAE(tuple(vae_info["hidden"]), 2 * act_dim, act_dim, squash=True)
    dynamics_net = DynamicsEnsemble(tuple(vae_info["hidden"]), 2 * obs_dim, obs_dim, vae_info["ensemble_size"])
    rng = np.random.default_rng(args.seed)
    indices = np.sort(rng.choice(source.size, min(source.size, SUPPORT_SAMPLE), replace=False))

    @jax.jit
    def densities(obs, actions, next_obs, key):
        dynamics_key, behaviour_key = jax.random.split(key)
        n = obs.shape[0]
        noise = jax.random.normal(dynamics_key, (vae_info["ensemble_size"], args.num_samples, n, 2 * obs_dim))
        decoded, mean, std, z = dynamics_net.apply(frozen.dynamics, jnp.concatenate([obs, actions], -1), next_obs,
                                                   noise)
        dynamics = jax.vmap(log_likelihood_estimate, in_axes=(None, 0, 0, 0, 0, None))(
            next_obs, decoded, mean, std, z, vae_info["beta"])
        noise = jax.random.normal(behaviour_key, (args.num_samples, n, 2 * act_dim))
        behaviour = log_likelihood_estimate(actions, *behaviour_net.apply(frozen.behaviour, obs, actions, noise),
                                            vae_info["beta"])
        return dynamics_support_mask(dynamics, args.epsilon_dyna).mean(), dynamics.min(0).mean(), behaviour.mean()

    summary = {}
    for name, (obs, actions, next_obs) in {
            "source": (source.observations[indices], source.actions[indices], source.next_observations[indices]),
            "target": (target.observations, target.actions, target.next_observations)}.items():
        supported, dynamics, behaviour = densities(obs, actions, next_obs, jax.random.PRNGKey(args.seed))
        summary[name] = {"supported": float(supported), "dynamics_log_likelihood_mean": float(dynamics),
                         "behaviour_log_likelihood_mean": float(behaviour), "transitions": int(obs.shape[0])}
    return summary


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    for flag in ("batch_size", "vae_batch_size"):
        need(getattr(args, flag) >= 2 and getattr(args, flag) % 2 == 0,
             f"--{flag.replace('_', '-')} must be even and at least 2 (half source, half target), got "
             f"{getattr(args, flag)}.")
    for flag in ("vae_steps", "policy_freq", "ensemble_size"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    need(len(args.vae_hidden) >= 1 and min(args.vae_hidden) >= 1,
         f"--vae-hidden must be one or more positive layer widths, got {args.vae_hidden}.")
    for flag in ("vae_lr", "vae_beta", "epsilon_policy", "epsilon_dyna"):
        need(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    for flag in ("lambda_policy", "conservation", "policy_noise", "noise_clip"):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}.")


def to_transitions(dataset) -> Transitions:
    return Transitions(observations=dataset.observations, actions=dataset.actions, rewards=dataset.rewards,
                       next_observations=dataset.next_observations, terminals=dataset.terminals)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, "bosa"))
    start_block(args, argv, out, [("bosa_vae", args.vae_steps), ("bosa", args.steps, args.num_seeds)], saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = target_full.obs_dim, target_full.act_dim

    start = time.perf_counter()
    vae_params, vae_info = vae_stage(args, source, targets[0], obs_dim, act_dim)
    frozen = jax.device_put(Frozen(vae_params["behaviour"], vae_params["dynamics"]))
    support = support_summary(args, frozen, vae_info, source, targets[0], obs_dim, act_dim)
    print(f"dynamics support at epsilon {args.epsilon_dyna:g}: {support['source']['supported']:.1%} of source and "
          f"{support['target']['supported']:.1%} of target transitions")
    stage_seconds = time.perf_counter() - start

    data = jax.device_put(Data(source=to_transitions(source), target=Transitions(
        *(np.stack(fields) for fields in zip(*(to_transitions(t) for t in targets))))))
    data_info = {"source_dataset": source.name, "source_size": source.size, "target_dataset": target_full.name,
                 "target_full_size": target_full.size, "target_size": targets[0].size,
                 "ref_min_score": references["random"], "ref_max_score": references["expert"],
                 "references": references["source"]}
    init, train = make_train(args, obs_dim, act_dim, vae_info["hidden"], vae_info["beta"], vae_info["ensemble_size"])
    policy, ref_scores = make_policy(args, act_dim), (references["random"], references["expert"])
    hparams = Hyperparams(*(jnp.full(args.num_seeds, value, jnp.float32)
                            for value in (args.lambda_policy, args.epsilon_dyna, args.conservation)))

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        result = evaluate(policy, runner.state.actor.params, args.target, num_episodes=args.eval_episodes,
                          seed=args.seed + step, ref_scores=ref_scores, physics=args.physics)
        return evaluation_entry(step, result, metrics)

    def report(step: int, entry: dict, metrics) -> tuple[str, str]:
        return f"score={entry['score_mean']:.1f}", (
            f"step {step}: score {entry['score_mean']:.1f} +- {entry['score_std']:.1f}, return "
            f"{entry['return_mean']:.1f}, critic loss {float(np.mean(metrics['critic_loss'])):.3g}, source supported "
            f"{float(np.mean(metrics['source_supported'])):.1%}")

    rewards = np.concatenate([source.rewards, targets[0].rewards])
    results = train_loop(args, out, saved, algo="bosa", title=f"stage 2/2: bosa {args.target} x{args.num_seeds}",
                         init=init, keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train,
                         inputs=(data, frozen, hparams), in_axes=(Data(None, 0), None, 0), evaluate=evaluate_chunk,
                         report=report, value_bound=value_bound_of(rewards, args.discount),
                         timing={"stage_seconds": stage_seconds},
                         advice="try a smaller --lr or a larger --conservation",
                         header={"data": data_info, "stages": {"vae": vae_info}, "support": support})
    final = results["final"]
    print(f"bosa {datasets_line(args)}, seeds {seeds}: final score {final['score_mean']:.1f} +- "
          f"{final['score_std']:.1f} after {results['step']} steps; results in {out}")
    return results


if __name__ == "__main__":
    main()
