"""Evaluation rollouts: a batch of policies (parameters stacked over seeds) for N episodes each in a domain.

One vector env holds S x N copies of the domain; every step makes one jitted, vmapped policy call for all of
them. Each copy plays exactly one episode: Gymnasium's vector envs reset a finished copy on the *next* step,
so everything a copy reports after its episode ended is masked out and never counted.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from envs.domains import DEFAULT_PHYSICS, domain_info, make_vec_env
from envs.scores import normalized_score


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


def evaluate(policy_fn: Callable, params, domain: str, *, num_episodes: int = 10, seed: int = 0,
             ref_scores: tuple[float, float] | None = None, physics: str = DEFAULT_PHYSICS) -> EvalResult:
    """Roll out S policies for `num_episodes` each with deterministic actions.

    policy_fn(params_of_one_seed, observations [N, obs_dim]) -> actions [N, act_dim] in [-1, 1], pure JAX;
    `params` is that function's parameter tree with a leading seed axis S. Policy s is the run of seed
    `seed + s`, and its episode n starts from env seed (seed + s) * 1000 + n: seed k of an N-seed run is
    evaluated on the same episodes as a 1-seed run with seed + k. Pass the same `policy_fn` object each call.
    `physics`: the simulator the domain runs in (envs.domains: papers, the default, or v5).
    """
    if num_episodes < 1:
        raise SystemExit(f"num_episodes must be at least 1, got {num_episodes}.")
    num_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    obs_dim = domain_info(domain).obs_dim
    total = num_seeds * num_episodes
    envs = make_vec_env(domain, total, physics)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    act = _batched(policy_fn)
    env_seeds = [(seed + s) * 1000 + n for s in range(num_seeds) for n in range(num_episodes)]
    observations, _ = envs.reset(seed=env_seeds)
    returns = np.zeros(total)
    lengths = np.zeros(total, dtype=np.int64)
    done = np.zeros(total, dtype=bool)
    while not done.all():
        batch = jnp.asarray(observations.reshape(num_seeds, num_episodes, obs_dim), jnp.float32)
        actions = np.asarray(act(params, batch), dtype=np.float64).reshape(total, -1)
        actions = low + (np.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * (high - low)
        observations, rewards, terminations, truncations, _ = envs.step(actions)
        live = ~done
        returns[live] += rewards[live]
        lengths[live] += 1
        done |= terminations | truncations
    envs.close()
    returns = returns.reshape(num_seeds, num_episodes)
    mean = returns.mean(axis=1)
    score = None if ref_scores is None else np.asarray(normalized_score(mean, *ref_scores))
    return EvalResult(returns, lengths.reshape(num_seeds, num_episodes), mean, score)
