"""algos/dara.py: the classifier loss, delta_r and the augmented reward against numbers worked out by hand in numpy,
shapes, the augmentation against iql.py on pre-augmented rewards, the classifiers' label orientation, the copies of
iql.py's code held identical, and a tiny end-to-end run that writes a finite results.json and reuses its cached
stage. Tiny networks and a few hundred steps: whether DARA learns is a benchmark, not a test."""
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
from synthetic import assert_one_sentence_exit, write_d4rl

import envs.run

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"algos_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds a class's file through sys.modules
    spec.loader.exec_module(module)
    return module


dara, iql = _load("dara"), _load("iql")
REF_MIN, REF_MAX = -300.0, 3000.0

# three transitions: raw (source, target) logits of each classifier
SAS_LOGITS = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
SA_LOGITS = np.array([[1.0, -1.0], [0.5, 0.5], [0.0, 3.0]])
LABELS = np.array([0, 0, 1])


def _log_softmax(logits):
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


# ---------------------------------------------------------------- losses, by hand on a 3-sample batch
def test_classifier_loss_by_hand():
    # cross-entropy -log softmax(l)[label]: q_sas rows [log 2, log(1 + e^-2), log(1 + e^-1)],
    # q_sa rows [log(1 + e^-2), log 2, log(1 + e^-3)]
    sas = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]
    sa = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(-3))]
    expected = np.mean(sas) + np.mean(sa)
    loss = dara.classifier_loss(jnp.array(SAS_LOGITS), jnp.array(SA_LOGITS), jnp.array(LABELS))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the same by numpy's log-softmax: one softmax, on the raw logits
    rows = np.arange(3)
    by_numpy = -(_log_softmax(SAS_LOGITS)[rows, LABELS].mean() + _log_softmax(SA_LOGITS)[rows, LABELS].mean())
    assert float(loss) == pytest.approx(float(by_numpy), rel=1e-6)
    # a softmax before the cross-entropy (ODRL's double softmax) would give another, flatter loss
    probabilities = jax.nn.softmax(jnp.array(SAS_LOGITS)), jax.nn.softmax(jnp.array(SA_LOGITS))
    assert float(dara.classifier_loss(*probabilities, jnp.array(LABELS))) != pytest.approx(expected, rel=1e-3)


def test_reward_correction_by_hand():
    # delta_r = (log q_sas(t) - log q_sas(s)) - (log q_sa(t) - log q_sa(s)), and a log-softmax difference is the
    # logit difference: [(0 - 0) - (-1 - 1), (0 - 2) - (0.5 - 0.5), (1 - 0) - (3 - 0)] = [2, -2, -2]
    delta_r = dara.reward_correction(jnp.array(SAS_LOGITS), jnp.array(SA_LOGITS), 10.0)
    chex.assert_shape(delta_r, (3,))
    np.testing.assert_allclose(delta_r, [2.0, -2.0, -2.0], rtol=1e-6)
    log_sas, log_sa = _log_softmax(SAS_LOGITS), _log_softmax(SA_LOGITS)
    by_numpy = log_sas[:, 1] - log_sas[:, 0] - log_sa[:, 1] + log_sa[:, 0]
    np.testing.assert_allclose(delta_r, by_numpy, rtol=1e-6)
    np.testing.assert_allclose(dara.reward_correction(jnp.array(SAS_LOGITS), jnp.array(SA_LOGITS), 1.5),
                               [1.5, -1.5, -1.5])
    # far-apart logits are clipped, not infinite (a softmax then log of 0 would give -inf)
    far = dara.reward_correction(jnp.array([[200.0, -200.0]]), jnp.array([[0.0, 0.0]]), 10.0)
    np.testing.assert_allclose(far, [-10.0])


def test_augmented_reward_by_hand_and_its_shapes():
    rewards, delta_r = jnp.array([1.0, -0.5, 2.0]), jnp.array([2.0, -2.0, -2.0])
    np.testing.assert_allclose(dara.augmented_reward(rewards, delta_r, 0.1), [1.2, -0.7, 1.8], rtol=1e-6)
    np.testing.assert_allclose(dara.augmented_reward(rewards, delta_r, 0.0), rewards)
    with pytest.raises(AssertionError):  # [B] against [B, 1] would broadcast to [B, B]
        dara.augmented_reward(rewards, delta_r[:, None], 0.1)
    with pytest.raises(AssertionError):
        dara.classifier_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.zeros((3, 1), jnp.int32))


def test_relabel_in_chunks_equals_one_pass():
    rng = np.random.default_rng(0)

    class Fake:
        size = 10
        observations = rng.normal(size=(10, 3)).astype(np.float32)
        actions = rng.normal(size=(10, 2)).astype(np.float32)
        next_observations = rng.normal(size=(10, 3)).astype(np.float32)

    net = dara.DomainClassifiers((8,))
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)), jnp.zeros((1, 5)))
    delta_r_fn = dara.make_delta_r_fn((8,))
    whole = dara.relabel(delta_r_fn, params, Fake, 10.0)
    chex.assert_shape(whole, (10,))
    np.testing.assert_allclose(dara.relabel(delta_r_fn, params, Fake, 10.0, chunk=3), whole, rtol=1e-6)
    sas, sa = net.apply(params, *dara.classifier_inputs(Fake.observations, Fake.actions, Fake.next_observations))
    np.testing.assert_allclose(whole, (sas[:, 1] - sas[:, 0]) - (sa[:, 1] - sa[:, 0]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the augmentation inside the IQL step
def _transitions(module, rng, n, obs_dim=3, act_dim=2):
    return module.Transitions(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminals=(rng.uniform(size=n) < 0.1).astype(np.float32))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dara_equals_iql_merged_on_pre_augmented_rewards(eta):
    """DARA with delta_r is iql.py --data merged on source rewards r + eta delta_r: same batches, same parameters;
    with eta 0 it is iql.py's merged run itself."""
    rng = np.random.default_rng(0)
    source, target = jax.device_put((_transitions(dara, rng, 200), _transitions(dara, rng, 40)))
    delta_r = jnp.asarray(rng.normal(size=200), jnp.float32)
    dara_init, dara_train = dara.make_train(dara.Args(hidden=(8, 8), batch_size=16, steps=60), 3, 2)
    iql_init, iql_train = iql.make_train(iql.Args(hidden=(8, 8), batch_size=16, steps=60, data="merged"), 3, 2)
    key = jax.random.PRNGKey(7)
    ours, metrics = jax.jit(lambda r: dara_train(r, dara.Data(source, delta_r, target), dara.Hyperparams(
        jnp.float32(0.7), jnp.float32(3.0), jnp.float32(eta)), 60))(dara_init(key))
    augmented = iql.Transitions(*source)._replace(rewards=source.rewards + jnp.float32(eta) * delta_r)
    theirs, _ = jax.jit(lambda r: iql_train(r, iql.Data(augmented, iql.Transitions(*target)), iql.Hyperparams(
        jnp.float32(0.7), jnp.float32(3.0)), 60))(iql_init(key))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert np.isfinite(float(metrics["delta_r_mean"]))


def test_classifiers_score_target_like_transitions_higher():
    """The labels' orientation: after training on a source whose s' is shifted from the target's, delta_r is higher
    on target transitions than on source ones (noise off so that a few hundred steps suffice)."""
    rng = np.random.default_rng(1)
    source, target = _transitions(dara, rng, 400), _transitions(dara, rng, 400)
    source = jax.device_put(source._replace(next_observations=source.observations + 2.0))
    target = jax.device_put(target._replace(next_observations=target.observations))
    init, train = dara.make_classifier_train((16, 16), 3e-3, 64, 0.0, 3, 2)
    runner, metrics = jax.jit(lambda r: train(r, source, target, 300))(init(jax.random.PRNGKey(0)))
    assert float(metrics["sas_accuracy"]) > 0.9
    delta_r_fn = dara.make_delta_r_fn((16, 16))

    def mean_delta_r(t):
        return float(delta_r_fn(runner.state.params, t.observations, t.actions, t.next_observations, 10.0).mean())

    assert mean_delta_r(target) > 1.0 > -1.0 > mean_delta_r(source)


def test_copied_algorithm_code_is_identical():
    dvdf = _load("dvdf")  # here, not at import: the other tests do not need it
    shared = {iql: ["MLP", "TwinCritic", "ValueNet", "Actor", "IQLState", "Runner", "Transitions", "expectile_loss",
                    "value_loss", "critic_loss", "advantage_weight", "deterministic_actor_loss",
                    "gaussian_actor_loss", "make_policy"],
              dvdf: ["to_transitions"]}
    for module, names in shared.items():
        for name in names:
            assert inspect.getsource(getattr(dara, name)) == inspect.getsource(getattr(module, name)), name
    assert (dara.LOG_STD_MIN, dara.LOG_STD_MAX) == (iql.LOG_STD_MIN, iql.LOG_STD_MAX)
    # the harness is not copied: what dara.py uses of it is envs/run.py's own
    for name in ("open_run", "train_loop", "run_stage", "cached_stage", "save_stage", "stage_path", "fingerprint",
                 "evaluation_entry", "check_common_flags", "need", "write_atomic", "run_flags", "load_source_target",
                 "datasets_line"):
        assert getattr(dara, name, getattr(envs.run, name)) is getattr(envs.run, name), f"dara.py copies {name}"


# ---------------------------------------------------------------- end to end through main()
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("dara_data"), np.random.default_rng(0)
    return {"source": write_d4rl(folder / "source.hdf5", rng, 2000, 100),
            "target": write_d4rl(folder / "target.hdf5", rng, 1000, 100, ref=(REF_MIN, REF_MAX)),
            "cache": str(folder / "cache")}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--cache-dir", datasets["cache"], "--steps", "200", "--eval-every", "100", "--eval-episodes", "1",
            "--num-seeds", "2", "--seed", "3", "--hidden", "16", "16", "--batch-size", "32",
            "--classifier-steps", "150", "--classifier-batch-size", "32", "--target-size", "200",
            "--references", "zoo", *extra]


def test_end_to_end_results_json_and_the_cached_stage(datasets, tmp_path):
    out = tmp_path / "run"
    returned = dara.main(_flags(datasets, out))
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "dara" and results["finished"] and results["step"] == 200
    assert results["seeds"] == [3, 4] and results["args"]["eta"] == 0.1 and results["args"]["noise_std"] == 1.0
    assert results["data"]["target_size"] == 200 and results["data"]["source_size"] == 2000
    classifier = results["stages"]["classifier"]
    assert classifier["origin"] == "trained" and classifier["steps"] == 150
    assert Path(classifier["path"]).parent == Path(datasets["cache"])
    assert math.isfinite(classifier["final_losses"]["classifier_loss"])
    for domain in ("source", "target"):
        summary = results["reward_correction"][domain]
        assert all(math.isfinite(summary[key]) for key in ("mean", "std", "min", "max", "clipped_fraction"))
        assert -10.0 <= summary["min"] <= summary["mean"] <= summary["max"] <= 10.0
    assert [e["step"] for e in results["evaluations"]] == [100, 200]
    for evaluation in results["evaluations"]:
        assert len(evaluation["scores"]) == 2 and all(map(math.isfinite, evaluation["returns"] + evaluation["scores"]))
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
        assert "delta_r_mean" in evaluation["losses"]
    assert results["final"]["scores"] == results["evaluations"][-1]["scores"]
    assert (out / "checkpoint.msgpack").exists() and not list(out.glob("*.tmp"))

    # a second run of other IQL flags reads the classifiers from the cache, and gets the same correction
    again = dara.main(_flags(datasets, tmp_path / "again", "--steps", "100", "--eta", "0.3"))
    assert again["stages"]["classifier"]["origin"] == "cache"
    assert again["reward_correction"] == results["reward_correction"]


@pytest.mark.parametrize("flags, message", [
    (["--eta", "-1"], "--eta must be 0 or more"),
    (["--delta-r-clip", "0"], "--delta-r-clip must be positive"),
    (["--noise-std", "-0.5"], "--noise-std must be 0 or more"),
    (["--classifier-batch-size", "7"], "--classifier-batch-size must be even and at least 2"),
    (["--classifier-steps", "0"], "--classifier-steps must be at least 1"),
    (["--batch-size", "33"], "--batch-size must be even and at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--source", "halfcheeta"], "Unknown --source 'halfcheeta'"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, datasets, tmp_path):
    argv = ["--out", str(tmp_path), "--source-dataset", datasets["source"], "--target-dataset", datasets["target"]]
    assert_one_sentence_exit(dara.main, [*argv, *flags], message)
