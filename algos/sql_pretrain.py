"""Sparse Q-Learning (SQL) on the source dataset: the value pre-training of DVDF, and an offline RL algorithm.

Xu et al., "Offline RL with No OOD Actions: In-Sample Learning via Implicit Value Regularization", ICLR 2023,
arXiv:2303.15810, as DVDF (Qiao et al., arXiv:2512.02435) uses it: twin critics and a value network trained on the
SOURCE dataset alone for 1M steps with batches of 128, alpha 0.1 (0.2 for Ant), here on rewards scaled by 1000 /
(max - min episode return) with LayerNorm (the DVDF authors' raw rewards and plain networks diverge: README;
--no-reward-scaling --no-layer-norm restores them). DVDF freezes the critics and value and reads the advantage
A(s, a) = min(Q1, Q2)(s, a) - V(s) of the online critics; hand this file's artefact to `python algos/dvdf.py
--sql-artifact <out>/sql.msgpack`. The released DVDF pre-training script is broken (it instantiates IQL, and its SQL
class crashes): this is SQL as the paper describes it.

    python algos/sql_pretrain.py --source halfcheetah-kinematic --quality medium

Per step, on one batch (s, a, r, s', d) of the source dataset:
    1. V: u = min(Q1', Q2')(s, a) - V(s) with the target critics;
       loss = mean(1[1 + u / (2 alpha) > 0] (1 + u / (2 alpha))^2 + V(s) / alpha)   (SQL's sparse value objective)
    2. Q: y = r + discount (1 - d) V(s') with the V just updated; the sum over the two critics of their mean squared
       errors; then a Polyak update of the target critics.
    3. Policy (`--policy`, on by default; `--no-policy` trains only what DVDF needs): behaviour cloning weighted by
       clip(max(u, 0), 0, --max-weight) with the u of step 1, the deterministic tanh(mu(s)) regression of the
       IGDF/DVDF authors' IQL (or `--actor gaussian`: a Gaussian log-likelihood, the original SQL's form).
The policy is evaluated with the deterministic action tanh(mu(s)) in --eval-domain (default: --source, the domain
the data comes from) for --eval-episodes episodes every --eval-every steps. Seed k of --num-seeds uses seed + k;
all seeds run in one jitted program (`jax.jit(jax.vmap(train))`, sharded across accelerators when there are
several), and seed k of an N-seed run is the 1-seed run with --seed <seed + k>.

Outputs in --out (default runs/sql/<source>-<quality>/seed<seed>[-<hash>], envs.run.default_out), laid out as
envs/run.py describes: results.json (flags, alpha, seeds, every evaluation: losses, and returns and scores with
--policy; the final scores, none with --no-policy) and checkpoint.msgpack (a resumed run ends bit for bit where an
uninterrupted one would, on CPU); and, written before each checkpoint, the artefact: sql.msgpack ({"critic":
twin-critic params, "value": value params}, stacked over the seeds; dvdf.py uses the first seed's) and sql.json
(what it was trained on: datasets, their fingerprints, flags, step, seeds).
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/sql_pretrain.py` puts algos/ on the path, not the repository root that holds envs/.
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

from envs import check_domain, domain_info, evaluate, load_dataset, reference_info
from envs.catalog import Quality
from envs.run import (check_common_flags, dataset_arrays, default_out, evaluation_entry, fingerprint, json_bytes,
                      losses_entry, need, open_run, scan_chunk, start_block, train_loop, value_bound_of, without_losses,
                      write_atomic)


@dataclass
class Args:
    # --- experiment ---
    seed: int = 0
    """seed of the first run; seed k of --num-seeds uses seed + k"""
    num_seeds: int = 1
    """seeds trained at once, vmapped in one jitted program"""
    out: Optional[str] = None
    """output folder; default runs/sql/<source>-<quality>/seed<seed>[-<hash>]"""
    resume: bool = False
    """continue the interrupted run in --out from its last checkpoint (same flags)"""
    # --- data ---
    source: str = "halfcheetah-kinematic"
    """domain of the training (source) dataset (python -m envs list)"""
    quality: Quality = "medium"
    """quality of the generated source dataset"""
    source_dataset: Optional[str] = None
    """a Minari id or D4RL-format HDF5 path to use instead of the generated source dataset"""
    physics: Literal["papers", "v5"] = "papers"
    """simulator of the generated datasets and of the evaluation: papers (gym v3 on mujoco-py, the papers' and
    D4RL's, reproduced in current MuJoCo) or v5 (Gymnasium's v5 environments as they ship)"""
    references: Literal["d4rl", "zoo"] = "d4rl"
    """score references: d4rl (D4RL's for the original tasks in the papers' physics, as the papers; each domain's
    own otherwise) or zoo (each domain's own random and expert returns)"""
    eval_domain: Optional[str] = None
    """domain the policy is evaluated in; default --source"""
    # --- training and evaluation ---
    steps: int = 1_000_000
    """gradient steps"""
    eval_every: int = 10_000
    """gradient steps between evaluations (and checkpoints and artefact updates)"""
    eval_episodes: int = 10
    """episodes per evaluation and seed"""
    policy: bool = True
    """train and evaluate the SQL policy; --no-policy trains only the critics and value (all DVDF needs)"""
    # --- optimisation ---
    batch_size: int = 128
    """transitions per gradient step (DVDF: 128; the original SQL: 256)"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and value; the actor's decays to 0 on a cosine"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of every network"""
    # --- algorithm ---
    discount: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics"""
    alpha: Optional[float] = None
    """SQL's regularisation strength; default 0.1, or 0.2 when the source is an Ant domain (DVDF's configs)"""
    max_weight: float = 100.0
    """clip of the policy's weights max(Q - V, 0)"""
    actor: Literal["deterministic", "gaussian"] = "deterministic"
    """weighted squared error on tanh(mu(s)) (IGDF/DVDF authors), or weighted Gaussian log-likelihood (SQL)"""
    layer_norm: bool = True
    """LayerNorm after every hidden layer of the critics and value (--no-layer-norm: the DVDF authors' networks)"""
    reward_scaling: bool = True
    """multiply rewards by 1000 / (max - min episode return) of the source dataset (IQL's and IVR's MuJoCo
    normalisation); --no-reward-scaling: the DVDF authors' raw rewards"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the original IQL's state-independent log-std bounds


def default_alpha(source: str) -> float:
    """DVDF's configs: alpha 0.2 for Ant, 0.1 for HalfCheetah, Hopper and Walker2d."""
    return 0.2 if domain_info(source).task == "ant" else 0.1


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
class SQLState(NamedTuple):
    actor: Optional[TrainState]  # None with --no-policy
    critic: TrainState
    critic_target_params: Any
    value: TrainState


class Runner(NamedTuple):
    """One seed's whole training state; many seeds stack it along a leading axis."""
    state: SQLState
    rng: jax.Array


class Transitions(NamedTuple):
    observations: jax.Array  # [N, obs_dim]
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N]
    next_observations: jax.Array  # [N, obs_dim]
    terminals: jax.Array  # [N], 1.0 on true termination only (bootstrap through time limits)


class Hyperparams(NamedTuple):
    """Values a sweep may vary: traced, one per vmapped run."""
    alpha: jax.Array


# ---------------------------------------------------------------- losses
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


def sql_policy_weight(advantage, max_weight):
    """clip(max(A, 0), 0, max_weight): SQL's policy weight, a constant for the actor."""
    return jax.lax.stop_gradient(jnp.clip(jnp.maximum(advantage, 0.0), 0.0, max_weight))


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
    """Returns init(rng) -> Runner and train(runner, source, hparams, num_steps) -> (runner, chunk metrics).

    Both are pure functions of one seed; main() runs them as jax.jit(jax.vmap(...)) over seeds with the source
    dataset shared. The rng is split exactly as dvdf.py's SQL stage splits it, so for one seed the critics and
    value here equal the ones dvdf.py trains (the actor never touches them).
    """
    actor_net = Actor(act_dim, args.hidden, gaussian=args.actor == "gaussian")
    critic_net, value_net = TwinCritic(args.hidden, args.layer_norm), ValueNet(args.hidden, args.layer_norm)

    def init(rng) -> Runner:
        rng, actor_key, critic_key, value_key = jax.random.split(rng, 4)
        obs, action = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
        critic_params = critic_net.init(critic_key, obs, action)
        actor = None
        if args.policy:
            actor = TrainState.create(apply_fn=actor_net.apply, params=actor_net.init(actor_key, obs),
                                      tx=optax.adam(optax.cosine_decay_schedule(args.lr, args.steps)))
        state = SQLState(
            actor=actor,
            critic=TrainState.create(apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(args.lr)),
            critic_target_params=jax.tree.map(jnp.copy, critic_params),
            value=TrainState.create(apply_fn=value_net.apply, params=value_net.init(value_key, obs),
                                    tx=optax.adam(args.lr)),
        )
        return Runner(state, rng)

    def update(state: SQLState, batch: Transitions, hparams: Hyperparams):
        """One SQL step: V, then Q against the new V, then the target critics, then (with --policy) the actor."""
        # 1. value: SQL's sparse objective against the target critics' min
        target_q = critic_net.apply(state.critic_target_params, batch.observations, batch.actions).min(0)

        def value_loss_fn(params):
            return sql_value_loss(value_net.apply(params, batch.observations), target_q, hparams.alpha)

        (v_loss, advantage), grads = jax.value_and_grad(value_loss_fn, has_aux=True)(state.value.params)
        value = state.value.apply_gradients(grads=grads)

        # 2. critics: y = r + discount (1 - d) V(s') with the value just updated
        next_v = value_net.apply(value.params, batch.next_observations)
        target = batch.rewards + args.discount * (1.0 - batch.terminals) * next_v

        def critic_loss_fn(params):
            q = critic_net.apply(params, batch.observations, batch.actions)
            return critic_loss(q, target, jnp.ones_like(target)), q.mean()

        (q_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=grads)

        # 3. target critics
        critic_target_params = optax.incremental_update(critic.params, state.critic_target_params, args.tau)

        metrics = {"value_loss": v_loss, "critic_loss": q_loss, "advantage_mean": advantage.mean(), "q_mean": q_mean}
        actor = state.actor
        if args.policy:
            # 4. actor: behaviour cloning weighted by SQL's clip(max(A, 0)), with the advantage of step 1
            weight = sql_policy_weight(advantage, args.max_weight)

            def actor_loss_fn(params):
                mean, log_std = actor_net.apply(params, batch.observations)
                if args.actor == "gaussian":
                    return gaussian_actor_loss(mean, log_std, batch.actions, weight)
                return deterministic_actor_loss(mean, batch.actions, weight)

            actor_loss, grads = jax.value_and_grad(actor_loss_fn)(actor.params)
            actor = actor.apply_gradients(grads=grads)
            metrics |= {"actor_loss": actor_loss, "weight_mean": weight.mean()}
        return SQLState(actor, critic, critic_target_params, value), metrics

    def sample(key, transitions: Transitions, size: int) -> Transitions:
        indices = jax.random.randint(key, (size,), 0, transitions.rewards.shape[0])
        return jax.tree.map(lambda x: x[indices], transitions)

    def train(runner: Runner, source: Transitions, hparams: Hyperparams, num_steps: int):
        """num_steps gradient steps in one lax.scan; metrics are their means over the chunk."""

        def step(runner: Runner, _):
            rng, batch_key = jax.random.split(runner.rng)
            state, metrics = update(runner.state, sample(batch_key, source, args.batch_size), hparams)
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
    if args.eval_domain is not None:
        check_domain(args.eval_domain, flag="--eval-domain")
    need(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}.")


def to_transitions(dataset, reward_scale: float = 1.0) -> Transitions:
    return Transitions(observations=dataset.observations, actions=dataset.actions,
                       rewards=(dataset.rewards * reward_scale).astype(np.float32),
                       next_observations=dataset.next_observations, terminals=dataset.terminals)


def reward_scale_of(dataset) -> float:
    """IQL's MuJoCo reward scale, 1000 / (max - min episode return) over the dataset's episodes."""
    _, episode = np.unique(dataset.episode_ids, return_inverse=True)
    returns = np.bincount(episode, weights=dataset.rewards.astype(np.float64))
    if returns.max() - returns.min() <= 0:
        raise SystemExit("Reward scaling needs episodes with different returns, but every episode of the source "
                         "dataset has the same return: turn the scaling off for this dataset.")
    return float(1000.0 / (returns.max() - returns.min()))


def load_data(args: Args, eval_domain: str):
    """The source dataset, and a description of it with its reward scale and the evaluation's score references."""
    source_dataset = load_dataset(args.source_dataset, domain=args.source, physics=args.physics,
                                  quality=None if args.source_dataset else args.quality)
    if (source_dataset.obs_dim, source_dataset.act_dim) != (domain_info(eval_domain).obs_dim,
                                                            domain_info(eval_domain).act_dim):
        raise SystemExit(f"--eval-domain {eval_domain} has other observation/action sizes than the source dataset; "
                         f"pick a domain of the same task.")
    references = {"random": None, "expert": None, "source": None}
    if args.policy:  # exits with a sentence when the evaluation domain has no known references
        references = reference_info(eval_domain, source_dataset if eval_domain == args.source else None,
                                    args.physics, args.references)
    info = {"source_dataset": source_dataset.name, "source_size": source_dataset.size,
            "source_fingerprint": fingerprint(dataset_arrays(source_dataset)), "eval_domain": eval_domain,
            "ref_min_score": references["random"], "ref_max_score": references["expert"],
            "reward_scale": reward_scale_of(source_dataset) if args.reward_scaling else 1.0,
            "references": references["source"]}
    return source_dataset, info


# ---------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(Args, args=argv)
    check_args(args)
    out, saved = open_run(args, default_out(args, "sql"))
    start_block(args, argv, out, [("sql_pretrain" if args.policy else "sql", args.steps, args.num_seeds)], saved,
                episodes=args.eval_episodes if args.policy else 0)
    alpha = args.alpha if args.alpha is not None else default_alpha(args.source)
    eval_domain, seeds = args.eval_domain or args.source, [args.seed + k for k in range(args.num_seeds)]
    source_dataset, data_info = load_data(args, eval_domain)
    obs_dim, act_dim, reward_scale = source_dataset.obs_dim, source_dataset.act_dim, data_info["reward_scale"]
    trained_on = {"seeds": seeds, "source": args.source, "quality": None if args.source_dataset else args.quality,
                  **{key: data_info[key] for key in ("source_dataset", "source_size", "source_fingerprint")},
                  "obs_dim": obs_dim, "act_dim": act_dim, "hidden": list(args.hidden), "alpha": alpha,
                  **{key: getattr(args, key) for key in ("batch_size", "lr", "discount", "tau", "layer_norm")},
                  "reward_scale": reward_scale}
    init, train = make_train(args, obs_dim, act_dim)
    policy = make_policy(args, act_dim)

    def evaluate_chunk(runner, step: int, metrics) -> dict:
        if not args.policy:  # the losses alone
            return {"step": step, "losses": losses_entry(metrics)}
        result = evaluate(policy, runner.state.actor.params, eval_domain, num_episodes=args.eval_episodes,
                          seed=args.seed + step, ref_scores=(data_info["ref_min_score"], data_info["ref_max_score"]),
                          physics=args.physics)
        return evaluation_entry(step, result, metrics)

    def report(step: int, entry: dict, metrics) -> tuple[str, str]:
        line = (f"step {step}: value loss {np.mean(metrics['value_loss']):.3g}, critic loss "
                f"{np.mean(metrics['critic_loss']):.3g}, advantage {np.mean(metrics['advantage_mean']):.3g}")
        if not args.policy:
            return "", line
        return (f"score={entry['score_mean']:.1f}",
                f"{line}, score {entry['score_mean']:.1f} +- {entry['score_std']:.1f}")

    def write_artifact(runner, step: int) -> None:
        """The critics and value of every seed (sql.msgpack), and what they were trained on (sql.json)."""
        state = jax.device_get(runner.state)
        write_atomic(out / "sql.msgpack", serialization.msgpack_serialize(
            {"critic": serialization.to_state_dict(state.critic.params),
             "value": serialization.to_state_dict(state.value.params)}))
        write_atomic(out / "sql.json", json_bytes({"kind": "sql", "step": step, "steps": args.steps,
                                                   "finished": step == args.steps, **trained_on}))

    results = train_loop(args, out, saved, algo="sql", title=f"sql {args.source} x{args.num_seeds}", init=init,
                         keys=jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]), train=train,
                         inputs=(jax.device_put(to_transitions(source_dataset, reward_scale)),
                                 Hyperparams(alpha=jnp.full(args.num_seeds, alpha, jnp.float32))),
                         in_axes=(None, 0), evaluate=evaluate_chunk, report=report,
                         header={"alpha": alpha, "data": data_info, "artifact": str(out / "sql.msgpack")},
                         final=without_losses if args.policy else None, before_checkpoint=write_artifact,
                         value_bound=value_bound_of(source_dataset.rewards, args.discount) * reward_scale,
                         advice="try --reward-scaling --layer-norm (the defaults), or a larger --alpha")
    score = (f"final score {results['final']['score_mean']:.1f} +- {results['final']['score_std']:.1f}, "
             if args.policy else "")
    data = args.source_dataset or f"{args.source} ({args.quality})"
    print(f"sql {data}, alpha {alpha}, seeds {seeds}: {score}{results['step']} steps; critics and value "
          f"in {out / 'sql.msgpack'}, results in {out}")
    return results


if __name__ == "__main__":
    main()
