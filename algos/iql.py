"""Implicit Q-Learning (IQL) for cross-domain offline RL, many seeds at once.

Kostrikov, Nair and Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022, arXiv:2110.06169,
in the form the IGDF / DVDF / V2A authors ran it: expectile 0.7, temperature 3.0, a deterministic actor trained by
advantage-weighted behaviour cloning with cosine learning-rate decay, batches of 128 source + 128 target
transitions, no state or reward normalisation. The original IQL's Gaussian log-likelihood actor
(`--actor gaussian`) and reward scaling (`--reward-scaling`), and CORL's state standardisation
(`--normalize-states`), are flags. It is the backbone of IGDF, DVDF and V2A,
and with `--data target` / `--data merged` the papers' two IQL baselines.

    python algos/iql.py --source halfcheetah-kinematic --target halfcheetah --quality medium --num-seeds 5
    python algos/iql.py --data target          # the "IQL on target data" baseline; --data merged: source + target
    python algos/iql.py --source halfcheetah --target halfcheetah-kinematic --target-size 5000   # ODRL convention

Data (`--data`), always `--batch-size` transitions per gradient step:
    merged  batch_size/2 source + batch_size/2 target transitions, drawn by two samplers and concatenated (the
            authors' 128 + 128), so the small target set is not drowned by the large source set
    target  batch_size target transitions: the "IQL on target data only" baseline
    source  batch_size source transitions: IQL on the shifted domain alone, still evaluated in the target domain
The target dataset is the target domain's dataset of --quality (or --target-dataset), subsampled without
replacement to --target-fraction of it or to exactly --target-size transitions. Seed k of a run draws its own
subsample with seed --seed + k, initialises with jax.random.PRNGKey(--seed + k) and orders its batches from that
key, so seed k of an N-seed run is the 1-seed run with --seed <seed + k>: same data, same result (up to float
rounding of the batched matmuls). --reward-scaling takes 1000 / (max - min episode return) over the episodes of
the datasets trained on, before subsampling (a subsample's episodes are incomplete), one scale for both.

Every seed runs in one jitted program (`jax.jit(jax.vmap(train))`): the datasets live on the device, batches are
drawn with jax.random indices, and `jax.lax.scan` runs --eval-every gradient steps between two evaluations with
no host round-trip; on several accelerators the seed axis is sharded across them (jax.sharding, when the seeds
divide evenly among them). Evaluation: --eval-episodes episodes per seed of the deterministic action tanh(mu(s)) in
the target domain; the normalised score is 100 (J - J_random) / (J_expert - J_random) with the target domain's
reference returns (envs.reference_info; --references). Flags out of range end with one sentence naming the flag.

Outputs in --out (default runs/iql/<data>/<source>_to_<target>-<quality>/seed<seed>[-<hash>]), laid out as envs/run.py
describes: results.json (flags, seeds, every evaluation with per-seed returns and scores, the final scores with mean
and std over seeds, timing, package versions; strict JSON, rewritten whole after every evaluation) and
checkpoint.msgpack (everything --resume needs; a resumed run ends bit for bit where an uninterrupted one would, on
CPU).
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/iql.py` puts algos/ on the path, not the repository root that holds envs/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState

from envs import evaluate, reference_info
from envs.run import (CrossDomainArgs, check_common_flags, datasets_line, default_out, evaluation_entry,
                      load_source_target, need, open_run, scan_chunk, start_block, train_loop)


@dataclass
class Args(CrossDomainArgs):
    # envs.run.CrossDomainArgs' flags come first (experiment, data, training and evaluation: --seed to --eval-episodes)
    data: Literal["merged", "target", "source"] = "merged"
    """train on source + target, on target only, or on source only"""
    # --- optimisation ---
    batch_size: int = 256
    """transitions per gradient step; --data merged takes half from each dataset"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and value; the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every network"""
    # --- algorithm ---
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
    reward_scaling: bool = False
    """multiply rewards by 1000 / (max - min episode return), as the original IQL does on MuJoCo"""
    normalize_states: bool = False
    """standardise states by the mean and std (+ 1e-3) of the training data, as CORL's IQL does; the evaluation
    policy standardises its observations the same way"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds


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


# ---------------------------------------------------------------- train state
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
    source: Optional[Transitions]  # shared by every seed
    target: Optional[Transitions]  # one subsample per seed, stacked along a leading seed axis


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    expectile: jax.Array
    temperature: jax.Array


# ---------------------------------------------------------------- losses
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


# ---------------------------------------------------------------- training
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns init(rng) -> Runner and train(runner, data, hparams, num_steps) -> (runner, chunk metrics).

    Both are pure functions of one seed; main() runs them as jax.jit(jax.vmap(...)) over seeds. `data` is an
    argument rather than a closed-over constant so that each seed can carry its own target subsample.
    """
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden), ValueNet(args.hidden)

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

    def update(state: IQLState, batch: Transitions, hparams: Hyperparams, q_weight):
        """One IQL step: V, then Q against the new V, then the target critics, then the actor."""
        # 1. value: expectile regression towards the target critics' min
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return value_loss(value_net.apply(params, batch.observations), target_q, hparams.expectile)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # 2. critics: y = r + discount (1 - d) V(s') with the value just updated
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return critic_loss(q, target, q_weight), q.mean()

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # 3. target critics
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, args.tau)

        # 4. actor: advantage-weighted regression with the advantage of step 1 (pre-update V)
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

    def sample(key, transitions: Transitions, size: int) -> Transitions:
        indices = jax.random.randint(key, (size,), 0, transitions.rewards.shape[0])
        return jax.tree.map(lambda x: x[indices], transitions)

    def sample_batch(key, data: Data) -> Transitions:
        source_key, target_key = jax.random.split(key)
        if args.data == "merged":
            half = args.batch_size // 2
            source_batch = sample(source_key, data.source, half)
            target_batch = sample(target_key, data.target, args.batch_size - half)
            return jax.tree.map(lambda s, t: jnp.concatenate([s, t]), source_batch, target_batch)
        if args.data == "target":
            return sample(target_key, data.target, args.batch_size)
        return sample(source_key, data.source, args.batch_size)

    def train(runner: Runner, data: Data, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""
        q_weight = jnp.ones(args.batch_size)  # plain IQL; DVDF/IGDF weight source samples here

        def step(runner: Runner, _):
            rng, batch_key = jax.random.split(runner.rng)
            state, metrics = update(runner.state, sample_batch(batch_key, data), hparams, q_weight)
            return Runner(state, rng), metrics

        return scan_chunk(step, runner, num_steps)

    return init, train


def make_policy(args: Args, act_dim: int):
    """The deterministic evaluation action tanh(mu(s)), for one seed's actor parameters."""
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")

    def policy(actor_params, obs):
        return actor_net.apply(actor_params, obs)[0]

    return policy


# ---------------------------------------------------------------- data
def check_args(args: Args) -> None:
    """Exit with one sentence naming the flag and its valid range."""
    check_common_flags(args)
    need(args.batch_size >= 2 and (args.data != "merged" or args.batch_size % 2 == 0),
         f"--batch-size must be at least 2, and even with --data merged, got {args.batch_size}.")


def episode_returns(dataset) -> np.ndarray:
    _, episode_index = np.unique(dataset.episode_ids, return_inverse=True)
    return np.bincount(episode_index, weights=dataset.rewards.astype(np.float64))


def to_transitions(dataset, reward_scale: float, state_mean, state_std) -> Transitions:
    return Transitions(observations=(dataset.observations - state_mean) / state_std, actions=dataset.actions,
                       rewards=(dataset.rewards * reward_scale).astype(np.float32),
                       next_observations=(dataset.next_observations - state_mean) / state_std,
                       terminals=dataset.terminals)


def load_data(args: Args, seeds: list[int]):
    """The source dataset, the full target dataset, and one target subsample per seed (as device arrays)."""
    source, target_full, targets = load_source_target(args, seeds if args.data != "source" else [],
                                                      with_source=args.data in ("merged", "source"))

    # The original IQL's reward scale and CORL's state statistics, from the datasets trained on before subsampling
    # (a subsample's episodes are incomplete); one scale and one standardisation for both datasets keep them
    # comparable.
    used = [d for d, on in ((source, args.data != "target"), (target_full, args.data != "source")) if on]
    reward_scale = 1.0
    if args.reward_scaling:
        returns = np.concatenate([episode_returns(d) for d in used])
        if returns.max() - returns.min() <= 0:
            raise SystemExit("--reward-scaling needs episodes with different returns, but every episode of the "
                             "training data has the same return.")
        reward_scale = float(1000.0 / (returns.max() - returns.min()))
    state_mean, state_std = np.zeros(target_full.obs_dim, np.float32), np.ones(target_full.obs_dim, np.float32)
    if args.normalize_states:
        observations = np.concatenate([d.observations for d in used])
        state_mean, state_std = observations.mean(0), observations.std(0) + np.float32(1e-3)

    def transitions(dataset) -> Transitions:
        return to_transitions(dataset, reward_scale, state_mean, state_std)

    source_transitions = None if source is None else jax.device_put(transitions(source))
    target_transitions = None
    if targets:  # one subsample per seed, stacked along a leading seed axis
        target_transitions = jax.device_put(jax.tree.map(lambda *fields: np.stack(fields),
                                                         *[transitions(target) for target in targets]))
    data = Data(source=source_transitions, target=target_transitions)
    info = {"source_dataset": None if source is None else source.name,
            "source_size": None if source is None else source.size,
            "target_dataset": target_full.name, "target_full_size": target_full.size,
            "target_size": targets[0].size if targets else 0, "reward_scale": reward_scale,
            "state_mean": state_mean.tolist() if args.normalize_states else None,
            "state_std": state_std.tolist() if args.normalize_states else None}
    return data, target_full, info


def standardised(policy, state_mean, state_std):
    """The policy on raw observations, for a policy trained on standardised ones (--normalize-states)."""
    state_mean, state_std = jnp.asarray(state_mean, jnp.float32), jnp.asarray(state_std, jnp.float32)
    return lambda actor_params, obs: policy(actor_params, (obs - state_mean) / state_std)


# ---------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, f"iql/{args.data}", shown=("data",)))
    start_block(args, argv, out, [("iql", args.steps, args.num_seeds)], saved,
                datasets=("target",) if args.data == "target" else None)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    data, target_full, data_info = load_data(args, seeds)
    references = reference_info(args.target, target_full, args.physics, args.references)  # exits when unknown
    ref_scores = (references["random"], references["expert"])
    data_info |= {"ref_min_score": ref_scores[0], "ref_max_score": ref_scores[1], "references": references["source"]}
    init, train = make_train(args, target_full.obs_dim, target_full.act_dim)
    policy = make_policy(args, target_full.act_dim)
    if args.normalize_states:
        policy = standardised(policy, data_info["state_mean"], data_info["state_std"])
    hparams = Hyperparams(expectile=jnp.full(args.num_seeds, args.expectile, jnp.float32),
                          temperature=jnp.full(args.num_seeds, args.temperature, jnp.float32))

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        result = evaluate(policy, runner.state.actor.params, args.target, num_episodes=args.eval_episodes,
                          seed=args.seed + step, ref_scores=ref_scores, physics=args.physics)
        return evaluation_entry(step, result, metrics)

    def report(step: int, entry: dict, metrics) -> tuple[str, str]:
        return f"score={entry['score_mean']:.1f}", (
            f"step {step}: score {entry['score_mean']:.1f} +- {entry['score_std']:.1f}, return "
            f"{entry['return_mean']:.1f}, critic loss {float(np.mean(metrics['critic_loss'])):.3g}")

    results = train_loop(args, out, saved, algo="iql", title=f"iql {args.data} {args.target} x{args.num_seeds}",
                         init=init, keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train,
                         inputs=(data, hparams), in_axes=(Data(source=None, target=0), 0), evaluate=evaluate_chunk,
                         report=report, header={"data": data_info},
                         advice="try --reward-scaling, a smaller --lr or a smaller --temperature")
    final = results["final"]
    print(f"iql --data {args.data} {datasets_line(args)}, seeds {seeds}: final score "
          f"{final['score_mean']:.1f} +- {final['score_std']:.1f} after {results['step']} steps; results in {out}")
    return results


if __name__ == "__main__":
    main()
