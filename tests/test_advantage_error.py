"""benchmarks/advantage_error.py: rollouts from stored MuJoCo states give the data back, the batched behaviour
policy draws what one-by-one calls draw, the metrics on known inputs, and the benchmark end to end on a tiny budget."""
import json
from pathlib import Path

import numpy as np
import pytest

import envs.generate as generate
from benchmarks import advantage_error as bench
from envs import domain_info, load_dataset


def test_batched_policy_draws_what_single_calls_draw(zoo):
    info = domain_info("hopper-kinematic")
    obs = np.random.default_rng(0).normal(size=(5, info.obs_dim))
    for policy in (generate.Policy(zoo / "medium.npz", info.act_dim), generate.Policy(None, info.act_dim)):
        batch = policy(obs, np.random.default_rng(7))
        rng = np.random.default_rng(7)
        np.testing.assert_allclose(batch, np.stack([policy(row, rng) for row in obs]), rtol=1e-12, atol=1e-14)
        assert batch.shape == (5, info.act_dim)


def test_one_step_rollouts_from_stored_states_give_the_datasets_rewards(zoo, monkeypatch):
    monkeypatch.setattr(generate, "DEFAULT_SIZE", 400)  # the generated medium dataset: 400 transitions
    dataset = load_dataset(domain="hopper-kinematic", quality="medium")
    sample = bench.sample_transitions(dataset, 12, np.random.default_rng(0))
    assert sample["policy"] == ["hopper-kinematic/medium.npz"] * 12
    jobs = [(sample["qpos"][i], sample["qvel"][i], sample["actions"][i].astype(np.float64), sample["policy"][i])
            for i in range(12)]
    returns, first_obs = bench.rollout_returns("hopper-kinematic", "papers", jobs, dataset.act_dim, 1,
                                               np.random.default_rng(1), slots=5)
    np.testing.assert_allclose(first_obs, sample["observations"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, dataset.rewards[sample["index"]], rtol=1e-5, atol=1e-6)
    # two steps: the dataset's reward plus 0.99 times the policy's next reward, so more than the one-step return
    # where the hopper stays alive and pays its alive bonus of 1
    two = bench.rollout_returns("hopper-kinematic", "papers", jobs, dataset.act_dim, 2, np.random.default_rng(1),
                                slots=5)[0]
    alive = dataset.terminals[sample["index"]] == 0
    assert np.all(two[alive] > returns[alive] + 0.5)
    np.testing.assert_allclose(two[~alive], returns[~alive])
    with pytest.raises(SystemExit, match="--states 401 is more than the 400 transitions"):
        bench.sample_transitions(dataset, 401, np.random.default_rng(0))


def test_metrics_on_known_inputs():
    truth = np.array([3.0, 1.0, 2.0, 0.0])
    assert bench.agreement(truth, truth) == 1.0
    assert bench.agreement(-truth, truth) == 0.0
    assert bench.agreement(np.array([3.0, 0.0, 1.0, 2.0]), truth) == 0.5  # keeps 0 and 3; truth's top half: 0, 2
    compared = bench.compare(truth + np.array([0.0, 2.5, 0.0, 0.0]), {"advantage": truth})
    assert compared["rmse"] == 1.25 and compared["mean"] == 2.125
    assert compared["spearman"] == pytest.approx(0.4)  # ranks 3 4 2 1 against 4 2 3 1: 1 - 6 * 6 / (4 * 15)
    assert bench.ceiling({"halves": (truth, truth)}) == 1.0
    assert bench.ceiling({"halves": (truth, -truth)}) == 0.0


def test_the_benchmark_end_to_end_on_a_tiny_budget(zoo, monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "DEFAULT_SIZE", 600)
    record = bench.main(["--source", "hopper-kinematic", "--qualities", "medium", "--steps", "20", "--states", "8",
                         "--rollouts", "2", "--horizon", "4", "--slots", "8", "--runs", str(tmp_path / "runs"),
                         "--out", str(tmp_path / "adv")])
    row = record["rows"][0]
    assert set(row["estimators"]) == {"sql", "iql"}
    for estimator in row["estimators"].values():
        assert estimator["step"] == 20 and -1.0 <= estimator["spearman"] <= 1.0
        assert 0.0 <= estimator["top_half_agreement"] <= 1.0 and estimator["rmse"] > 0
    assert row["estimators"]["iql"]["reward_scale"] == 1.0  # the authors' IQL: raw rewards
    assert row["estimators"]["sql"]["reward_scale"] != 1.0  # SQL's default: scaled rewards, read back in raw units
    assert row["mc"]["observation_mismatch"] < 1e-5
    assert json.loads(Path(tmp_path / "adv.json").read_text()) == record
    table = Path(tmp_path / "adv.md").read_text()
    assert "| medium | sql | 20 |" in table and "| medium | iql | 20 |" in table
    # a second call reuses the finished stages (no training: the run folders are not touched)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoint.msgpack")}
    bench.main(["--source", "hopper-kinematic", "--steps", "20", "--states", "8", "--rollouts", "2", "--horizon", "4",
                "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "adv")])
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(SystemExit, match="--horizon must be between 1 and 1000"):
        bench.main(["--horizon", "2000"])
