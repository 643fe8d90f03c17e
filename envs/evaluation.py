"""Evaluation rollouts: a batch of policies (parameters stacked over seeds) for N episodes each in a domain.

S x N copies of the domain play one episode each; every step makes one jitted, vmapped policy call for all of
them, and only the copies whose episode has not ended are stepped (nothing is counted, or computed, after an end).
The copies are built once per (domain, physics, S x N, workers) and kept for the next evaluation of the run: every
evaluation resets each copy with its own seed, so the episodes do not depend on what the copies played before.
With `workers` > 0 the copies are split into workers + 1 contiguous blocks: this process steps the first, worker
processes (spawned once, kept like the copies) the others, all at the same time. The episodes, returns and lengths
are the same whatever the number of workers, to the last bit.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from envs.domains import DEFAULT_PHYSICS, domain_info, make_env
from envs.scores import normalized_score

WORKERS_VARIABLE = "CROSSDOMAIN_EVAL_WORKERS"  # sets every evaluation's default number of worker processes
KEPT = 4  # sets of copies kept at once (a script evaluates one domain at one size; a test suite many)


@dataclass(frozen=True)
class EvalResult:
    episode_returns: np.ndarray  # [S, N]
    episode_lengths: np.ndarray  # [S, N]
    mean_return: np.ndarray  # [S]
    normalized_score: np.ndarray | None  # [S], None when no references were given


@functools.lru_cache(maxsize=32)
def _batched(policy_fn: Callable) -> Callable:
    # Cached per function object so that evaluating every 10k steps compiles once, not at every evaluation.
    return jax.jit(jax.vmap(policy_fn))


def default_workers(copies: int) -> int:
    """Worker processes for `copies` environments: $CROSSDOMAIN_EVAL_WORKERS where set, else one per 16 copies up
    to the cores this process may use minus one, and none on a machine of fewer than 4 cores (where the training
    chunks already use every core)."""
    given = os.environ.get(WORKERS_VARIABLE)
    if given is not None:
        try:
            workers = int(given)
        except ValueError:
            workers = -1
        if workers < 0:
            raise SystemExit(f"${WORKERS_VARIABLE} must be a whole number of worker processes (0: none), got "
                             f"{given!r}.")
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 4 else max(0, min(cores - 1, copies // 16))


class _Block:
    """Copies of a domain stepped in this process."""

    def __init__(self, domain: str, physics: str, count: int):
        self.envs = [make_env(domain, physics) for _ in range(count)]
        self.obs_dim = domain_info(domain).obs_dim

    def reset(self, seeds) -> np.ndarray:
        return np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(self.envs, seeds)])

    def step(self, actions: np.ndarray, live: np.ndarray) -> tuple:
        """Step the live copies with their actions: (observations, rewards, ended) of every copy, zeros where a
        copy was not stepped."""
        observations = np.zeros((len(self.envs), self.obs_dim))
        rewards, ended = np.zeros(len(self.envs)), np.zeros(len(self.envs), dtype=bool)
        for i in np.flatnonzero(live):
            observations[i], rewards[i], terminated, truncated, _ = self.envs[i].step(actions[i])
            ended[i] = terminated or truncated
        return observations, rewards, ended

    def send(self, command: str, *payload) -> None:
        self.answer = getattr(self, command)(*payload)

    def receive(self):
        return self.answer

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _serve(connection, domain: str, physics: str, count: int) -> None:
    """A worker process: one block of copies, stepped on command until told to stop."""
    try:
        block = _Block(domain, physics, count)
        connection.send(("ready", None))
        while True:
            command, payload = connection.recv()
            if command == "close":
                break
            connection.send(("ok", getattr(block, command)(*payload)))
    except (EOFError, KeyboardInterrupt):  # the evaluating process ended or was stopped: so does its worker
        return
    except Exception as error:  # noqa: BLE001 (sent back whole, raised there)
        connection.send(("error", f"{type(error).__name__}: {error}"))


class _Worker:
    """A block of copies in a worker process, behind the same send/receive as _Block."""

    def __init__(self, context, domain: str, physics: str, count: int):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, domain, physics, count), daemon=True)
        self.process.start()
        child.close()

    def send(self, command: str, *payload) -> None:
        self.connection.send((command, payload))

    def receive(self):
        try:
            status, answer = self.connection.recv()
        except EOFError:
            raise SystemExit(f"An evaluation worker process (pid {self.process.pid}) ended unexpectedly (exit code "
                             f"{self.process.exitcode}); run again with ${WORKERS_VARIABLE}=0 to evaluate in this "
                             f"process.") from None
        if status == "error":
            raise SystemExit(f"An evaluation worker process failed: {answer}.")
        return answer

    def close(self) -> None:
        try:
            self.connection.send(("close", ()))
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()


class _Copies:
    """`count` copies of a domain in workers + 1 contiguous blocks (this process's first)."""

    def __init__(self, domain: str, physics: str, count: int, workers: int):
        sizes = [len(part) for part in np.array_split(np.arange(count), min(workers + 1, count))]
        self.bounds = np.cumsum([0, *sizes])
        context = multiprocessing.get_context("spawn")  # never fork a process that runs XLA's threads
        self.blocks = [_Block(domain, physics, sizes[0])]
        self.blocks += [_Worker(context, domain, physics, size) for size in sizes[1:]]
        for block in self.blocks[1:]:
            block.receive()  # ready
        env = self.blocks[0].envs[0]
        self.low, self.high = env.action_space.low, env.action_space.high

    def _all(self, command: str, *per_block) -> list:
        for index in reversed(range(len(self.blocks))):  # the workers first, this process's block last
            self.blocks[index].send(command, *(part[self.bounds[index]:self.bounds[index + 1]] for part in per_block))
        return [block.receive() for block in self.blocks]

    def reset(self, seeds: list) -> np.ndarray:
        return np.concatenate(self._all("reset", np.asarray(seeds)))

    def step(self, actions: np.ndarray, live: np.ndarray) -> tuple:
        parts = self._all("step", actions, live)
        return tuple(np.concatenate(field) for field in zip(*parts))

    def close(self) -> None:
        for block in self.blocks:
            block.close()


_KEPT: OrderedDict[tuple, _Copies] = OrderedDict()


def _copies(domain: str, physics: str, count: int, workers: int) -> _Copies:
    key = (domain, physics, count, workers)
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key]
    while len(_KEPT) >= KEPT:
        _KEPT.popitem(last=False)[1].close()
    _KEPT[key] = _Copies(domain, physics, count, workers)
    return _KEPT[key]


@atexit.register
def close_all() -> None:
    """Close every kept copy and worker process (at exit, or to free them earlier)."""
    while _KEPT:
        _KEPT.popitem()[1].close()


def evaluate(policy_fn: Callable, params, domain: str, *, num_episodes: int = 10, seed: int = 0,
             ref_scores: tuple[float, float] | None = None, physics: str = DEFAULT_PHYSICS,
             workers: int | None = None) -> EvalResult:
    """Roll out S policies for `num_episodes` each with deterministic actions.

    policy_fn(params_of_one_seed, observations [N, obs_dim]) -> actions [N, act_dim] in [-1, 1], pure JAX;
    `params` is that function's parameter tree with a leading seed axis S. Policy s is the run of seed
    `seed + s`, and its episode n starts from env seed (seed + s) * 1000 + n: seed k of an N-seed run is
    evaluated on the same episodes as a 1-seed run with seed + k. Pass the same `policy_fn` object each call.
    `physics`: the simulator the domain runs in (envs.domains: papers, the default, or v5). `workers`: processes
    that step blocks of the copies beside this one (None: default_workers); the results do not depend on it.
    The policy runs on the host CPU (its parameters copied there), so an evaluation can overlap the next training
    chunk on an accelerator, and its returns are the same on a CPU and a GPU machine for the same parameters.
    """
    if num_episodes < 1:
        raise SystemExit(f"num_episodes must be at least 1, got {num_episodes}.")
    num_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    obs_dim = domain_info(domain).obs_dim
    total = num_seeds * num_episodes
    copies = _copies(domain, physics, total, default_workers(total) if workers is None else workers)
    act = _batched(policy_fn)
    cpu = jax.devices("cpu")[0]  # the policy runs beside the environments, never queued behind an accelerator's work
    params = jax.device_put(params, cpu)
    observations = copies.reset([(seed + s) * 1000 + n for s in range(num_seeds) for n in range(num_episodes)])
    returns = np.zeros(total)
    lengths = np.zeros(total, dtype=np.int64)
    live = np.ones(total, dtype=bool)
    while live.any():
        batch = jax.device_put(observations.reshape(num_seeds, num_episodes, obs_dim).astype(np.float32), cpu)
        actions = np.asarray(act(params, batch), dtype=np.float64).reshape(total, -1)
        actions = copies.low + (np.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * (copies.high - copies.low)
        stepped, rewards, ended = copies.step(actions, live)
        observations = np.where(live[:, None], stepped, observations)  # an ended copy keeps its last observation
        returns[live] += rewards[live]
        lengths[live] += 1
        live &= ~ended
    returns = returns.reshape(num_seeds, num_episodes)
    mean = returns.mean(axis=1)
    score = None if ref_scores is None else np.asarray(normalized_score(mean, *ref_scores))
    return EvalResult(returns, lengths.reshape(num_seeds, num_episodes), mean, score)
