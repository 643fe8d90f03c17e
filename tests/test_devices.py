"""Several accelerators: the vmapped run axis of every algos/ script is sharded across them (jax.sharding), and a
sharded run trains the same networks as a one-device run. Two CPU devices stand in for two GPUs
(XLA_FLAGS=--xla_force_host_platform_device_count=2, in a subprocess: the flag must be set before jax starts)."""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from envs import run
from synthetic import write_d4rl

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-seeds", "2", "--hidden", "16", "16", "--batch-size", "32"]
RUNS = {  # script -> flags of a tiny run; each wires its data differently (per-seed, shared, or both)
    "iql": ["--steps", "60", "--eval-every", "30", "--eval-episodes", "1"],
    "igdf_scorer": ["--steps", "60", "--eval-every", "30"],
    "dvdf": ["--steps", "60", "--eval-every", "30", "--eval-episodes", "1", "--sql-steps", "40",
             "--scorer-steps", "40", "--lam", "0.7", "1.0"],
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    return ["--source-dataset", write_d4rl(folder / "source.hdf5", rng, 3000, 100),
            "--target-dataset", write_d4rl(folder / "target.hdf5", rng, 1000, 100, ref=(-300.0, 3000.0))]


def _runner_leaves(out: Path) -> list[np.ndarray]:
    saved = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    return [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(saved["runner"])]


@pytest.mark.parametrize("script", sorted(RUNS))
def test_two_devices_shard_the_runs_and_train_the_same_networks(script, datasets, tmp_path):
    """iql runs 3 seeds on the 2 devices: a copy of the last run fills the second device's share, both devices
    train, and every result holds the 3 runs only."""
    flags = [*datasets, *TINY, *RUNS[script]]
    if script == "iql":
        flags[flags.index("--num-seeds") + 1] = "3"
    if script == "dvdf":
        flags += ["--cache-dir", str(tmp_path / "cache")]
    spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([*flags, "--out", str(tmp_path / "one")])

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    done = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), *flags, "--out", str(tmp_path / "two")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["timing"]["devices"] == 1 and two["timing"]["devices"] == 2
    assert two["timing"]["padding_runs"] == (script == "iql") and one["timing"]["padding_runs"] == 0
    leaves_one, leaves_two = _runner_leaves(tmp_path / "one"), _runner_leaves(tmp_path / "two")
    assert len(leaves_one) == len(leaves_two) > 0
    if script == "iql":
        assert "3 runs on 2 devices: 1 copy of the last run fills the last device's share" in done.stdout
        assert [len(entry["scores"]) for entry in two["evaluations"]] == [3, 3] and len(two["final"]["scores"]) == 3
        assert [leaf.shape[0] for leaf in leaves_two] == [3] * len(leaves_two)
    for a, b in zip(leaves_one, leaves_two, strict=True):  # the same training, up to rounding of partitioned matmuls
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_tests_run_on_the_cpu_unless_told_otherwise():
    """tests/conftest.py makes the CPU the default platform, also where a GPU is visible: a GPU's TF32 matmuls differ
    from the CPU runs compared here by more than rtol 1e-4. JAX_PLATFORMS set before pytest starts chooses another."""
    assert os.environ["JAX_PLATFORMS"]
    if os.environ["JAX_PLATFORMS"] == "cpu":
        assert jax.default_backend() == "cpu" and {d.platform for d in jax.devices()} == {"cpu"}


def test_no_script_has_its_own_sharding_helper():
    """Sharding lives once, in envs/run.py: no algos/ file defines its own run_shardings (train_loop shards)."""
    for path in sorted((ROOT / "algos").glob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert "run_shardings" not in defined, f"{path.name} defines its own run_shardings"
    assert run.run_shardings(4) is None  # one device here: nothing to shard
