"""algos/sac.py: the tanh-Gaussian log-probability by hand, a tiny run, its resume, fine-tuning, bad flags."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--env", "halfcheetah", "--learning-starts", "100", "--hidden", "32", "--batch-size", "32",
        "--checkpoint-every", "200", "--snapshot-every", "100", "--eval-every", "1000", "--eval-episodes", "1"]


def load_sac():
    spec = importlib.util.spec_from_file_location("sac", ROOT / "algos" / "sac.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sac(*flags):
    return subprocess.run([sys.executable, "algos/sac.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_tanh_gaussian_log_prob_matches_numpy():
    sac = load_sac()
    mean = jnp.array([[0.3, -1.0], [2.0, 0.0]])
    log_std = jnp.array([[-0.5, 0.2], [0.0, -2.0]])
    action, log_prob = sac.sample_tanh_gaussian(mean, log_std, jax.random.PRNGKey(3))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), mean.shape))
    pre_tanh = np.asarray(mean) + np.exp(np.asarray(log_std)) * noise
    gaussian = -0.5 * noise**2 - np.asarray(log_std) - 0.5 * np.log(2 * np.pi)
    expected = (gaussian - np.log(1 - np.tanh(pre_tanh) ** 2)).sum(-1)
    assert log_prob.shape == (2,)
    np.testing.assert_allclose(np.asarray(action), np.tanh(pre_tanh), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(log_prob), expected, rtol=1e-4)


def test_tiny_run_then_resume(tmp_path):
    out = tmp_path / "run"
    first = run_sac(*TINY, "--total-steps", "300", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    with np.load(out / "checkpoint.npz") as checkpoint:
        assert int(checkpoint["step"]) == 300 and int(checkpoint["buffer/size"]) == 300
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == \
        ["actor_100.npz", "actor_200.npz", "actor_300.npz"]

    second = run_sac(*TINY, "--total-steps", "500", "--out", str(out), "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at step 300" in second.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [100, 200, 300, 400, 500]  # the step count went on from 300
    for row in rows[1:]:
        for name in ("critic_loss", "actor_loss", "alpha", "eval_return_mean"):
            assert np.isfinite(row[name]), (row["step"], name)
    assert (out / "eval.csv").read_text().splitlines()[0] == "step,eval_return_mean,eval_return_std"

    # the snapshot format that envs/ reads without importing sac.py
    with np.load(out / "snapshots" / "actor_500.npz") as snapshot, np.load(out / "checkpoint.npz") as checkpoint:
        assert int(snapshot["step"]) == 500 and np.isfinite(snapshot["eval_return_mean"])
        assert [snapshot[f"w{i}"].shape for i in range(3)] == [(17, 32), (32, 32), (32, 12)]
        assert all(snapshot[name].dtype == np.float32 for name in ("w0", "b0", "w1", "b1", "w2", "b2"))
        np.testing.assert_array_equal(snapshot["w0"], checkpoint["state.actor.params['params']['fc0']['kernel']"])
        assert int(checkpoint["step"]) == 500 and int(checkpoint["buffer/size"]) == 500
        assert checkpoint["buffer/timeouts"][299] == 1.0  # the episode cut by the resume
        assert np.isfinite(checkpoint["buffer/rewards"]).all()


@pytest.mark.parametrize("flags, message", [
    (["--env", "halfcheetha"], "Unknown --env"),
    (["--total-steps", "-5"], "--total-steps must be positive"),
    (["--learning-starts", "-1"], "--learning-starts must be zero or positive"),
])
def test_bad_flags_end_in_one_sentence(tmp_path, flags, message):
    result = run_sac(*flags, "--out", str(tmp_path / "bad"))
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_resume_without_checkpoint_says_so(tmp_path):
    result = run_sac("--resume", "--out", str(tmp_path / "none"))
    assert result.returncode != 0 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_init_from_starts_a_new_run_with_the_loaded_networks(tmp_path):
    source = tmp_path / "source"
    assert run_sac(*TINY, "--total-steps", "200", "--out", str(source)).returncode == 0
    # no update before step 1000: the fine-tuned run's actor is still exactly the loaded one
    tuned = run_sac(*TINY, "--env", "halfcheetah-kinematic", "--total-steps", "100", "--learning-starts", "1000",
                    "--out", str(tmp_path / "tuned"), "--init-from", str(source / "checkpoint.npz"))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "fine-tuning from" in tuned.stdout and "step 200" in tuned.stdout
    with np.load(source / "checkpoint.npz") as loaded, np.load(tmp_path / "tuned" / "checkpoint.npz") as checkpoint:
        for name in loaded.files:
            if name.startswith("state.") and name != "state.key":
                np.testing.assert_array_equal(checkpoint[name], loaded[name], err_msg=name)
        assert int(checkpoint["step"]) == 100 and int(checkpoint["buffer/size"]) == 100  # its own, fresh buffer
        assert json.loads(str(checkpoint["args"]))["init_from"] == str(source / "checkpoint.npz")
    resumed = run_sac(*TINY, "--env", "halfcheetah-kinematic", "--total-steps", "200", "--learning-starts", "1000",
                      "--out", str(tmp_path / "tuned"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "tuned" / "args.json").read_text())["init_from"] == str(source / "checkpoint.npz")

    wrong_size = run_sac(*TINY, "--hidden", "64", "--out", str(tmp_path / "wrong"),
                         "--init-from", str(source / "checkpoint.npz"))
    assert wrong_size.returncode != 0 and "Traceback" not in wrong_size.stderr
    assert "--init-from needs a run with the observation and action sizes of halfcheetah" in wrong_size.stderr
    both = run_sac("--resume", "--init-from", str(source / "checkpoint.npz"), "--out", str(source))
    assert both.returncode != 0 and "pass only one of them" in both.stderr and "Traceback" not in both.stderr
