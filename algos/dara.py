"""DARA: dynamics-aware reward augmentation for cross-domain offline RL, on IQL, many seeds at once.

Liu, Zhang and Wang, "DARA: Dynamics-Aware Reward Augmentation in Offline Reinforcement Learning", ICLR 2022,
arXiv:2203.06662, in the form of the ODRL benchmark's offline-offline DARA (its configuration: eta 0.1, classifier
input noise std 1.0, the correction clipped to [-10, 10], IQL with expectile 0.7 and temperature 3.0), a baseline of
the DVDF and V2A papers' tables.

    python algos/dara.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/dara.py ... --eta 0.3                   # a stronger correction

The method, in the order the code runs it:
    1. Two domain classifiers, q_sas(domain | s, a, s') and q_sa(domain | s, a), each an MLP with two logits
       (source = 0, target = 1), are trained to tell source from target transitions by the cross-entropy of
       log_softmax(logits): one softmax, on raw logits (ODRL's DARA once applied a softmax to outputs that were
       already probabilities). Each step draws half source and half target transitions and adds N(0, noise_std^2)
       noise to each classifier's input, independently (ODRL's regularisation).
    2. The reward correction of a transition (DARA's delta_r, by Bayes' rule the log-ratio of the two dynamics, the
       class priors cancel between the classifiers):
           delta_r(s, a, s') = log q_sas(t | s,a,s') - log q_sas(s | s,a,s') - log q_sa(t | s,a) + log q_sa(s | s,a)
                             ~ log P_target(s' | s, a) - log P_source(s' | s, a),
       clipped to [-delta_r_clip, delta_r_clip]; it is <= 0 where a source transition is unlikely in the target.
    3. Source rewards become r + eta * delta_r (the paper's r - eta * (-delta_r)); target rewards stay r.
    4. IQL (expectile value, Q against the new V, Polyak targets, advantage-weighted regression) on batches of
       batch_size/2 source + batch_size/2 target transitions, exactly algos/iql.py --data merged otherwise: with
       --eta 0 a run equals iql.py's merged run of the same flags.

Choices (ODRL trains the classifiers inside the IQL loop, one classifier step per IQL step, and corrects each source
batch with the classifiers of that moment):
    - The classifiers are a pre-training stage (stage 1/2, --classifier-steps steps, batch --classifier-batch-size,
      Adam --lr, widths --hidden), trained once with --seed on the source data and the first seed's target
      subsample, and cached under --cache-dir (keyed by the datasets' fingerprints and the stage's flags, envs/run.py):
      the correction then comes from converged classifiers from the first IQL step on, and a sweep trains them once.
    - delta_r is computed once per source transition after the stage (noise-free, as ODRL scores its batches) and
      kept on the device beside the source data; eta multiplies it inside the step, so --eta is a traced value.
      With frozen classifiers this equals computing it on the fly, at no per-step cost.
Seed k of an N-seed run draws its own target subsample with seed --seed + k and equals the 1-seed run with --seed
<seed + k> given the same classifier stage. Evaluation: --eval-episodes episodes of tanh(mu(s)) per seed in the
target domain, normalised with its reference returns.

Outputs in --out (default runs/dara/<source>_to_<target>-<quality>/seed<seed>[-<hash>]), as envs/run.py describes;
results.json adds "stages" ({"classifier": where it came from, its final losses}) and "reward_correction" (delta_r
over the source dataset and over the first seed's target subsample: mean, std, min, max, and the share at the clip).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

# `python algos/dara.py` puts algos/ on the path, not the repository root that holds envs/.
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
                      scan_chunk, stage_path, start_block, train_loop)


@dataclass
class Args(CrossDomainArgs):
    # envs.run.CrossDomainArgs' flags come first (experiment, data, training and evaluation: --seed to --eval-episodes)
    cache_dir: str = "runs/cache"
    """where the classifier stage is cached, keyed by everything it depends on"""
    # --- optimisation ---
    batch_size: int = 256
    """transitions per IQL step, half source and half target (ODRL's 128 + 128)"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics, value and classifiers; the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every network (IQL's and the classifiers')"""
    # --- IQL ---
    discount: float = 0.99
    """discount factor; bootstraps through time limits, not through terminals"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    expectile: float = 0.7
    """expectile of the value loss, in (0, 1)"""
    temperature: float = 3.0
    """inverse temperature of the advantage weights exp(temperature * A)"""
    max_weight: float = 100.0
    """clip of the advantage weights"""
    actor: Literal["deterministic", "gaussian"] = "deterministic"
    """weighted squared error on tanh(mu(s)) (authors), or weighted Gaussian log-likelihood (original IQL)"""
    # --- DARA ---
    eta: float = 0.1
    """weight of the reward correction: source rewards become r + eta * delta_r (ODRL's 0.1)"""
    delta_r_clip: float = 10.0
    """delta_r is clipped to [-delta_r_clip, delta_r_clip] (ODRL's 10, after the DARA paper)"""
    noise_std: float = 1.0
    """std of the Gaussian noise added to the classifiers' inputs in training (ODRL's 1.0); 0 turns it off"""
    # --- stage 1: the domain classifiers ---
    classifier_steps: int = 100_000
    """gradient steps of the classifiers"""
    classifier_batch_size: int = 256
    """transitions per classifier step, half source (label 0) and half target (label 1), as ODRL's 128 + 128"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds
CACHE_VERSION = 1  # part of the classifier stage's cache key: bump it when the stage's computation changes
SOURCE, TARGET = 0, 1  # the classifiers' labels: the index of each domain's logit


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


class DomainClassifiers(nn.Module):
    """DARA's two classifiers: (source, target) logits from [s, a, s'] (q_sas) and from [s, a] (q_sa), [B, 2] each."""
    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, sas, sa):
        return MLP(self.hidden, 2, name="q_sas")(sas), MLP(self.hidden, 2, name="q_sa")(sa)


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
    source: Transitions  # shared by every seed, with its raw rewards
    source_delta_r: jax.Array  # [N_source] the frozen classifiers' clipped delta_r of each source transition
    target: Transitions  # one subsample per seed, stacked along a leading seed axis


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array
    eta: jax.Array


# ---------------------------------------------------------------- DARA: the classifiers, delta_r, the augmented reward
def classifier_inputs(obs, actions, next_obs):
    """The inputs of q_sas and q_sa: [s, a, s'] and [s, a]."""
    return jnp.concatenate([obs, actions, next_obs], axis=-1), jnp.concatenate([obs, actions], axis=-1)


def classifier_loss(sas_logits, sa_logits, labels):
    """Cross-entropy of both classifiers, summed (ODRL's loss_sas + loss_sa), each a mean over the batch.

    sas_logits, sa_logits: [B, 2] raw logits; labels: [B] int, 0 source and 1 target. The one softmax is the
    log_softmax inside the cross-entropy (no softmax before it: ODRL's double-softmax bug).
    """
    chex.assert_equal_shape([sas_logits, sa_logits])
    chex.assert_shape(labels, sas_logits.shape[:1])
    return (optax.softmax_cross_entropy_with_integer_labels(sas_logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(sa_logits, labels).mean())


def reward_correction(sas_logits, sa_logits, clip):
    """delta_r = log q_sas(t|s,a,s') - log q_sas(s|s,a,s') - log q_sa(t|s,a) + log q_sa(s|s,a) per transition,
    clipped to [-clip, clip]: [B, 2] logits -> [B]."""
    log_sas, log_sa = jax.nn.log_softmax(sas_logits, axis=-1), jax.nn.log_softmax(sa_logits, axis=-1)
    delta_r = (log_sas[:, TARGET] - log_sas[:, SOURCE]) - (log_sa[:, TARGET] - log_sa[:, SOURCE])
    return jnp.clip(delta_r, -clip, clip)


def augmented_reward(rewards, delta_r, eta):
    """DARA's source reward r + eta * delta_r, per transition."""
    chex.assert_equal_shape([rewards, delta_r])
    return rewards + eta * delta_r


# ---------------------------------------------------------------- IQL losses
def expectile_loss(diff, expectile):
    """Per-sample asymmetric squared error |expectile - 1[diff < 0]| * diff^2 (IQL eq. 5)."""
    return jnp.where(diff < 0, 1.0 - expectile, expectile) * diff**2


def value_loss(v, target_q, expectile):
    """V loss on u = min(Q1', Q2')(s, a) - V(s) with the target critics; returns (loss, u), u is the advantage."""
    advantage = target_q - v
    return expectile_loss(advantage, expectile).mean(), advantage


def critic_loss(q, target, weight):
    """Sum over the two critics of mean_i weight_i (Q_k(s_i, a_i) - y_i)^2 (IQL eq. 6).

    q: [2, B]; target, weight: [B]. weight is 1 for plain IQL; DVDF/IGDF pass exp(h) per source sample.
    """
    per_sample = ((q - target) ** 2).sum(0)
    chex.assert_equal_shape([weight, per_sample])  # a [B, 1] weight would broadcast to [B, B] (IGDF's bug)
    return (weight * per_sample).mean()


def advantage_weight(advantage, temperature, max_weight):
    """min(exp(temperature * A), max_weight) (IQL eq. 7), a constant for the actor."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(temperature * advantage), max_weight))


def deterministic_actor_loss(mean, actions, weight):
    """Weighted behaviour cloning: mean over batch and action dims of weight * (tanh(mu(s)) - a)^2 (authors)."""
    per_sample = ((mean - actions) ** 2).mean(-1)
    chex.assert_equal_shape([weight, per_sample])
    return (weight * per_sample).mean()


def gaussian_actor_loss(mean, log_std, actions, weight):
    """Weighted negative log-likelihood of a under N(tanh(mu(s)), exp(log_std)^2), summed over action dims
    (the original IQL's policy extraction)."""
    log_prob = (-0.5 * ((actions - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)
    chex.assert_equal_shape([weight, log_prob])
    return -(weight * log_prob).mean()


# ---------------------------------------------------------------- stage 2: IQL on the augmented merged data
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns init(rng) -> Runner and train(runner, data, hparams, num_steps) -> (runner, chunk metrics).

    Pure functions of one seed; main() runs them as jax.jit(jax.vmap(...)) over seeds, the source data and its
    delta_r shared, the target subsample per seed. Initialisation and batch indices follow iql.py --data merged.
    """
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden), ValueNet(args.hidden)
    half = args.batch_size // 2

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

    def update(state: IQLState, batch: Transitions, hparams: Hyperparams):
        """One IQL step on the merged batch: V, then Q against the new V, then the target critics, then the actor."""
        # --- Update V: expectile regression towards the target critics' min (IQL eq. 5)
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return value_loss(value_net.apply(params, batch.observations), target_q, hparams.expectile)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # --- Update Q: y = r + discount (1 - d) V(s') with the value just updated (IQL eq. 6); r is augmented
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return critic_loss(q, target, jnp.ones_like(target)), q.mean()

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, args.tau)

        # --- Update actor: advantage-weighted regression with the advantage of the V step (IQL eq. 7)
        weight = advantage_weight(advantage, hparams.temperature, args.max_weight)

        def actor_loss_fn(params):
            mean, log_std = actor_net.apply(params, batch.observations)
            if args.actor == "gaussian":
                return gaussian_actor_loss(mean, log_std, batch.actions, weight)
            return deterministic_actor_loss(mean, batch.actions, weight)

        actor_loss, grads = jax.value_and_grad(actor_loss_fn)(state.actor.params)
        actor = state.actor.apply_gradients(grads=grads)

        metrics = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": actor_loss,
                   "advantage_mean": advantage.mean(), "q_mean": q_mean, "weight_mean": weight.mean()}
        return IQLState(actor, critic, critic_target_params, value), metrics

    def train(runner: Runner, data: Data, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""

        def step(runner: Runner, _):
            rng, batch_key = jax.random.split(runner.rng)
            source_key, target_key = jax.random.split(batch_key)
            source_indices = jax.random.randint(source_key, (half,), 0, data.source.rewards.shape[0])
            target_indices = jax.random.randint(target_key, (args.batch_size - half,), 0,
                                                data.target.rewards.shape[0])
            source_batch = jax.tree.map(lambda x: x[source_indices], data.source)
            delta_r = data.source_delta_r[source_indices]
            source_batch = source_batch._replace(rewards=augmented_reward(source_batch.rewards, delta_r, hparams.eta))
            target_batch = jax.tree.map(lambda x: x[target_indices], data.target)
            batch = jax.tree.map(lambda s, t: jnp.concatenate([s, t]), source_batch, target_batch)
            state, metrics = update(runner.state, batch, hparams)
            return Runner(state, rng), metrics | {"delta_r_mean": delta_r.mean()}

        return scan_chunk(step, runner, num_steps)

    return init, train


def make_policy(args: Args, act_dim: int):
    """The deterministic evaluation action tanh(mu(s)), for one seed's actor parameters."""
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")

    def policy(actor_params, obs):
        return actor_net.apply(actor_params, obs)[0]

    return policy


# ---------------------------------------------------------------- stage 1: the domain classifiers
class ClassifierRunner(NamedTuple):
    state: TrainState
    rng: jax.Array


def make_classifier_train(hidden, lr: float, batch_size: int, noise_std: float, obs_dim: int, act_dim: int):
    """init(rng) -> ClassifierRunner and train(runner, source, target, num_steps): source vs target, noisy inputs."""
    net = DomainClassifiers(hidden)
    half = batch_size // 2
    labels = jnp.concatenate([jnp.full(half, SOURCE), jnp.full(batch_size - half, TARGET)]).astype(jnp.int32)

    def init(rng) -> ClassifierRunner:
        rng, key = jax.random.split(rng)
        params = net.init(key, jnp.zeros((1, 2 * obs_dim + act_dim)), jnp.zeros((1, obs_dim + act_dim)))
        return ClassifierRunner(TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(lr)), rng)

    def step(runner: ClassifierRunner, source: Transitions, target: Transitions):
        rng, source_key, target_key, sas_key, sa_key = jax.random.split(runner.rng, 5)
        source_indices = jax.random.randint(source_key, (half,), 0, source.rewards.shape[0])
        target_indices = jax.random.randint(target_key, (batch_size - half,), 0, target.rewards.shape[0])
        batch = jax.tree.map(lambda s, t: jnp.concatenate([s[source_indices], t[target_indices]]), source, target)
        sas, sa = classifier_inputs(batch.observations, batch.actions, batch.next_observations)
        sas = sas + noise_std * jax.random.normal(sas_key, sas.shape)  # independent noise per classifier (ODRL)
        sa = sa + noise_std * jax.random.normal(sa_key, sa.shape)

        def loss_fn(params):
            sas_logits, sa_logits = net.apply(params, sas, sa)
            return classifier_loss(sas_logits, sa_logits, labels), (sas_logits, sa_logits)

        (loss, (sas_logits, sa_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(runner.state.params)
        metrics = {"classifier_loss": loss, "sas_accuracy": (sas_logits.argmax(-1) == labels).mean(),
                   "sa_accuracy": (sa_logits.argmax(-1) == labels).mean()}
        return ClassifierRunner(runner.state.apply_gradients(grads=grads), rng), metrics

    def train(runner: ClassifierRunner, source: Transitions, target: Transitions, num_steps: int):
        return scan_chunk(lambda r, _: step(r, source, target), runner, num_steps)

    return init, train


def make_delta_r_fn(hidden):
    """delta_r(params, obs, actions, next_obs, clip) -> [N]: the clipped correction of the noise-free classifiers."""
    net = DomainClassifiers(hidden)

    @jax.jit
    def delta_r(params, obs, actions, next_obs, clip):
        return reward_correction(*net.apply(params, *classifier_inputs(obs, actions, next_obs)), clip)

    return delta_r


def relabel(delta_r_fn, params, dataset, clip: float, chunk: int = 65_536) -> np.ndarray:
    """delta_r of every transition of a dataset, computed in chunks on the device."""
    parts = [delta_r_fn(params, dataset.observations[i:i + chunk], dataset.actions[i:i + chunk],
                        dataset.next_observations[i:i + chunk], clip) for i in range(0, dataset.size, chunk)]
    return np.concatenate([np.asarray(part) for part in parts]).astype(np.float32)


def correction_summary(delta_r: np.ndarray, clip: float) -> dict:
    return {"mean": float(delta_r.mean()), "std": float(delta_r.std()), "min": float(delta_r.min()),
            "max": float(delta_r.max()), "clipped_fraction": float((np.abs(delta_r) >= clip).mean())}


def classifier_stage(args: Args, source, target, obs_dim: int, act_dim: int) -> tuple[dict, dict]:
    """Stage 1: the classifiers, from the cache or trained now (with --seed, on the first seed's target subsample)
    and cached."""
    info = {"kind": "dara_classifier", "version": CACHE_VERSION,
            "source_fingerprint": fingerprint(dataset_arrays(source)),
            "target_fingerprints": [fingerprint(dataset_arrays(target))], "obs_dim": obs_dim, "act_dim": act_dim,
            "steps": args.classifier_steps, "batch_size": args.classifier_batch_size, "lr": args.lr,
            "hidden": list(args.hidden), "noise_std": args.noise_std, "seeds": [args.seed]}
    cached = cached_stage(args.cache_dir, "dara_classifier", info, obs_dim, act_dim)
    if cached is not None:
        return cached
    path = stage_path(args.cache_dir, "dara_classifier", info)
    init, train = make_classifier_train(tuple(args.hidden), args.lr, args.classifier_batch_size, args.noise_std,
                                        obs_dim, act_dim)
    runner = jax.jit(jax.vmap(init))(jax.random.PRNGKey(args.seed)[None])
    start = time.perf_counter()
    runner, metrics, partial_path = run_stage(
        f"stage 1/2: classifiers {args.source}->{args.target}", path, runner, train, (0, None, None),
        (jax.device_put(to_transitions(source)), jax.device_put(to_transitions(target))), args.classifier_steps)
    artifact = {"classifier": serialization.to_state_dict(jax.device_get(runner.state.params))}
    info |= {"step": args.classifier_steps, "finished": True, "source": args.source, "target": args.target,
             "source_dataset": source.name, "source_size": source.size, "target_size": target.size,
             "final_losses": metrics, "train_seconds": time.perf_counter() - start}
    return save_stage(path, partial_path, artifact, info)


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    for flag in ("batch_size", "classifier_batch_size"):
        need(getattr(args, flag) >= 2 and getattr(args, flag) % 2 == 0,
             f"--{flag.replace('_', '-')} must be even and at least 2 (half source, half target), got "
             f"{getattr(args, flag)}.")
    need(args.classifier_steps >= 1, f"--classifier-steps must be at least 1, got {args.classifier_steps}.")
    need(args.eta >= 0, f"--eta must be 0 or more, got {args.eta}.")
    need(args.delta_r_clip > 0, f"--delta-r-clip must be positive, got {args.delta_r_clip}.")
    need(args.noise_std >= 0, f"--noise-std must be 0 or more, got {args.noise_std}.")


def to_transitions(dataset) -> Transitions:
    return Transitions(observations=dataset.observations, actions=dataset.actions, rewards=dataset.rewards,
                       next_observations=dataset.next_observations, terminals=dataset.terminals)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, "dara"))
    start_block(args, argv, out, [("dara_classifier", args.classifier_steps), ("dara", args.steps, args.num_seeds)],
                saved)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    source, target_full, targets = load_source_target(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    obs_dim, act_dim = target_full.obs_dim, target_full.act_dim

    start = time.perf_counter()
    classifier, classifier_info = classifier_stage(args, source, targets[0], obs_dim, act_dim)
    delta_r_fn = make_delta_r_fn(tuple(classifier_info["hidden"]))
    source_delta_r = relabel(delta_r_fn, classifier["classifier"], source, args.delta_r_clip)
    target_delta_r = relabel(delta_r_fn, classifier["classifier"], targets[0], args.delta_r_clip)
    correction = {"source": correction_summary(source_delta_r, args.delta_r_clip),
                  "target": correction_summary(target_delta_r, args.delta_r_clip)}
    print(f"delta_r: mean over the source {correction['source']['mean']:.3f} (at the clip "
          f"{correction['source']['clipped_fraction']:.1%}), over the target {correction['target']['mean']:.3f}")
    stage_seconds = time.perf_counter() - start

    data = jax.device_put(Data(source=to_transitions(source), source_delta_r=source_delta_r,
                               target=Transitions(*(np.stack(f) for f in zip(*(to_transitions(t) for t in targets))))))
    data_info = {"source_dataset": source.name, "source_size": source.size, "target_dataset": target_full.name,
                 "target_full_size": target_full.size, "target_size": targets[0].size,
                 "ref_min_score": references["random"], "ref_max_score": references["expert"],
                 "references": references["source"]}
    init, train = make_train(args, obs_dim, act_dim)
    policy, ref_scores = make_policy(args, act_dim), (references["random"], references["expert"])
    hparams = Hyperparams(*(jnp.full(args.num_seeds, value, jnp.float32)
                            for value in (args.expectile, args.temperature, args.eta)))

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        result = evaluate(policy, runner.state.actor.params, args.target, num_episodes=args.eval_episodes,
                          seed=args.seed + step, ref_scores=ref_scores, physics=args.physics)
        return evaluation_entry(step, result, metrics)

    def report(step: int, entry: dict, metrics) -> tuple[str, str]:
        return f"score={entry['score_mean']:.1f}", (
            f"step {step}: score {entry['score_mean']:.1f} +- {entry['score_std']:.1f}, return "
            f"{entry['return_mean']:.1f}, critic loss {float(np.mean(metrics['critic_loss'])):.3g}")

    results = train_loop(args, out, saved, algo="dara", title=f"stage 2/2: dara {args.target} x{args.num_seeds}",
                         init=init, keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train,
                         inputs=(data, hparams), in_axes=(Data(None, None, 0), 0), evaluate=evaluate_chunk,
                         report=report, timing={"stage_seconds": stage_seconds},
                         header={"data": data_info, "stages": {"classifier": classifier_info},
                                 "reward_correction": correction},
                         advice="try a smaller --eta, --lr or --temperature")
    final = results["final"]
    print(f"dara {datasets_line(args)}, seeds {seeds}: final score {final['score_mean']:.1f} +- "
          f"{final['score_std']:.1f} after {results['step']} steps; results in {out}")
    return results


if __name__ == "__main__":
    main()
