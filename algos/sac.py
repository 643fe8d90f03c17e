"""Soft Actor-Critic (SAC), online, in any domain of envs/: trains the behaviour policies from which the
offline datasets are generated.

Haarnoja et al., "Soft Actor-Critic Algorithms and Applications" (2018), arXiv:1812.05905: twin critics with
clipped double-Q targets, a tanh-Gaussian actor, and automatic entropy tuning towards -act_dim. The recipe is
CleanRL's / CORL's, one gradient update per environment step (UTD 1), the replay buffer in numpy on the host.

    python algos/sac.py --env halfcheetah --seed 0
    python algos/sac.py --env walker2d-kinematic --init-from runs/sac/walker2d/seed0/checkpoint.npz  # fine-tune

Outputs under --out (default runs/sac/<env>/seed<seed>):
    snapshots/actor_<step>.npz   the actor as plain float32 arrays w0,b0,w1,b1,w2,b2 (Dense relu, Dense relu,
                                 Dense 2*act_dim = [mean, log_std], mean first; log_std is to be clipped to
                                 [-5, 2]), plus `step`, `eval_return_mean`, `eval_return_std`: the format that
                                 envs/ loads to generate datasets, without importing this file
    metrics.jsonl, eval.csv      one row per evaluation (step, eval return mean and std, losses)
    checkpoint.npz               everything needed by --resume, replay buffer included (in insertion order, with
                                 terminals and timeouts, so a prefix of it is a medium-replay dataset)
    args.json                    the flags of the run
Every file is written to a temporary name and then renamed: it is there whole or not at all.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

# `python algos/sac.py` puts algos/ on the path, not the repository root that holds envs/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState
from tqdm import tqdm

from envs import check_domain, make_env
from envs.run import write_atomic


@dataclass
class Args:
    # experiment
    env: str = "halfcheetah"
    """domain name from envs.DOMAINS, e.g. halfcheetah or halfcheetah-kinematic"""
    physics: Literal["papers", "v5"] = "papers"
    """simulator: papers (gym v3 on mujoco-py, the papers' and D4RL's, reproduced in current MuJoCo) or v5
    (Gymnasium's v5 environments as they ship)"""
    seed: int = 0
    out: Optional[str] = None
    """output directory; default runs/sac/<env>/seed<seed>"""
    resume: bool = False
    """continue from <out>/checkpoint.npz"""
    init_from: Optional[str] = None
    """start from the networks, optimiser and temperature of another run's checkpoint.npz with the same
    observation and action sizes (e.g. the original domain's run, when SAC from scratch stalls in a shifted one);
    the replay buffer starts empty, and the loaded actor acts from the first step instead of uniform actions"""
    # training length and logging
    total_steps: int = 1_000_000
    """environment steps in all (one gradient update per step once learning has started)"""
    learning_starts: int = 10_000
    """steps before the first update, with uniform random actions (with --init-from: the loaded actor's)"""
    eval_every: int = 10_000
    eval_episodes: int = 5
    snapshot_every: int = 25_000
    checkpoint_every: int = 25_000
    # optimisation
    batch_size: int = 256
    buffer_size: int = 1_000_000
    lr: float = 3e-4
    """learning rate of actor, critics and temperature"""
    hidden: int = 256
    # algorithm
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


# ---------------------------------------------------------------- networks
class Actor(nn.Module):
    """obs -> [mean, log_std] of a Gaussian squashed by tanh. Layer names fix the snapshot format (w0..b2)."""
    act_dim: int
    hidden: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(self.hidden, name="fc0")(obs))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        out = nn.Dense(2 * self.act_dim, name="fc2")(x)
        mean, log_std = jnp.split(out, 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent critics evaluated as one batched network: output [2, batch]."""
    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=2)
        return twin(self.hidden)(obs, action)


class Temperature(nn.Module):
    @nn.compact
    def __call__(self):
        return self.param("log_alpha", nn.initializers.zeros, ())  # alpha starts at 1, as in CORL


def sample_tanh_gaussian(mean, log_std, key):
    """Reparameterised sample of tanh(N(mean, std)) and its log-probability, summed over action dims."""
    noise = jax.random.normal(key, mean.shape)
    pre_tanh = mean + jnp.exp(log_std) * noise
    gaussian_log_prob = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u| (Haarnoja et al. 2018, eq. 21)
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return jnp.tanh(pre_tanh), (gaussian_log_prob - log_det).sum(-1)


# ---------------------------------------------------------------- train state
class CriticState(TrainState):
    target_params: Any = struct.field(pytree_node=True)


class SACState(NamedTuple):
    actor: TrainState
    critic: CriticState
    temperature: TrainState
    key: jax.Array


def create_state(args: Args, obs_dim: int, act_dim: int, key) -> SACState:
    actor_key, critic_key, key = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor = Actor(act_dim, args.hidden)
    critic = TwinCritic(args.hidden)
    critic_params = critic.init(critic_key, obs, act)
    temperature = Temperature()
    return SACState(
        actor=TrainState.create(apply_fn=actor.apply, params=actor.init(actor_key, obs), tx=optax.adam(args.lr)),
        critic=CriticState.create(apply_fn=critic.apply, params=critic_params,
                                  target_params=jax.tree.map(jnp.copy, critic_params),  # own buffers: donated
                                  tx=optax.adam(args.lr)),
        temperature=TrainState.create(apply_fn=temperature.apply, params=temperature.init(key),
                                      tx=optax.adam(args.lr)),
        key=key,
    )


# ---------------------------------------------------------------- losses and update
class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    terminals: jax.Array


def make_update(args: Args, act_dim: int):
    target_entropy = -float(act_dim)

    def update(state: SACState, batch: Batch):
        key, next_key, actor_key = jax.random.split(state.key, 3)
        alpha = jnp.exp(state.temperature.apply_fn(state.temperature.params))

        # critics: soft clipped double-Q target, bootstrapped on true termination only
        next_action, next_log_prob = sample_tanh_gaussian(
            *state.actor.apply_fn(state.actor.params, batch.next_observations), next_key)
        next_q = state.critic.apply_fn(state.critic.target_params, batch.next_observations, next_action).min(0)
        target_q = batch.rewards + args.gamma * (1.0 - batch.terminals) * (next_q - alpha * next_log_prob)
        target_q = jax.lax.stop_gradient(target_q)

        def critic_loss_fn(params):
            q = state.critic.apply_fn(params, batch.observations, batch.actions)  # [2, B]
            return ((q - target_q) ** 2).mean(1).sum(), q.mean()

        (critic_loss, q_mean), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(state.critic.params)
        critic = state.critic.apply_gradients(grads=critic_grads)

        # actor: maximise min-Q of its own reparameterised action plus entropy, against the updated critics
        def actor_loss_fn(params):
            action, log_prob = sample_tanh_gaussian(*state.actor.apply_fn(params, batch.observations), actor_key)
            q = critic.apply_fn(critic.params, batch.observations, action).min(0)
            return (alpha * log_prob - q).mean(), log_prob

        (actor_loss, log_prob), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(state.actor.params)
        actor = state.actor.apply_gradients(grads=actor_grads)

        # temperature: drive the policy entropy towards -act_dim
        def temperature_loss_fn(params):
            log_alpha = state.temperature.apply_fn(params)
            return (-log_alpha * jax.lax.stop_gradient(log_prob + target_entropy)).mean()

        temperature_loss, temperature_grads = jax.value_and_grad(temperature_loss_fn)(state.temperature.params)
        temperature = state.temperature.apply_gradients(grads=temperature_grads)

        critic = critic.replace(target_params=optax.incremental_update(critic.params, critic.target_params,
                                                                       args.tau))
        metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "temperature_loss": temperature_loss,
                   "alpha": alpha, "entropy": -log_prob.mean(), "q_mean": q_mean}
        return SACState(actor, critic, temperature, key), metrics

    return update


def make_policies(actor_apply):
    @jax.jit
    def sample_action(actor_params, obs, key):
        key, sample_key = jax.random.split(key)
        action, _ = sample_tanh_gaussian(*actor_apply(actor_params, obs), sample_key)
        return action, key

    @jax.jit
    def deterministic_action(actor_params, obs):
        return jnp.tanh(actor_apply(actor_params, obs)[0])

    return sample_action, deterministic_action


# ---------------------------------------------------------------- replay buffer (host)
class ReplayBuffer:
    """Transitions in insertion order (a ring once full). `timeouts` marks episode ends that are not terminals:
    time-limit truncations and the cut made by --resume, so that the buffer splits back into episodes."""
    FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.observations = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, act_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_observations = np.zeros((capacity, obs_dim), np.float32)
        self.terminals = np.zeros(capacity, np.float32)
        self.timeouts = np.zeros(capacity, np.float32)

    def add(self, obs, action, reward, next_obs, terminal, timeout):
        i = self.ptr
        self.observations[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_observations[i], self.terminals[i], self.timeouts[i] = next_obs, terminal, timeout
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        idx = rng.integers(0, self.size, batch_size)
        return Batch(self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                     self.terminals[idx])

    def state_dict(self) -> dict:
        arrays = {f"buffer/{name}": getattr(self, name)[: self.size] for name in self.FIELDS}
        return arrays | {"buffer/size": np.int64(self.size), "buffer/ptr": np.int64(self.ptr)}

    def load_state_dict(self, arrays) -> None:
        size, ptr = int(arrays["buffer/size"]), int(arrays["buffer/ptr"])
        if size > self.capacity:
            raise SystemExit(f"The checkpoint's replay buffer holds {size} transitions, more than --buffer-size "
                             f"{self.capacity}; resume with --buffer-size {size} or more.")
        for name in self.FIELDS:
            getattr(self, name)[:size] = arrays[f"buffer/{name}"]
        # a buffer saved full but loaded into a larger one simply keeps appending
        self.size, self.ptr = size, (ptr if size == self.capacity else size)


# ---------------------------------------------------------------- files
def tree_to_arrays(prefix: str, tree) -> dict:
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_from_arrays(prefix: str, template, arrays, what: str = "resume with the run's own flags"):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths_leaves:
        value = arrays[prefix + jax.tree_util.keystr(path)]
        if value.shape != np.shape(leaf):
            raise SystemExit(f"The checkpoint does not match these flags ({prefix}{jax.tree_util.keystr(path)} "
                             f"has shape {value.shape}, expected {np.shape(leaf)}); {what}.")
        leaves.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_snapshot(path: Path, actor_params, step: int, eval_result) -> None:
    layers = actor_params["params"]
    arrays = {}
    for i in range(3):
        arrays[f"w{i}"] = np.asarray(layers[f"fc{i}"]["kernel"], np.float32)
        arrays[f"b{i}"] = np.asarray(layers[f"fc{i}"]["bias"], np.float32)
    arrays["step"] = np.array(step, np.int64)
    if eval_result is not None:
        arrays["eval_return_mean"] = np.array(eval_result[0], np.float32)
        arrays["eval_return_std"] = np.array(eval_result[1], np.float32)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def write_logs(out: Path, history: list) -> None:
    jsonl = "".join(json.dumps(row) + "\n" for row in history)
    csv = "step,eval_return_mean,eval_return_std\n" + "".join(
        f"{row['step']},{row['eval_return_mean']:.4f},{row['eval_return_std']:.4f}\n" for row in history)
    write_atomic(out / "metrics.jsonl", jsonl)
    write_atomic(out / "eval.csv", csv)


# ---------------------------------------------------------------- evaluation
def evaluate(env, deterministic_action, actor_params, episodes: int, seed: int):
    """Mean and std of the undiscounted return of tanh(mean) over `episodes` episodes."""
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            action = np.asarray(deterministic_action(actor_params, obs.astype(np.float32)))
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), float(np.std(returns))


# ---------------------------------------------------------------- main
def check_args(args: Args) -> None:
    check_domain(args.env, flag="--env")
    for flag in ("total_steps", "batch_size", "buffer_size", "hidden", "eval_every", "eval_episodes",
                 "snapshot_every", "checkpoint_every"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.learning_starts < 0:
        raise SystemExit(f"--learning-starts must be zero or positive, got {args.learning_starts}.")
    if not (args.lr > 0 and 0 < args.gamma <= 1 and 0 < args.tau <= 1):
        raise SystemExit("--lr must be positive and --gamma, --tau must lie in (0, 1].")


def main(args: Args) -> dict:
    check_args(args)
    out = Path(args.out or f"runs/sac/{args.env}/seed{args.seed}")
    checkpoint_path = out / "checkpoint.npz"
    if args.resume and not checkpoint_path.exists():
        raise SystemExit(f"--resume found no checkpoint at {checkpoint_path}; run without --resume to start.")
    if args.init_from and args.resume:
        raise SystemExit("--init-from starts a new run; --resume continues one (its checkpoint already holds the "
                         "loaded networks): pass only one of them.")
    if args.init_from and not Path(args.init_from).is_file():
        raise SystemExit(f"--init-from {args.init_from} is not a file; give the checkpoint.npz of a SAC run.")
    if not args.resume and checkpoint_path.exists():
        raise SystemExit(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out.")
    (out / "snapshots").mkdir(parents=True, exist_ok=True)

    env, eval_env = make_env(args.env, args.physics), make_env(args.env, args.physics)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if not (np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)):
        raise SystemExit(f"{args.env} has actions outside [-1, 1]; this SAC assumes tanh actions need no rescale.")

    state = create_state(args, obs_dim, act_dim, jax.random.PRNGKey(args.seed))
    act_key = jax.random.PRNGKey(args.seed + 1)
    np_rng = np.random.default_rng(args.seed)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_steps), obs_dim, act_dim)
    start_step, history, episode_returns = 0, [], []
    fine_tuning = args.init_from is not None
    if fine_tuning:
        with np.load(args.init_from) as arrays:
            source, source_step = json.loads(str(arrays["args"])), int(arrays["step"])
            loaded = tree_from_arrays("state", state, arrays, f"--init-from needs a run with the observation and "
                                      f"action sizes of {args.env} and --hidden {args.hidden}")
        state = loaded._replace(key=state.key)  # the networks come from the checkpoint; the randomness from --seed
        print(f"fine-tuning from {args.init_from} ({source['env']} seed {source['seed']}, step {source_step})")

    if args.resume:
        with np.load(checkpoint_path) as arrays:
            saved_args = json.loads(str(arrays["args"]))
            if saved_args["env"] != args.env:
                raise SystemExit(f"The checkpoint in {out} is for --env {saved_args['env']}, not {args.env}.")
            if saved_args.get("physics", "v5") != args.physics:  # runs from before --physics ran in v5
                raise SystemExit(f"The checkpoint in {out} was trained in the {saved_args.get('physics', 'v5')} "
                                 f"physics, not {args.physics}: pass --physics {saved_args.get('physics', 'v5')}.")
            state = tree_from_arrays("state", state, arrays)
            act_key = jnp.asarray(arrays["act_key"])
            np_rng.bit_generator.state = json.loads(str(arrays["np_rng"]))
            buffer.load_state_dict(arrays)
            start_step = int(arrays["step"])
            history = json.loads(str(arrays["history"]))
        print(f"resuming {checkpoint_path} at step {start_step}")
        args = replace(args, init_from=saved_args.get("init_from"))  # a fine-tuned run stays one (args.json, acting)
        fine_tuning = args.init_from is not None
        # The environment is not part of the checkpoint: training resumes with a fresh episode, so the last stored
        # transition is marked as a cut (timeout) to keep the buffer splittable into episodes.
        if buffer.size:
            buffer.timeouts[(buffer.ptr - 1) % buffer.capacity] = 1.0
        # evaluations, snapshots logged after the checkpoint belong to a run that was lost; they are redone
        for snapshot in (out / "snapshots").glob("actor_*.npz"):
            if int(snapshot.stem.split("_")[1]) > start_step:
                snapshot.unlink()
        write_logs(out, history)
        if start_step >= args.total_steps:
            print(f"{checkpoint_path} is already at step {start_step} >= --total-steps {args.total_steps}.")
            return history[-1] if history else {}
    write_atomic(out / "args.json", json.dumps(asdict(args), indent=2))

    update = jax.jit(make_update(args, act_dim), donate_argnums=0)
    sample_action, deterministic_action = make_policies(state.actor.apply_fn)

    def save_checkpoint(step):
        arrays = tree_to_arrays("state", state) | buffer.state_dict() | {
            "act_key": np.asarray(act_key), "step": np.int64(step),
            "np_rng": np.array(json.dumps(np_rng.bit_generator.state)),
            "history": np.array(json.dumps(history)), "args": np.array(json.dumps(asdict(args)))}
        write_atomic(checkpoint_path, lambda f: np.savez(f, **arrays))

    # new episode also on --resume (the env state is not checkpointed)
    obs, _ = env.reset(seed=args.seed + start_step)
    episode_return, metrics, last_eval = 0.0, None, history[-1]["eval_return_mean"] if history else float("nan")
    interval_start, interval_step = time.perf_counter(), start_step
    pbar = tqdm(total=args.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, desc=f"sac {args.env}")
    for step in range(start_step + 1, args.total_steps + 1):  # `step` counts env steps done after this one
        if step <= args.learning_starts and not fine_tuning:
            action = np_rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
        else:
            action, act_key = sample_action(state.actor.params, obs.astype(np.float32), act_key)
            action = np.asarray(action)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward, next_obs, float(terminated), float(truncated and not terminated))
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(episode_return)
            obs, _ = env.reset()
            episode_return = 0.0

        if step > args.learning_starts:
            state, metrics = update(state, buffer.sample(np_rng, args.batch_size))

        snapshot_now = step % args.snapshot_every == 0 or step == args.total_steps
        if step % args.eval_every == 0 or snapshot_now:
            eval_mean, eval_std = evaluate(eval_env, deterministic_action, state.actor.params,
                                           args.eval_episodes, seed=10_000 + args.seed)
            now = time.perf_counter()
            steps_per_second = (step - interval_step) / (now - interval_start)
            row = {"step": step, "eval_return_mean": eval_mean, "eval_return_std": eval_std,
                   "train_episode_return": float(np.mean(episode_returns[-10:])) if episode_returns else None,
                   "steps_per_second": steps_per_second}
            if metrics is not None:
                row |= {name: float(value) for name, value in metrics.items()}
            history.append(row)
            write_logs(out, history)
            last_eval = eval_mean
            tqdm.write(f"step {step}: eval return {eval_mean:.1f} +- {eval_std:.1f}, "
                       f"{steps_per_second:.0f} steps/s" +
                       (f", critic loss {row['critic_loss']:.3g}, alpha {row['alpha']:.3g}" if metrics else ""))
            if snapshot_now:
                save_snapshot(out / "snapshots" / f"actor_{step}.npz", state.actor.params, step,
                              (eval_mean, eval_std))
            interval_start, interval_step = time.perf_counter(), step  # evaluation time is not training speed
        if step % args.checkpoint_every == 0 or step == args.total_steps:
            save_checkpoint(step)
            interval_start, interval_step = time.perf_counter(), step
        if step % 100 == 0 or step == args.total_steps:
            pbar.update(step - pbar.n)
            pbar.set_postfix(eval_return=f"{last_eval:.1f}", refresh=False)
    pbar.close()
    final = history[-1]
    print(f"done: {args.env} seed {args.seed}, {args.total_steps} steps, final eval return "
          f"{final['eval_return_mean']:.1f} +- {final['eval_return_std']:.1f}; outputs in {out}")
    return final


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # evaluation lines reach a redirected log at once
    main(tyro.cli(Args))
