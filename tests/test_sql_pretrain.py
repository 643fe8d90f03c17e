"""algos/sql_pretrain.py: the SQL losses against numbers worked out by hand, vmapped seeds equal single seeds, a
tiny end-to-end run writes the artefact and a well-formed results.json, --resume equals an uninterrupted run bit
for bit. Tiny networks and a few hundred steps: whether SQL learns is a benchmark, not a test."""
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from envs import load_dataset
from envs.run import divergence
from synthetic import assert_one_sentence_exit, write_d4rl

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sql_pretrain", ROOT / "algos" / "sql_pretrain.py")
sql = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sql)

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah
REF_MIN, REF_MAX = -300.0, 3000.0


# ---------------------------------------------------------------- losses, by hand on a 4-sample batch
def test_sql_value_loss_by_hand():
    v = np.array([1.0, 2.0, -0.5, 0.0])
    target_q = np.array([1.5, 1.0, -0.5, -2.0])
    # alpha 0.5: u = target_q - v = [0.5, -1, 0, -2]; 1 + u / (2 alpha) = 1 + u = [1.5, 0, 1, -1]
    # squared hinge where positive: [2.25, 0 (exactly 0 is not > 0), 1, 0]; V / alpha = [2, 4, -1, 0]
    # per sample [4.25, 4, 0, 0]: mean 8.25 / 4
    loss, advantage = sql.sql_value_loss(jnp.array(v), jnp.array(target_q), 0.5)
    assert float(loss) == pytest.approx(2.0625, rel=1e-6)
    np.testing.assert_allclose(advantage, [0.5, -1.0, 0.0, -2.0])
    # alpha 0.1 (DVDF's): hinge = 1 + 5u = [3.5, -4, 1, -9]; squares [12.25, 0, 1, 0]; V / alpha = [10, 20, -5, 0]
    loss = sql.sql_value_loss(jnp.array(v), jnp.array(target_q), 0.1)[0]
    assert float(loss) == pytest.approx((22.25 + 20 - 4 + 0) / 4, rel=1e-6)


def test_sql_value_loss_gradient_by_hand():
    # d/dV of (1 + (q - V) / (2 alpha))^2 + V / alpha = -(1 + u / (2 alpha)) / alpha + 1 / alpha where the hinge is
    # positive, 1 / alpha elsewhere; alpha 0.5, one sample with u = 0.5: -(1.5) * 2 + 2 = -1
    grad = jax.grad(lambda v: sql.sql_value_loss(v, jnp.array([1.5, 1.0]), 0.5)[0])(jnp.array([1.0, 2.0]))
    # second sample u = -1: hinge 0, gradient 1 / alpha = 2; both divided by the batch of 2
    np.testing.assert_allclose(grad, [-0.5, 1.0], rtol=1e-6)


def test_critic_loss_by_hand():
    q = np.array([[1.0, 2.0, 3.0, 4.0],
                  [0.0, 2.5, 3.0, 5.0]])
    target = np.array([1.0, 2.0, 2.0, 2.0])
    # per sample, summed over critics: [1, 0.25, 2, 13]; mean 16.25 / 4; each critic's MSE summed
    loss = sql.critic_loss(jnp.array(q), jnp.array(target), jnp.ones(4))
    assert float(loss) == pytest.approx(16.25 / 4, rel=1e-6)
    with pytest.raises(AssertionError):  # a [B, 1] weight would broadcast to [B, B]
        sql.critic_loss(jnp.array(q), jnp.array(target), jnp.ones((4, 1)))


def test_policy_weight_by_hand():
    weight = sql.sql_policy_weight(jnp.array([-1.0, 0.5, 200.0, 0.0]), 100.0)
    np.testing.assert_allclose(weight, [0.0, 0.5, 100.0, 0.0])


def test_default_alpha_follows_dvdf_configs():
    assert sql.default_alpha("ant") == 0.2 and sql.default_alpha("ant-kinematic") == 0.2
    assert sql.default_alpha("halfcheetah-kinematic") == 0.1 and sql.default_alpha("hopper") == 0.1


# ---------------------------------------------------------------- seeds in one vmapped program
def test_seed_k_of_vmapped_run_equals_single_seed_run():
    rng = np.random.default_rng(0)
    args = sql.Args(hidden=(8, 8), batch_size=16, steps=60)
    source = sql.Transitions(rng.normal(size=(200, 3)).astype(np.float32),
                             rng.uniform(-1, 1, (200, 2)).astype(np.float32), rng.normal(size=200).astype(np.float32),
                             rng.normal(size=(200, 3)).astype(np.float32), np.zeros(200, np.float32))
    source = jax.device_put(source)
    init, train = sql.make_train(args, 3, 2)
    seeds = [3, 4]
    many = jax.jit(jax.vmap(lambda r, h: train(r, source, h, 60)))
    runner, metrics = many(jax.jit(jax.vmap(init))(jnp.stack([jax.random.PRNGKey(s) for s in seeds])),
                           sql.Hyperparams(jnp.full(2, 0.1)))
    one, init_one = jax.jit(lambda r: train(r, source, sql.Hyperparams(jnp.float32(0.1)), 60)), jax.jit(init)
    for k, seed in enumerate(seeds):
        single, _ = one(init_one(jax.random.PRNGKey(seed)))
        for many_seeds, one_seed in zip(jax.tree.leaves(runner), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(many_seeds[k], one_seed, rtol=1e-5, atol=1e-6)
    assert np.isfinite(metrics["value_loss"]).all() and metrics["actor_loss"].shape == (2,)


# ---------------------------------------------------------------- end to end through main()


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    return write_d4rl(tmp_path_factory.mktemp("sql_data") / "source.hdf5", np.random.default_rng(0), 2000, 100,
                       ref=(REF_MIN, REF_MAX))


def _flags(source_file, out, *extra):
    return ["--source-dataset", source_file, "--out", str(out), "--steps", "200", "--eval-every", "100",
            "--eval-episodes", "1", "--num-seeds", "2", "--seed", "3", "--hidden", "16", "16", "--batch-size", "32",
            *extra]


@pytest.fixture(scope="module")
def finished_run(source_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sql_run")
    return out, sql.main(_flags(source_file, out))


def test_end_to_end_results_and_artifact(finished_run):
    out, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "sql" and results["finished"] and results["step"] == 200
    assert results["seeds"] == [3, 4] and results["alpha"] == 0.1
    assert [e["step"] for e in results["evaluations"]] == [100, 200]
    for evaluation in results["evaluations"]:
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        for name in ("value_loss", "critic_loss", "actor_loss", "advantage_mean"):
            assert len(evaluation["losses"][name]) == 2 and all(map(math.isfinite, evaluation["losses"][name]))
    assert results["final"]["score_mean"] == pytest.approx(float(np.mean(results["evaluations"][-1]["scores"])))
    assert results["timing"]["updates_per_second"] == pytest.approx(2 * results["timing"]["steps_per_second"])

    artifact = serialization.msgpack_restore((out / "sql.msgpack").read_bytes())
    info = json.loads((out / "sql.json").read_text())
    assert set(artifact) == {"critic", "value"}
    leaves = jax.tree.leaves(artifact)
    assert all(leaf.shape[0] == 2 and np.isfinite(leaf).all() for leaf in leaves)  # stacked over the 2 seeds
    assert info["kind"] == "sql" and info["finished"] and info["seeds"] == [3, 4] and info["hidden"] == [16, 16]
    assert (info["obs_dim"], info["act_dim"], info["alpha"]) == (OBS_DIM, ACT_DIM, 0.1)
    assert info["source_fingerprint"] == results["data"]["source_fingerprint"]
    assert not list(out.glob("*.tmp"))


def test_no_policy_trains_only_critics_and_value(source_file, tmp_path):
    results = sql.main(_flags(source_file, tmp_path, "--no-policy", "--num-seeds", "1", "--steps", "100"))
    assert results["finished"] and results["final"] is None
    assert "returns" not in results["evaluations"][-1] and "actor_loss" not in results["evaluations"][-1]["losses"]
    assert (tmp_path / "sql.msgpack").exists()


def test_resume_after_kill_gives_the_same_final_parameters(source_file, finished_run, tmp_path, monkeypatch):
    out, calls = tmp_path / "interrupted", []
    real_evaluate = sql.evaluate

    def killed_during_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sql, "evaluate", killed_during_second_evaluation)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        sql.main(_flags(source_file, out))
    monkeypatch.setattr(sql, "evaluate", real_evaluate)
    with pytest.raises(SystemExit, match="--resume"):
        sql.main(_flags(source_file, out))
    resumed = sql.main(_flags(source_file, out, "--resume"))
    saved = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    reference = serialization.msgpack_restore((finished_run[0] / "checkpoint.msgpack").read_bytes())
    for leaf, reference_leaf in zip(jax.tree.leaves(saved["runner"]), jax.tree.leaves(reference["runner"]),
                                    strict=True):
        np.testing.assert_array_equal(leaf, reference_leaf)  # bit for bit
    assert resumed["final"]["scores"] == finished_run[1]["final"]["scores"]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--alpha", "0"], "--alpha must be positive"),
    (["--source", "halfcheeta"], "Unknown --source 'halfcheeta'"),
    (["--eval-domain", "hopper-nowhere"], "Unknown --eval-domain"),
    (["--tau", "2"], "--tau must be in (0, 1]"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, tmp_path):
    assert_one_sentence_exit(sql.main, ["--out", str(tmp_path), *flags], message)


def test_divergence_guard_by_hand():
    bound = 10.0 * 2.0 / (1 - 0.99)  # ten times the largest discounted return of rewards in [-2, 2]
    assert divergence({"q_mean": np.array([150.0, -199.0]), "value_loss": np.array([1.0, 2.0])}, bound) is None
    assert divergence({"q_mean": np.array([2100.0]), "value_loss": np.array([1.0])}, bound).startswith(
        "|mean Q| reached 2.1e+03, beyond 2e+03")
    assert divergence({"q_mean": np.array([10.0, -2100.0]), "value_loss": np.array([1.0])}, bound) is not None
    assert divergence({"q_mean": np.array([1.0]), "critic_loss": np.array([np.nan])}, bound) == \
        "critic_loss is not finite"
    assert divergence({"q_mean": np.array([1.0]), "critic_loss": np.array([2e10])}, None) == \
        "critic_loss reached 2e+10, beyond 1e+10"
    assert divergence({"q_mean": np.array([1e9]), "critic_loss": np.array([1.0])}, None) is None  # no bound given


def test_a_diverging_stage_stops_with_one_sentence_and_keeps_the_last_sound_artifact(tmp_path):
    """Rewards x 1e6: the critic loss passes LOSS_LIMIT in the first chunk; the run stops naming the stage, the
    chunk and what to try, and writes no artefact of the diverged chunk."""
    rng = np.random.default_rng(1)
    path = write_d4rl(tmp_path / "huge.hdf5", rng, 2000, 100, ref=(REF_MIN, REF_MAX))
    import h5py
    with h5py.File(path, "r+") as file:
        file["rewards"][...] = file["rewards"][()] * 1e6
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        sql.main(_flags(path, out, "--no-policy", "--no-reward-scaling", "--steps", "2000", "--eval-every", "100"))
    text = str(stop.value)
    assert text.startswith("SQL diverged in the ") and "Try --reward-scaling --layer-norm" in text and "\n" not in text
    saved = json.loads((out / "sql.json").read_text()) if (out / "sql.json").exists() else None
    first_bad = int(text.split("SQL diverged in the ")[1].split("-")[0])
    assert saved is None or saved["step"] == first_bad  # the artefact stays at the last sound chunk


def test_layer_norm_and_reward_scaling_flags(source_file, tmp_path):
    results = sql.main(_flags(source_file, tmp_path / "run", "--no-policy", "--layer-norm", "--reward-scaling",
                              "--steps", "100"))
    returns = np.array([s.sum() for s in np.split(np.asarray(load_dataset(source_file).rewards, np.float64), 20)])
    assert results["data"]["reward_scale"] == pytest.approx(1000.0 / (returns.max() - returns.min()), rel=1e-6)
    artifact = serialization.msgpack_restore((tmp_path / "run" / "sql.msgpack").read_bytes())
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(artifact)[0]]
    assert any("LayerNorm_0" in path for path in paths) and any("LayerNorm_1" in path for path in paths)
    info = json.loads((tmp_path / "run" / "sql.json").read_text())
    assert info["layer_norm"] is True and info["reward_scale"] == results["data"]["reward_scale"]
