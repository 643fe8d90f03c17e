"""benchmarks/speed.py and the GPU lease's check (benchmarks/device_check.sh): the run axis cut to N runs, speed.md
keeping the rows it had, and the device check end to end at its small sizes on this CPU, rows written and finite."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import speed

ROOT = Path(__file__).resolve().parents[1]


def test_first_runs_cuts_the_run_axis_of_the_keys_and_of_the_per_run_inputs_only():
    shared, per_run = {"obs": np.zeros((7, 3))}, {"lam": jnp.arange(4.0), "xi": jnp.arange(8.0).reshape(4, 2)}
    program = {"keys": jnp.arange(8).reshape(4, 2), "in_axes": (None, {"lam": 0, "xi": 0}),
               "inputs": (shared, per_run)}
    keys, (kept_shared, kept_per_run) = speed.first_runs(program, 2)
    assert keys.shape == (2, 2) and kept_shared["obs"].shape == (7, 3)
    np.testing.assert_array_equal(kept_per_run["lam"], [0.0, 1.0])
    assert kept_per_run["xi"].shape == (2, 2)


HLO = """HloModule chunk

%fused (x: f32[4]) -> f32[4] {
  %x = f32[4] parameter(0)
  ROOT %m = f32[4] multiply(%x, %x)
}

%forward (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %g = f32[4] get-tuple-element(%p), index=1
  %f = f32[4] fusion(%g), kind=kLoop, calls=%fused
  %c = f32[4] copy(%f)
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4]) tuple(%n, %c)
}

%backward (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %g = f32[4] get-tuple-element(%p), index=1
  %f = f32[4] fusion(%g), kind=kLoop, calls=%fused
  ROOT %t = (s32[], f32[4]) tuple(%g, %f)
}

ENTRY %main (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]) parameter(0)
  %w = (s32[], f32[4]) while(%a), condition=%cond, body=%forward, backend_config={"known_trip_count":{"n":"7"}}
  %v = (s32[], f32[4]) while(%w), condition=%cond, body=%backward, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %u = (s32[], f32[4]) while(%v), condition=%cond, body=%fused, backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_step_ops_counts_the_launching_instructions_of_the_loop_of_that_many_steps():
    """Parameters, tuples, get-tuple-elements and constants launch nothing; the loop is found by its trip count."""
    assert speed.step_ops(HLO, 7) == {"fusion": 1, "copy": 1, "add": 1}  # the first loop of 7 (the forward pass)
    assert speed.step_ops(HLO, 7, every=True) == {"fusion": 2, "copy": 1, "add": 1}  # both loops of 7
    assert speed.step_ops(HLO, 3) == {"multiply": 1} and speed.step_ops(HLO, 5) == {}


def test_speed_md_keeps_older_rows_and_names_how_each_was_timed():
    old = {"algo": "iql", "seeds": 1, "steps": 1000, "steps_per_second": 200.0, "updates_per_second": 200.0,
           "compile_seconds": 4.0, "device": "cpu", "cpus": 2, "date": "2026-11-21"}
    new = old | {"seeds": 100, "steps": 2000, "chunks": 3, "steps_per_second": 100.0, "updates_per_second": 1e4,
                 "device": "NVIDIA H200", "cpus": 16, "ops_per_step": 95}
    evaluation = {"domain": "halfcheetah", "device": "cpu", "cpus": 2, "seeds": 5, "episodes": 10, "env_steps": 50000,
                  "seconds": 4.0, "cpu_seconds": 3.9, "us_per_env_step": 80.0, "policy_compile_seconds": 0.3,
                  "date": "2026-12-02"}
    text = speed.render({"rows": [old, new], "evaluations": [evaluation], "pipelines": []})
    assert "| iql | cpu (2 cpus) | 1 | 200.0 | 200 | 1.0x | 4.0 | - | 1000, one run | 2026-11-21 |" in text
    assert "| iql | NVIDIA H200 (16 cpus) | 100 | 100.0 | 10000 | - | 4.0 | 95 | 3 x 2000 |" in text
    assert "| halfcheetah | cpu (2 cpus) | 5 x 10 | 50000 | 4.0 | 3.9 | 80 | 0.3 |" in text


def test_device_check_runs_end_to_end_at_small_sizes(tmp_path):
    """The one command of a GPU lease, on this CPU at its small sizes (iql and dvdf, 1 run, one test): the versions,
    the test subset, the rates, one evaluation, the pipeline estimate, iql unrolled and V2A's two encoders, into
    speed.md/speed.json of --out (rows of another device kept) and everything into $OUT."""
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    other = {"algo": "iql", "seeds": 1, "steps": 1000, "steps_per_second": 9e3, "updates_per_second": 9e3,
             "compile_seconds": 9.0, "device": "elsewhere", "cpus": 64, "date": "2026-11-01"}
    (results / "speed.json").write_text(json.dumps({"rows": [other]}))
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE_CHECK_SITE=str(tmp_path / "site"))
    env.pop("DEVICE_CHECK_START", None)
    done = subprocess.run(["bash", "benchmarks/device_check.sh", "--small", "--out", str(results), "--budget", "400",
                           "--algos", "iql", "dvdf", "--more", "--runs", "1", "--eval-seeds", "1", "--tests",
                           "tests/test_devices.py::test_no_script_has_its_own_sharding_helper"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "FAILED" not in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]

    store = json.loads((results / "speed.json").read_text())
    assert other in store["rows"]
    rates = {(r["algo"], r["seeds"]): r for r in store["rows"] if r["device"] == "cpu"}
    assert set(rates) == {("iql", 1), ("dvdf", 1), ("sql_pretrain --no-policy", 1), ("igdf_scorer", 1),
                          ("iql unroll=4", 1)}
    assert rates["iql unroll=4", 1]["unroll"] == 4 and rates["iql", 1]["unroll"] == 1
    for row in rates.values():
        assert row["chunks"] == 2 and row["steps"] == 50 and len(row["chunk_seconds"]) == 2
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("steps_per_second", "compile_seconds"))
    (evaluation,) = store["evaluations"]
    assert (evaluation["seeds"], evaluation["episodes"], evaluation["env_steps"]) == (1, 1, 1000)
    assert math.isfinite(evaluation["seconds"]) and evaluation["seconds"] > 0
    (pipeline,) = store["pipelines"]
    assert pipeline["kind"] == "estimate" and math.isfinite(pipeline["seconds"]) and pipeline["seconds"] > 0
    assert pipeline["parts"].keys() == {"sql", "scorer", "filtered", "evaluation"}
    text = (results / "speed.md").read_text()
    assert "| iql | cpu (" in text and "| dvdf | cpu (" in text and "| iql | elsewhere (64 cpus) |" in text

    assert {p.name for p in out.iterdir()} == {"device_check.log", "device_check.json", "speed.md", "speed.json",
                                               "tests.log", "runs.log", "encoder_speed.md"}
    report = json.loads((out / "device_check.json").read_text())
    fused, flax_cell = report["encoders"]  # the same training, fewer operations per GRU time step
    assert (fused["encoder"], flax_cell["encoder"]) == ("fused", "flax-grucell")
    assert fused["loss"] == pytest.approx(flax_cell["loss"], rel=1e-5)
    assert 0 < fused["ops_per_time_step"] < flax_cell["ops_per_time_step"]
    assert len((out / "encoder_speed.md").read_text().splitlines()) == 4
    assert report["small"] and report["tests"]["returncode"] == 0 and report["versions"]["packages"]["jax"]
    assert "dvdf   1 runs on cpu" in (out / "device_check.log").read_text()
