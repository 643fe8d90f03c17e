"""algos/iql.py: losses against numbers worked out by hand, per-sample weight shapes, vmapped seeds equal single
seeds, --resume equals an uninterrupted run bit for bit, and a tiny end-to-end run writes a well-formed
results.json. Tiny networks and a few hundred steps: whether IQL learns is a benchmark, not a test."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.experimental.compilation_cache import compilation_cache

from envs import load_dataset, subsample
from synthetic import assert_one_sentence_exit, write_d4rl

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("iql", ROOT / "algos" / "iql.py")
iql = importlib.util.module_from_spec(spec)
spec.loader.exec_module(iql)

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah
REF_MIN, REF_MAX = -300.0, 3000.0  # written into the target file: its own references (--references zoo)
D4RL_MIN, D4RL_MAX = -280.178953, 12135.0  # halfcheetah's in D4RL: the default references in the papers' physics


# ---------------------------------------------------------------- losses, by hand on a 4-sample batch
def test_value_loss_by_hand():
    v = np.array([1.0, 2.0, -0.5, 0.0])
    target_q = np.array([1.5, 1.0, -0.5, 2.0])
    # u = target_q - v = [0.5, -1, 0, 2]; weights |0.7 - 1[u < 0]| = [0.7, 0.3, 0.7, 0.7]
    # loss = (0.7 * 0.25 + 0.3 * 1 + 0.7 * 0 + 0.7 * 4) / 4 = 3.275 / 4
    loss, advantage = iql.value_loss(jnp.array(v), jnp.array(target_q), 0.7)
    assert float(loss) == pytest.approx(0.81875, rel=1e-6)
    np.testing.assert_allclose(advantage, [0.5, -1.0, 0.0, 2.0])
    # expectile 0.5 is half the mean squared error
    assert float(iql.value_loss(jnp.array(v), jnp.array(target_q), 0.5)[0]) == pytest.approx(0.5 * 5.25 / 4)


def test_critic_loss_by_hand():
    q = np.array([[1.0, 2.0, 3.0, 4.0],
                  [0.0, 2.5, 3.0, 5.0]])
    target = np.array([1.0, 2.0, 2.0, 2.0])
    weight = np.array([1.0, 2.0, 0.5, 1.0])
    # per sample, summed over critics: [0 + 1, 0 + 0.25, 1 + 1, 4 + 9] = [1, 0.25, 2, 13]
    # weighted mean: (1 * 1 + 2 * 0.25 + 0.5 * 2 + 1 * 13) / 4 = 15.5 / 4
    loss = iql.critic_loss(jnp.array(q), jnp.array(target), jnp.array(weight))
    assert float(loss) == pytest.approx(3.875, rel=1e-6)
    # unit weights: the sum over the two critics of their mean squared errors
    plain = iql.critic_loss(jnp.array(q), jnp.array(target), jnp.ones(4))
    assert float(plain) == pytest.approx(float(((q - target) ** 2).mean(1).sum()), rel=1e-6)


ADVANTAGE = np.array([0.0, -1.0, 0.5, 2.0])  # exp(3 * 2) = 403 is clipped to 100
MEAN = np.array([[0.0, 0.5], [0.1, -0.2], [0.9, 0.0], [-0.5, 0.5]])
ACTIONS = np.array([[0.0, 0.0], [0.3, -0.2], [0.5, 0.2], [-0.5, 0.0]])


def test_advantage_weight_by_hand():
    weight = iql.advantage_weight(jnp.array(ADVANTAGE), 3.0, 100.0)
    np.testing.assert_allclose(weight, [1.0, math.exp(-3.0), math.exp(1.5), 100.0], rtol=1e-6)


def test_deterministic_actor_loss_by_hand():
    weight = iql.advantage_weight(jnp.array(ADVANTAGE), 3.0, 100.0)
    # squared errors per sample, mean over the 2 action dims: [0.125, 0.02, 0.1, 0.125]
    expected = (1.0 * 0.125 + math.exp(-3.0) * 0.02 + math.exp(1.5) * 0.1 + 100.0 * 0.125) / 4
    loss = iql.deterministic_actor_loss(jnp.array(MEAN), jnp.array(ACTIONS), weight)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_gaussian_actor_loss_by_hand():
    weight = iql.advantage_weight(jnp.array(ADVANTAGE), 3.0, 100.0)
    log_std = np.array([0.0, math.log(0.5)])
    # -log N(a; m, s) summed over dims = sum 0.5 ((a - m) / s)^2 + log s + 0.5 log(2 pi)
    z2 = ((ACTIONS - MEAN) / np.exp(log_std)) ** 2
    nll = (0.5 * z2 + log_std + 0.5 * math.log(2 * math.pi)).sum(1)
    expected = (np.array([1.0, math.exp(-3.0), math.exp(1.5), 100.0]) * nll).mean()
    loss = iql.gaussian_actor_loss(jnp.array(MEAN), jnp.array(log_std), jnp.array(ACTIONS), weight)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # first sample by hand: z^2 = [0, 1], nll = 0.5 + log 0.5 + log(2 pi)
    assert float(nll[0]) == pytest.approx(0.5 + math.log(0.5) + math.log(2 * math.pi))


def test_per_sample_weights_have_the_per_sample_loss_shape():
    q, target = jnp.zeros((2, 4)), jnp.ones(4)
    assert iql.advantage_weight(jnp.zeros(4), 3.0, 100.0).shape == (4,)
    with pytest.raises(AssertionError):  # [B, 1] against [B]: the broadcast that turned IGDF's weights scalar
        iql.critic_loss(q, target, jnp.ones((4, 1)))
    with pytest.raises(AssertionError):
        iql.deterministic_actor_loss(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.ones((4, 1)))
    with pytest.raises(AssertionError):
        iql.gaussian_actor_loss(jnp.zeros((4, 2)), jnp.zeros(2), jnp.zeros((4, 2)), jnp.ones((4, 1)))


# ---------------------------------------------------------------- seeds in one vmapped program
def _transitions(rng, n, obs_dim=3, act_dim=2):
    return iql.Transitions(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminals=(rng.uniform(size=n) < 0.1).astype(np.float32))


@pytest.mark.parametrize("actor", ["deterministic", "gaussian"])
def test_seed_k_of_vmapped_run_equals_single_seed_run(actor):
    rng = np.random.default_rng(0)
    args = iql.Args(hidden=(8, 8), batch_size=16, steps=100, actor=actor)
    seeds = [5, 6, 7]
    source, targets = _transitions(rng, 200), [_transitions(rng, 30) for _ in seeds]  # own subsample per seed
    init, train = iql.make_train(args, 3, 2)

    stacked = iql.Data(source, iql.Transitions(*(np.stack(field) for field in zip(*targets))))
    hparams = iql.Hyperparams(jnp.full(3, 0.7), jnp.full(3, 3.0))
    runner = jax.vmap(init)(jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]))
    many = jax.jit(jax.vmap(lambda r, d, h: train(r, d, h, 100), in_axes=(0, iql.Data(None, 0), 0)))
    runner, metrics = many(runner, stacked, hparams)
    assert metrics["critic_loss"].shape == (3,)

    one = jax.jit(lambda r, d, h: train(r, d, h, 100))
    for k, seed in enumerate(seeds):
        single, single_metrics = one(init(jax.random.PRNGKey(seed)), iql.Data(source, targets[k]),
                                     iql.Hyperparams(jnp.float32(0.7), jnp.float32(3.0)))
        # the same key chain, hence the same batch indices at every step, and the same parameters up to rounding
        np.testing.assert_array_equal(runner.rng[k], single.rng)
        for many_seeds, one_seed in zip(jax.tree.leaves(runner), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(many_seeds[k], one_seed, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["actor_loss"][k], single_metrics["actor_loss"], rtol=1e-5)
    # and the seeds really differ
    assert not np.allclose(runner.state.actor.params["params"]["MLP_0"]["Dense_0"]["kernel"][0],
                           runner.state.actor.params["params"]["MLP_0"]["Dense_0"]["kernel"][1])


# ---------------------------------------------------------------- end to end through main()


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """The runs through main() below compile the same programs; a persistent compilation cache (for this module
    only) compiles them once. A resumed process in real use compiles afresh: XLA on CPU is deterministic."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("iql_data"), np.random.default_rng(0)
    return {"source": write_d4rl(folder / "source.hdf5", rng, 2000, 100),
            "target": write_d4rl(folder / "target.hdf5", rng, 1000, 100, ref=(REF_MIN, REF_MAX))}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--steps", "250", "--eval-every", "100", "--eval-episodes", "1", "--num-seeds", "2", "--seed", "3",
            "--hidden", "16", "16", "--batch-size", "32", *extra]


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    out, printed = tmp_path_factory.mktemp("iql_run"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = iql.main(_flags(datasets, out))
    return out, returned, printed.getvalue()


def test_end_to_end_results_json(datasets, finished_run):
    out, returned, printed = finished_run
    # the closing line names the datasets trained on, not the default domains the flags left in place
    assert printed.splitlines()[-1].startswith(
        f"iql --data merged {datasets['source']} -> {datasets['target']}, seeds [3, 4]: final score ")
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "iql" and results["finished"] and results["step"] == 250
    assert results["seeds"] == [3, 4]
    args = results["args"]
    for flag in ("source", "target", "quality", "target_fraction", "target_size", "source_dataset",
                 "target_dataset", "steps", "eval_every", "eval_episodes", "num_seeds", "seed", "out", "data",
                 "expectile", "temperature", "actor", "reward_scaling", "hidden", "batch_size"):
        assert flag in args
    assert args["data"] == "merged" and args["expectile"] == 0.7 and args["temperature"] == 3.0
    assert results["data"]["target_size"] == 100 and results["data"]["source_size"] == 2000
    # the default is the papers' physics end to end: evaluated in it, normalised by D4RL's references as the papers
    assert args["physics"] == "papers" and args["references"] == "d4rl"
    assert (results["data"]["ref_min_score"], results["data"]["ref_max_score"]) == (D4RL_MIN, D4RL_MAX)
    assert results["data"]["references"].startswith("D4RL")

    assert [e["step"] for e in results["evaluations"]] == [100, 200, 250]  # the last chunk is the remainder
    for evaluation in results["evaluations"]:
        assert len(evaluation["returns"]) == len(evaluation["scores"]) == 2
        assert all(math.isfinite(x) for x in evaluation["returns"] + evaluation["scores"])
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - D4RL_MIN) / (D4RL_MAX - D4RL_MIN))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
    final = results["final"]
    assert final["scores"] == results["evaluations"][-1]["scores"]
    assert final["score_mean"] == pytest.approx(float(np.mean(final["scores"])))
    assert final["score_std"] == pytest.approx(float(np.std(final["scores"])))

    timing = results["timing"]
    assert timing["steps_per_second"] > 0 and timing["compile_seconds"] > 0
    assert timing["updates_per_second"] == pytest.approx(2 * timing["steps_per_second"])
    assert isinstance(timing["device_kind"], str)
    assert results["versions"]["jax"] == jax.__version__
    assert (out / "checkpoint.msgpack").exists()
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("extra", [["--data", "target", "--actor", "gaussian", "--reward-scaling"],
                                   ["--data", "source"]])
def test_baselines_and_original_iql_variants_run(datasets, tmp_path, extra):
    flags = _flags(datasets, tmp_path / "run", *extra)
    flags[flags.index("--steps") + 1], flags[flags.index("--num-seeds") + 1] = "100", "1"
    results = iql.main(flags)
    assert results["finished"] and [e["step"] for e in results["evaluations"]] == [100]
    assert all(math.isfinite(x) for values in results["evaluations"][0]["losses"].values() for x in values)
    if "target" in extra:
        assert results["data"]["source_dataset"] is None and results["data"]["reward_scale"] != 1.0
    else:
        assert results["data"]["target_size"] == 0 and results["data"]["source_size"] == 2000


@pytest.mark.parametrize("physics", ["papers", "v5"])
def test_physics_and_references_flags_reach_the_evaluation(datasets, tmp_path, monkeypatch, physics):
    """--physics selects the simulator the policy is evaluated in (the papers' by default); --references zoo
    normalises by the target data's own references instead of D4RL's."""
    seen = []
    evaluate = iql.evaluate
    monkeypatch.setattr(iql, "evaluate", lambda *a, **k: seen.append(k["physics"]) or evaluate(*a, **k))
    flags = _flags(datasets, tmp_path / "run", "--references", "zoo", *(["--physics", "v5"] if physics == "v5" else []))
    flags[flags.index("--steps") + 1], flags[flags.index("--num-seeds") + 1] = "100", "1"
    results = iql.main(flags)
    assert seen == [physics] and results["args"]["physics"] == physics
    assert (results["data"]["ref_min_score"], results["data"]["ref_max_score"]) == (REF_MIN, REF_MAX)
    assert results["data"]["references"] == f"the dataset {datasets['target']}"


def _runner_leaves(out: Path):
    saved = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    return saved["step"], jax.tree.leaves(saved["runner"])


def test_resume_after_kill_gives_the_same_final_parameters(datasets, finished_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls = []

    def killed_during_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: the checkpoint still holds step 100
        return real_evaluate(*args, **kwargs)

    real_evaluate = iql.evaluate
    monkeypatch.setattr(iql, "evaluate", killed_during_second_evaluation)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        iql.main(_flags(datasets, out))
    monkeypatch.setattr(iql, "evaluate", real_evaluate)
    assert _runner_leaves(out)[0] == 100

    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        iql.main(_flags(datasets, out))
    with pytest.raises(SystemExit, match="--steps"):  # resuming needs the same flags
        iql.main(_flags(datasets, out, "--resume", "--steps", "300"))

    resumed = iql.main(_flags(datasets, out, "--resume"))
    step, leaves = _runner_leaves(out)
    reference_step, reference_leaves = _runner_leaves(finished_run[0])
    assert step == reference_step == 250
    assert len(leaves) == len(reference_leaves)
    for leaf, reference in zip(leaves, reference_leaves):
        np.testing.assert_array_equal(leaf, reference)  # bit for bit
    assert resumed["final"]["scores"] == finished_run[1]["final"]["scores"]
    assert resumed["timing"]["resumed_from_step"] == 100
    again = iql.main(_flags(datasets, out, "--resume"))  # a finished run: nothing to do, the same results
    assert again["evaluations"] == resumed["evaluations"] and again["timing"] == resumed["timing"]


def test_each_seed_draws_its_own_target_subsample(datasets):
    args = iql.Args(source_dataset=datasets["source"], target_dataset=datasets["target"], target_size=50)
    data, target_full, info = iql.load_data(args, [3, 4])
    assert data.target.observations.shape == (2, 50, OBS_DIM) and info["target_size"] == 50
    for k, seed in enumerate([3, 4]):
        expected = subsample(load_dataset(datasets["target"]), count=50, seed=seed)
        np.testing.assert_array_equal(data.target.observations[k], expected.observations)
    assert data.source.observations.shape == (2000, OBS_DIM)


def test_reward_scaling_uses_the_episode_return_range(datasets):
    args = iql.Args(source_dataset=datasets["source"], target_dataset=datasets["target"], data="target",
                    reward_scaling=True)
    data, target_full, info = iql.load_data(args, [0])
    returns = iql.episode_returns(target_full)
    assert len(returns) == 10 and data.source is None
    assert info["reward_scale"] == pytest.approx(float(1000.0 / (returns.max() - returns.min())))


def test_state_normalisation_standardises_by_the_training_data_and_the_policy_sees_raw_states(datasets):
    args = iql.Args(source_dataset=datasets["source"], target_dataset=datasets["target"], target_size=50,
                    normalize_states=True)
    data, target_full, info = iql.load_data(args, [0])
    source = load_dataset(datasets["source"])
    observations = np.concatenate([source.observations, target_full.observations])  # full datasets, not subsamples
    mean, std = observations.mean(0), observations.std(0) + 1e-3
    np.testing.assert_allclose(info["state_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(info["state_std"], std, rtol=1e-5)
    np.testing.assert_allclose(data.source.observations, (source.observations - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data.source.next_observations, (source.next_observations - mean) / std,
                               rtol=1e-4, atol=1e-5)
    policy = iql.standardised(lambda params, obs: obs * params, mean, std)
    np.testing.assert_allclose(policy(2.0, jnp.asarray(mean + std)), 2.0 * np.ones_like(mean), rtol=1e-5)
    assert iql.load_data(dataclasses.replace(args, normalize_states=False), [0])[2]["state_mean"] is None


@pytest.mark.parametrize("flags, message", [
    (["--target-fraction", "1.5"], "--target-fraction must be in (0, 1]"),
    (["--target-fraction", "0"], "--target-fraction must be in (0, 1]"),
    (["--steps", "-5"], "--steps must be at least 1"),
    (["--target-size", "0"], "--target-size must be a positive"),
    (["--source", "halfcheeta"], "Unknown --source 'halfcheeta'"),
    (["--target", "nowhere"], "Unknown --target 'nowhere'"),
    (["--expectile", "1.0"], "--expectile must be in (0, 1)"),
    (["--batch-size", "33"], "--batch-size must be at least 2, and even"),
    (["--target-size", "1001"], "--target-size must be at most the target dataset's 1000 transitions"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, datasets, tmp_path):
    argv = ["--out", str(tmp_path), "--source-dataset", datasets["source"], "--target-dataset", datasets["target"]]
    assert_one_sentence_exit(iql.main, [*argv, *flags], message)


def test_unknown_quality_names_the_flag_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        iql.main(["--quality", "great"])
    error = capsys.readouterr().err
    assert "--quality" in error and "medium-replay" in error
