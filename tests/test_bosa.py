"""algos/bosa.py: the VAE loss, the importance-sampled density with its N(0, I) prior, the dynamics-support mask, the
supported critic loss and the supported actor loss against numbers worked out by hand in numpy, the CVAE shapes,
the mask's reach (source only or all), the delayed actor update, the dynamics ensemble telling target from shifted
transitions, the copies of iql.py's code held identical, and a tiny end-to-end run that writes a finite results.json
and reuses its cached stage. Tiny networks and a few hundred steps: whether BOSA learns is a benchmark, not a test."""
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from synthetic import assert_one_sentence_exit, write_d4rl

import envs.run

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"algos_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds a class's file through sys.modules
    spec.loader.exec_module(module)
    return module


bosa = _load("bosa")
REF_MIN, REF_MAX = -300.0, 3000.0
LOG_2PI = math.log(2 * math.pi)


def _log_normal(x, mean, std):
    return float(np.sum(-0.5 * ((np.asarray(x) - mean) / std) ** 2 - np.log(std) - 0.5 * LOG_2PI))


# ---------------------------------------------------------------- densities and losses, by hand
def test_gaussian_log_density_by_hand():
    # dims: -0.5 * 1 - log 1 - 0.5 log 2 pi, and -0.5 * 0 - log 0.5 - 0.5 log 2 pi
    expected = -0.5 - LOG_2PI + math.log(2.0)
    value = bosa.gaussian_log_density(jnp.array([1.0, 0.0]), jnp.zeros(2), jnp.array([1.0, 0.5]))
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_vae_loss_by_hand():
    # reconstruction: mean of [0.5^2, 0] = 0.125; KL elements: -0.5 (1 + 0 - 0 - 1) = 0 and
    # -0.5 (1 + 2 log 0.5 - 1 - 0.25) = 0.125 + log 2, their mean (0.125 + log 2) / 2; beta 0.5
    expected = 0.125 + 0.5 * (0.125 + math.log(2.0)) / 2
    loss = bosa.vae_loss(jnp.array([[0.5, 0.0]]), jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]),
                         jnp.array([[1.0, 0.5]]), 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_log_likelihood_estimate_by_hand():
    # one transition, one dimension, two samples; the decoder's std is sqrt(beta / 4) = sqrt(0.125)
    beta, x, mean, std = 0.5, 0.2, 0.1, 0.5
    decoded, z = np.array([0.0, 0.5]), np.array([0.3, -0.4])
    log_weights = [_log_normal(x, d, math.sqrt(beta / 4)) + _log_normal(zs, 0.0, 1.0) - _log_normal(zs, mean, std)
                   for d, zs in zip(decoded, z)]
    expected = math.log(np.mean(np.exp(log_weights)))
    value = bosa.log_likelihood_estimate(jnp.array([[x]]), jnp.array(decoded).reshape(2, 1, 1), jnp.array([[mean]]),
                                         jnp.array([[std]]), jnp.array(z).reshape(2, 1, 1), beta)
    chex.assert_shape(value, (1,))
    assert float(value[0]) == pytest.approx(expected, rel=1e-5)
    # the prior is N(0, I): with q(z | x) = N(0, I) itself, log p(z) - log q(z | x) = 0 and the estimate is the
    # decoder's density alone, whatever z (a prior std of 0, ODRL's old bug, would make it -inf or NaN)
    for z_value in (0.0, 1.7):
        value = bosa.log_likelihood_estimate(jnp.array([[x]]), jnp.array([[[0.5]]]), jnp.zeros((1, 1)),
                                             jnp.ones((1, 1)), jnp.array([[[z_value]]]), beta)
        assert float(value[0]) == pytest.approx(_log_normal(x, 0.5, math.sqrt(beta / 4)), rel=1e-6)


def test_dynamics_support_mask_by_hand():
    log_likelihood = jnp.array([[-1.0, -6.0, -4.0],
                                [-3.0, -2.0, -5.0]])  # [E = 2, B = 3]
    # the smallest over the ensemble, [-3, -6, -5], against log 0.01 = -4.605
    np.testing.assert_array_equal(bosa.dynamics_support_mask(log_likelihood, 0.01), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(bosa.dynamics_support_mask(log_likelihood, 0.001), [1.0, 1.0, 1.0])  # -6.9
    chex.assert_shape(bosa.dynamics_support_mask(log_likelihood, 0.01), (3,))


def test_supported_critic_loss_by_hand():
    q = jnp.array([[1.0, 2.0, 3.0],
                   [0.0, 2.0, 5.0]])
    target, mask = jnp.ones(3), jnp.array([1.0, 0.0, 1.0])
    # squared errors summed over the critics [1, 2, 20]; 0.5 * mask -> [0.5, 0, 10], mean over all 3: 3.5;
    # conservation 0.1 * (mean(1, 2) + mean(0, 2)) = 0.25 on the first two (source) transitions
    loss = bosa.supported_critic_loss(q, target, mask, q[:, :2], 0.1)
    assert float(loss) == pytest.approx(3.75, rel=1e-6)
    with pytest.raises(AssertionError):  # a [B, 1] mask would broadcast against [B]
        bosa.supported_critic_loss(q, target, mask[:, None], q[:, :2], 0.1)


def test_supported_actor_loss_by_hand_and_its_gradient():
    q, log_beta = jnp.array([1.0, -2.0, 3.0]), jnp.array([-1.0, -6.0, -3.0])
    # -mean Q / mean |Q| = -(2/3) / 2 = -1/3; lagrangian: 0.1 * mean(1, 6, 3) = 1/3
    assert float(bosa.supported_actor_loss(q, log_beta, 0.1, 0.01, "lagrangian")) == pytest.approx(0.0, abs=1e-6)
    # hinge: max(0, log 0.01 - log beta) = [0, 6 - 4.605, 0]
    hinge = 0.1 * (6.0 + math.log(0.01)) / 3
    assert float(bosa.supported_actor_loss(q, log_beta, 0.1, 0.01, "hinge")) == pytest.approx(-1 / 3 + hinge, rel=1e-5)
    # the normaliser is a constant: dL/dQ_i = -1 / (B mean |Q|) = -1/6; dL/dlog_beta_i = -lambda / B, or 0 where the
    # hinge is inactive
    grad_q, grad_log_beta = jax.grad(bosa.supported_actor_loss, argnums=(0, 1))(q, log_beta, 0.1, 0.01, "lagrangian")
    np.testing.assert_allclose(grad_q, [-1 / 6] * 3, rtol=1e-6)
    np.testing.assert_allclose(grad_log_beta, [-0.1 / 3] * 3, rtol=1e-6)
    _, grad_log_beta = jax.grad(bosa.supported_actor_loss, argnums=(0, 1))(q, log_beta, 0.1, 0.01, "hinge")
    np.testing.assert_allclose(grad_log_beta, [0.0, -0.1 / 3, 0.0], rtol=1e-6, atol=1e-9)
    with pytest.raises(AssertionError):
        bosa.supported_actor_loss(q, log_beta[:, None], 0.1, 0.01, "lagrangian")


def test_cvae_and_ensemble_shapes():
    obs, actions = jnp.ones((4, 3)), jnp.zeros((4, 2))
    behaviour = bosa.CVAE((8,), 4, 2, squash=True)
    params = behaviour.init(jax.random.PRNGKey(0), obs, actions, jnp.zeros((1, 1, 4)))
    decoded, mean, std, z = behaviour.apply(params, obs, 5.0 * actions + 3.0, jax.random.normal(jax.random.PRNGKey(1),
                                                                                                  (3, 4, 4)))
    chex.assert_shape([decoded], (3, 4, 2))
    chex.assert_shape([mean, std], (4, 4))
    chex.assert_shape([z], (3, 4, 4))
    assert float(jnp.abs(decoded).max()) <= 1.0 and float(std.min()) >= math.exp(-4.0)
    ensemble = bosa.DynamicsEnsemble((8,), 6, 3, 5)
    obs_action = jnp.concatenate([obs, actions], -1)
    params = ensemble.init(jax.random.PRNGKey(0), obs_action, obs, jnp.zeros((5, 1, 1, 6)))
    decoded, mean, std, z = ensemble.apply(params, obs_action, obs, jnp.ones((5, 2, 4, 6)))
    chex.assert_shape([decoded], (5, 2, 4, 3))
    chex.assert_shape([mean, std], (5, 4, 6))
    assert not np.allclose(decoded[0], decoded[1])  # each member has its own initialisation


# ---------------------------------------------------------------- the update
def _transitions(rng, n, obs_dim=3, act_dim=2):
    return bosa.Transitions(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminals=(rng.uniform(size=n) < 0.1).astype(np.float32))


def _setup(**flags):
    rng = np.random.default_rng(0)
    data = jax.device_put(bosa.Data(_transitions(rng, 200), _transitions(rng, 40)))
    args = bosa.Args(hidden=(8, 8), batch_size=16, **flags)
    vae_init, _ = bosa.make_vae_train((8,), 1e-3, 16, 0.5, 2, "target", 3, 2)
    vaes = vae_init(jax.random.PRNGKey(1))
    frozen = bosa.Frozen(vaes.behaviour.params, vaes.dynamics.params)
    init, train = bosa.make_train(args, 3, 2, (8,), 0.5, 2)
    return data, frozen, init, train


def _hparams(epsilon_dyna=0.01, conservation=0.1):
    return bosa.Hyperparams(jnp.float32(0.1), jnp.float32(epsilon_dyna), jnp.float32(conservation))


@pytest.mark.parametrize("policy_freq", [1, 2])
def test_actor_and_targets_move_every_policy_freq_steps(policy_freq):
    data, frozen, init, train = _setup(policy_freq=policy_freq)
    runner = init(jax.random.PRNGKey(0))
    one, _ = train(runner, data, frozen, _hparams(), 1)
    two, _ = train(runner, data, frozen, _hparams(), 2)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    assert not same(one.state.critic.params, runner.state.critic.params)  # the critic learns every step
    assert same(one.state.actor.params, runner.state.actor.params) == (policy_freq == 2)
    assert same(one.state.actor_target_params, runner.state.actor_target_params) == (policy_freq == 2)
    assert same(one.state.critic_target_params, runner.state.critic_target_params) == (policy_freq == 2)
    assert not same(two.state.actor.params, runner.state.actor.params)
    assert int(two.state.actor.step) == 2 // policy_freq


def test_the_dynamics_mask_reaches_source_only_or_every_transition():
    """With a threshold no transition meets, --dynamics-mask all leaves no TD term (loss 0 without conservation),
    while the default keeps the target transitions in; a threshold far below lets (most) transitions in."""

    def chunk_metrics(dynamics_mask, epsilon_dyna):
        data, frozen, init, train = _setup(dynamics_mask=dynamics_mask)
        return train(init(jax.random.PRNGKey(0)), data, frozen, _hparams(epsilon_dyna, 0.0), 5)[1]

    for dynamics_mask, empty in (("all", True), ("source", False)):
        metrics = chunk_metrics(dynamics_mask, 1e30)
        assert float(metrics["source_supported"]) == float(metrics["target_supported"]) == 0.0
        assert (float(metrics["critic_loss"]) == 0.0) == empty
    metrics = chunk_metrics("all", 1e-30)
    assert float(metrics["source_supported"]) > 0.5 and float(metrics["target_supported"]) > 0.5


def test_dynamics_ensemble_finds_target_transitions_likelier_than_shifted_ones():
    rng = np.random.default_rng(1)
    source, target = _transitions(rng, 400), _transitions(rng, 400)
    source = jax.device_put(source._replace(next_observations=source.observations + 2.0))
    target = jax.device_put(target._replace(next_observations=target.observations))
    init, train = bosa.make_vae_train((32, 32), 3e-3, 64, 0.5, 2, "target", 3, 2)
    runner, metrics = jax.jit(lambda r: train(r, source, target, 300))(init(jax.random.PRNGKey(0)))
    assert all(np.isfinite(float(value)) for value in metrics.values())
    net = bosa.DynamicsEnsemble((32, 32), 6, 3, 2)

    def mean_log_likelihood(t):
        noise = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 400, 6))
        outputs = net.apply(runner.dynamics.params, jnp.concatenate([t.observations, t.actions], -1),
                            t.next_observations, noise)
        ll = jax.vmap(bosa.log_likelihood_estimate, in_axes=(None, 0, 0, 0, 0, None))(t.next_observations, *outputs,
                                                                                       0.5)
        return float(ll.min(0).mean())

    assert mean_log_likelihood(target) > mean_log_likelihood(source) + 10.0


def test_copied_algorithm_code_is_identical():
    iql, dvdf = _load("iql"), _load("dvdf")
    shared = {iql: ["MLP", "TwinCritic", "Actor", "Transitions", "critic_loss"], dvdf: ["to_transitions"]}
    for module, names in shared.items():
        for name in names:
            assert inspect.getsource(getattr(bosa, name)) == inspect.getsource(getattr(module, name)), name
    assert (bosa.LOG_STD_MIN, bosa.LOG_STD_MAX) == (iql.LOG_STD_MIN, iql.LOG_STD_MAX)
    for name in ("open_run", "train_loop", "run_stage", "cached_stage", "save_stage", "stage_path", "fingerprint",
                 "evaluation_entry", "check_common_flags", "need", "write_atomic", "run_flags", "value_bound_of",
                 "load_source_target", "datasets_line"):
        assert getattr(bosa, name, getattr(envs.run, name)) is getattr(envs.run, name), f"bosa.py copies {name}"


# ---------------------------------------------------------------- end to end through main()
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("bosa_data"), np.random.default_rng(0)
    return {"source": write_d4rl(folder / "source.hdf5", rng, 2000, 100),
            "target": write_d4rl(folder / "target.hdf5", rng, 1000, 100, ref=(REF_MIN, REF_MAX)),
            "cache": str(folder / "cache")}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--cache-dir", datasets["cache"], "--steps", "200", "--eval-every", "100", "--eval-episodes", "1",
            "--num-seeds", "2", "--seed", "3", "--hidden", "16", "16", "--batch-size", "32", "--vae-steps", "120",
            "--vae-batch-size", "32", "--vae-hidden", "16", "16", "--ensemble-size", "2", "--target-size", "200",
            "--references", "zoo", *extra]


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bosa_run")
    return out, bosa.main(_flags(datasets, out))


def test_end_to_end_results_json_and_the_cached_stage(datasets, finished_run, tmp_path):
    out, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "bosa" and results["finished"] and results["step"] == 200
    assert results["seeds"] == [3, 4] and results["args"]["lambda_policy"] == 0.1
    assert results["args"]["epsilon_dyna"] == 0.01 and results["args"]["dynamics_data"] == "target"
    assert results["data"]["target_size"] == 200 and results["data"]["source_size"] == 2000
    vae = results["stages"]["vae"]
    assert vae["origin"] == "trained" and vae["steps"] == 120 and vae["ensemble_size"] == 2
    assert Path(vae["path"]).parent == Path(datasets["cache"])
    assert all(math.isfinite(value) for value in vae["final_losses"].values())
    for domain, size in (("source", 2000), ("target", 200)):
        summary = results["support"][domain]
        assert summary["transitions"] == size and 0.0 <= summary["supported"] <= 1.0
        assert math.isfinite(summary["dynamics_log_likelihood_mean"])
        assert math.isfinite(summary["behaviour_log_likelihood_mean"])
    assert [e["step"] for e in results["evaluations"]] == [100, 200]
    for evaluation in results["evaluations"]:
        assert len(evaluation["scores"]) == 2 and all(map(math.isfinite, evaluation["returns"] + evaluation["scores"]))
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
        assert {"source_supported", "target_supported", "log_beta_mean"} <= set(evaluation["losses"])
    assert results["final"]["scores"] == results["evaluations"][-1]["scores"]
    assert (out / "checkpoint.msgpack").exists() and not list(out.glob("*.tmp"))

    # a second run of other TD3 flags reads both VAEs from the cache
    again = bosa.main(_flags(datasets, tmp_path / "again", "--steps", "100", "--support-penalty", "hinge"))
    assert again["stages"]["vae"]["origin"] == "cache" and again["finished"]


def _runner_leaves(out: Path):
    saved = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    return saved["step"], jax.tree.leaves(saved["runner"])


def test_resume_after_kill_gives_the_same_final_parameters(datasets, finished_run, tmp_path, monkeypatch):
    """Every random draw (batches, smoothing noise, the density estimates' z) comes from the checkpointed key."""
    out, calls, real_evaluate = tmp_path / "interrupted", [], bosa.evaluate

    def killed_during_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: the checkpoint still holds step 100
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(bosa, "evaluate", killed_during_second_evaluation)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        bosa.main(_flags(datasets, out))
    monkeypatch.setattr(bosa, "evaluate", real_evaluate)
    assert _runner_leaves(out)[0] == 100
    resumed = bosa.main(_flags(datasets, out, "--resume"))
    (step, leaves), (reference_step, reference_leaves) = _runner_leaves(out), _runner_leaves(finished_run[0])
    assert step == reference_step == 200 and len(leaves) == len(reference_leaves)
    for leaf, reference in zip(leaves, reference_leaves):
        np.testing.assert_array_equal(leaf, reference)  # bit for bit
    assert resumed["final"]["scores"] == finished_run[1]["final"]["scores"]
    assert resumed["timing"]["resumed_from_step"] == 100


@pytest.mark.parametrize("flags, message", [
    (["--epsilon-dyna", "0"], "--epsilon-dyna must be positive"),
    (["--lambda-policy", "-1"], "--lambda-policy must be 0 or more"),
    (["--vae-batch-size", "7"], "--vae-batch-size must be even and at least 2"),
    (["--policy-freq", "0"], "--policy-freq must be at least 1"),
    (["--ensemble-size", "0"], "--ensemble-size must be at least 1"),
    (["--vae-hidden", "0"], "--vae-hidden must be one or more positive layer widths"),
    (["--batch-size", "33"], "--batch-size must be even and at least 2"),
    (["--target", "nowhere"], "Unknown --target 'nowhere'"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, datasets, tmp_path):
    argv = ["--out", str(tmp_path), "--source-dataset", datasets["source"], "--target-dataset", datasets["target"]]
    assert_one_sentence_exit(bosa.main, [*argv, *flags], message)
