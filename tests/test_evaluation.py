"""Evaluation counts exactly N episodes per seed and never counts steps after an episode ended."""
import jax.numpy as jnp
import numpy as np
import pytest

from envs import evaluate, make_env


def linear_policy(params, observations):
    return jnp.tanh(observations @ params["w"])


def _reference_return(w, domain, seed):
    """One episode played by hand in a single env, stopping at its end."""
    env = make_env(domain)
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        action = np.tanh(obs.astype(np.float32) @ w)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            return total, steps


def test_exactly_n_episodes_and_no_post_termination_steps():
    rng = np.random.default_rng(0)
    num_seeds, num_episodes = 3, 4
    w = rng.normal(scale=2.0, size=(num_seeds, 11, 3)).astype(np.float32)  # hopper falls early with these
    result = evaluate(linear_policy, {"w": jnp.asarray(w)}, "hopper", num_episodes=num_episodes, seed=7,
                      ref_scores=(-20.0, 3000.0))
    assert result.episode_returns.shape == (num_seeds, num_episodes)
    assert (result.episode_lengths < 1000).all(), "the test needs episodes that terminate early"
    for s in range(num_seeds):
        for n in range(num_episodes):
            ret, steps = _reference_return(w[s], "hopper", (7 + s) * 1000 + n)
            assert result.episode_lengths[s, n] == steps
            # float32 matmuls of JAX and NumPy differ in the last bits; the physics amplifies that a little.
            np.testing.assert_allclose(result.episode_returns[s, n], ret, rtol=1e-3)
    np.testing.assert_allclose(result.mean_return, result.episode_returns.mean(axis=1))
    np.testing.assert_allclose(result.normalized_score, 100 * (result.mean_return + 20.0) / 3020.0)


def test_without_references_there_is_no_score():
    w = jnp.zeros((2, 17, 6))
    result = evaluate(linear_policy, {"w": w}, "halfcheetah-kinematic", num_episodes=1)
    assert result.normalized_score is None
    assert (result.episode_lengths == 1000).all()  # HalfCheetah never terminates: the time limit ends it


def test_kept_copies_and_worker_processes_play_the_same_episodes():
    """The copies are built once and kept (a second evaluation reuses them and does not depend on what they played
    before), and splitting them over worker processes changes nothing, to the last bit."""
    from envs import evaluation
    rng = np.random.default_rng(1)
    w = {"w": jnp.asarray(rng.normal(scale=2.0, size=(2, 11, 3)).astype(np.float32))}  # early ends, unequal lengths
    first = evaluate(linear_policy, w, "hopper", num_episodes=3, seed=4, workers=0)
    kept = evaluation._KEPT[("hopper", "papers", 6, 0)]
    evaluate(linear_policy, {"w": w["w"][::-1]}, "hopper", num_episodes=3, seed=9, workers=0)  # other episodes
    again = evaluate(linear_policy, w, "hopper", num_episodes=3, seed=4, workers=0)
    assert evaluation._KEPT[("hopper", "papers", 6, 0)] is kept
    split = evaluate(linear_policy, w, "hopper", num_episodes=3, seed=4, workers=2)  # blocks of 2, 2, 2
    assert len(evaluation._KEPT[("hopper", "papers", 6, 2)].blocks) == 3
    assert (first.episode_lengths < 1000).all() and len(np.unique(first.episode_lengths)) > 1
    for result in (again, split):
        np.testing.assert_array_equal(result.episode_returns, first.episode_returns)
        np.testing.assert_array_equal(result.episode_lengths, first.episode_lengths)
    evaluation.close_all()
    assert not evaluation._KEPT


def test_the_number_of_workers(monkeypatch):
    from envs import evaluation
    monkeypatch.delenv(evaluation.WORKERS_VARIABLE, raising=False)
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [evaluation.default_workers(n) for n in (10, 50, 1000)] == [0, 3, 15]  # one per 16 copies, cores - 1
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: {0, 1})
    assert evaluation.default_workers(1000) == 0  # 2 cores: the training chunks use them
    monkeypatch.setenv(evaluation.WORKERS_VARIABLE, "5")
    assert evaluation.default_workers(10) == 5
    monkeypatch.setenv(evaluation.WORKERS_VARIABLE, "many")
    with pytest.raises(SystemExit, match=r"^\$CROSSDOMAIN_EVAL_WORKERS must be a whole number of worker processes "
                                         r"\(0: none\), got 'many'\.$"):
        evaluation.default_workers(10)
