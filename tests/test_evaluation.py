"""Evaluation counts exactly N episodes per seed and never counts steps after an episode ended."""
import jax.numpy as jnp
import numpy as np

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
