"""The check of a GPU lease, in one command that ends inside its time budget (7.5 minutes by default, counted from
the start of benchmarks/device_check.sh, which installs what the machine lacks from .whl/ and then runs this file):

    bash benchmarks/device_check.sh                      # on the GPU (device tool: carry [".whl"], timeout_s 540)
    bash benchmarks/device_check.sh --small              # the same at tiny sizes on a CPU (the default on a CPU)

In order, each step skipped with a line saying so when the time left would not hold it, and a failing step
reported in a line without stopping the others:
  1. versions: python, jax, jaxlib, the devices, every package the scripts import and where it was found;
  2. a test subset on the device (JAX_PLATFORMS set to this backend, which overrides tests/conftest.py's CPU
     default; full float32 matmuls, since the by-hand tests hold tolerances that TF32 does not);
  3. steps/s of iql, then dvdf (with sql_pretrain --no-policy and igdf_scorer at 1 run, the DVDF pipeline's
     stages), then otdf, at 1, 5 and 100 runs (benchmarks/speed.py: the median of timed chunks of 2,000 steps after a
     warm-up chunk, compile apart), with one evaluation of 10 episodes per seed at 5 seeds after iql;
  4. the 5-seed DVDF pipeline projected from those rates (speed.md's estimate row);
  5. one evaluation at 100 seeds, then dara, bosa and v2a while time remains;
  6. then, while time remains, iql at 1 and 5 runs with lax.scan unrolled 4 steps (rows 'iql unroll=4'), and V2A's
     encoder stage with its fused GRU and with the flax GRUCell one it replaced (benchmarks/encoder_speed.py; rows
     in encoder_speed.md and device_check.json).
Rows go into speed.md and speed.json of --out (benchmarks/results/ on an accelerator, runs/device_check/ at the small
sizes), written after every measurement: a check cut off keeps what it measured. device_check.json (everything
measured, skipped or failed, and the versions), tests.log and runs.log (what the scripts printed) go into the folder
the variable OUT names (the device tool's, which brings them back, with copies of speed.md and speed.json and the
device_check.log that device_check.sh writes), else into runs/device_check/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import encoder_speed  # noqa: E402
from benchmarks.speed import PIPELINE, SQL_STAGE, Bench  # noqa: E402
from envs import run as run_module  # noqa: E402
from envs.run import json_bytes, write_atomic  # noqa: E402

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "chex", "numpy", "gymnasium",
            "mujoco", "minari", "tyro", "ott-jax", "jaxopt", "h5py", "tqdm", "pytest")
TESTS = ["tests/test_iql.py", "tests/test_dvdf.py", "tests/test_otdf.py", "tests/test_evaluation.py", "-k",
         "by_hand or end_to_end_results_json or keeps_exactly or exact_ot or test_evaluation"]
FULL = {"runs": [1, 5, 100], "steps": 2000, "chunks": 3, "eval_seeds": [5, 100], "eval_episodes": 10,
        "source_size": 1_000_000, "target_size": 100_000, "stage_steps": 100, "encoder_steps": 50,
        "encoder_sizes": {}}
SMALL = {"runs": [1, 2], "steps": 50, "chunks": 2, "eval_seeds": [1, 2], "eval_episodes": 1,
         "source_size": 20_000, "target_size": 10_000, "stage_steps": 10, "encoder_steps": 2,
         "encoder_sizes": {"gru_hidden": 8, "z_dim": 4, "window": 6, "encoder_batch_size": 3, "hidden": (16,)}}
UNROLL = 4
MORE = ["dara", "bosa", "v2a"]


class OutOfTime(Exception):
    """The budget is spent: what was measured is written, the rest is not started."""


def versions() -> dict:
    found = {"python": sys.version.split()[0], "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
             "cpus": os.cpu_count(), "packages": {}}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
            found["packages"][name] = f"{dist.version} ({Path(str(dist.locate_file(''))).resolve()})"
        except metadata.PackageNotFoundError:
            pass
    return found


def run_tests(tests: list[str], seconds: float, log: Path) -> dict:
    """pytest on this backend, at most `seconds`; its output into `log`."""
    env = dict(os.environ, JAX_PLATFORMS=jax.default_backend(), JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")  # this process holds the GPU's preallocated memory already
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                                  env=env, stdout=f, stderr=subprocess.STDOUT, timeout=seconds)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    if code is None:  # pytest -q's progress line says how far it got
        summary = f"stopped after {seconds:.0f} s, at: {summary[-80:]}"
    return {"returncode": code, "summary": summary,
            "seconds": time.perf_counter() - start, "command": "pytest " + " ".join(tests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="tiny sizes (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the full sizes also on a CPU")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole check, from the start of device_check.sh")
    parser.add_argument("--out", type=Path, help="folder of speed.md and speed.json")
    parser.add_argument("--algos", nargs="+", default=["iql", "dvdf", "otdf"])
    parser.add_argument("--more", nargs="*", default=MORE, help="algorithms measured while time remains")
    parser.add_argument("--runs", nargs="+", type=int, help="numbers of vmapped runs (1 5 100; small 1 2)")
    parser.add_argument("--eval-seeds", nargs="*", type=int, help="seeds of the timed evaluations (5 100; small 1 2)")
    parser.add_argument("--tests", nargs="*", default=TESTS, help="pytest arguments of the subset (none: no tests)")
    parser.add_argument("--test-seconds", type=float, default=100.0, help="at most this long for the tests")
    args = parser.parse_args()
    start = float(os.environ.get("DEVICE_CHECK_START", time.time()))
    deadline = start + args.budget
    left = lambda: deadline - time.time()  # noqa: E731

    small = args.small or (not args.full and jax.default_backend() == "cpu")
    sizes = dict(SMALL if small else FULL)
    sizes["runs"] = sorted(set(args.runs or sizes["runs"]))
    sizes["eval_seeds"] = sorted(set(args.eval_seeds if args.eval_seeds is not None else sizes["eval_seeds"]))
    out = args.out or (ROOT / "runs" / "device_check" if small else ROOT / "benchmarks" / "results")
    logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "device_check"
    logs.mkdir(parents=True, exist_ok=True)
    report = {"small": small, "sizes": sizes, "budget_seconds": args.budget, "versions": versions(), "steps": []}
    command = "bash benchmarks/device_check.sh" + (" --small" if small else "")

    found = report["versions"]
    print(f"python {found['python']}, {found['backend']}: {', '.join(found['devices'])} ({found['cpus']} cpus); "
          f"{'small' if small else 'full'} sizes, {left():.0f} s left of {args.budget:.0f}")
    for name, where in found["packages"].items():
        print(f"  {name} {where}")

    def finish() -> None:
        report["seconds"] = time.time() - start
        write_atomic(logs / "device_check.json", json_bytes(report))
        if logs.resolve() != out.resolve():
            for name in ("speed.md", "speed.json"):
                if (out / name).exists():
                    shutil.copyfile(out / name, logs / name)

    def step(name: str, work, needs: float = 20.0) -> None:
        """Do `work` if `needs` seconds are left, else say it was skipped; a failure is one line, not the end."""
        if left() < needs:
            print(f"skipped: {name} (needs about {needs:.0f} s, {max(left(), 0):.0f} s left)")
            report["steps"].append({"step": name, "skipped": f"needs about {needs:.0f} s, {left():.0f} s left"})
            return
        began = time.time()
        report["current"] = name
        try:
            work()
            report["steps"].append({"step": name, "seconds": time.time() - began})
        except OutOfTime:
            raise
        except (Exception, SystemExit) as error:  # noqa: BLE001  (the next steps still run)
            last = (str(error) or type(error).__name__).strip().splitlines()[-1]
            print(f"FAILED: {name}: {last} (details in {logs / 'runs.log'})")
            with open(logs / "runs.log", "a") as f:
                f.write(f"\n--- {name} failed:\n{traceback.format_exc()}\n")
            report["steps"].append({"step": name, "failed": last, "seconds": time.time() - began})
        finish()

    def out_of_time(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(left())))
    try:
        if args.tests:
            def tests() -> None:
                result = run_tests(args.tests, min(args.test_seconds, max(left() - 60.0, 10.0)), logs / "tests.log")
                report["tests"] = result
                print(f"tests on {jax.default_backend()} ({result['seconds']:.0f} s): {result['summary']}")
            step("tests", tests)
        with tempfile.TemporaryDirectory() as tmp, open(logs / "runs.log", "a") as log:
            bench = Bench(out, Path(tmp), sizes["source_size"], sizes["target_size"], sizes["steps"],
                          sizes["chunks"], sizes["eval_episodes"], command, log, stage_steps=sizes["stage_steps"])
            runs, eval_seeds = sizes["runs"], sizes["eval_seeds"]
            say = lambda line: print(line, flush=True)  # noqa: E731
            filtered_runs = PIPELINE["seeds"] if PIPELINE["seeds"] in runs else runs[-1]
            evaluations = {}

            def evaluate(seeds: int) -> None:
                if ("iql", seeds) not in bench.kept:
                    raise SystemExit(f"no iql runs at {seeds} to evaluate (iql did not get there)")
                evaluations[seeds] = bench.evaluate("iql", seeds, say=say)

            def predicted(seeds: int) -> float:  # an evaluation costs about its environment steps
                known = {s: e["seconds"] for s, e in evaluations.items()}
                return 1.2 * max(known.values()) * seeds / max(known) if known else 30.0

            def pipeline() -> None:
                needed = [("dvdf", filtered_runs), (SQL_STAGE, 1), ("igdf_scorer", 1)]
                missing = [f"{label} at {count}" for label, count in needed if (label, count) not in bench.rates]
                if missing or not evaluations:
                    raise SystemExit("no rate of " + ", ".join(missing or ["an evaluation"]))
                eval_for = PIPELINE["seeds"] if PIPELINE["seeds"] in evaluations else min(evaluations)
                bench.pipeline(filtered_runs, eval_for, say=say)

            # iql first, at the evaluations' seed counts too: its runners are the ones evaluated
            iql_runs = sorted((set(runs) if "iql" in args.algos else set()) | set(eval_seeds))
            step("iql", lambda: bench.measure("iql", iql_runs, keep=tuple(eval_seeds), say=say))
            for seeds in eval_seeds[:1]:
                step(f"evaluation at {seeds} seeds", partial(evaluate, seeds))
            for algo in [name for name in args.algos if name != "iql"]:
                step(algo, partial(bench.measure, algo, runs, say=say))
                if algo == "dvdf":  # the pipeline's stages, as dvdf.py trains them: one run each
                    step(SQL_STAGE, lambda: bench.measure("sql_pretrain", [1], ["--no-policy"], label=SQL_STAGE,
                                                          say=say))
                    step("igdf_scorer", lambda: bench.measure("igdf_scorer", [1], say=say))
                    step("pipeline", pipeline, needs=1.0)
            for seeds in eval_seeds[1:]:
                if ("iql", seeds) in bench.kept:
                    step(f"evaluation at {seeds} seeds", partial(evaluate, seeds), needs=predicted(seeds))
            bench.kept.clear()
            for algo in args.more:
                step(algo, partial(bench.measure, algo, runs, say=say), needs=60.0)

            def unrolled() -> None:  # lax.scan unrolled: fewer kernels per step (benchmarks/results/speed_step.md)
                run_module.SCAN_UNROLL = UNROLL
                try:
                    bench.measure("iql", runs[:2], label=f"iql unroll={UNROLL}", say=say)
                finally:
                    run_module.SCAN_UNROLL = 1

            def encoders() -> None:  # V2A's fused GRU encoder against the flax GRUCell one it replaced
                with open(logs / "encoder_speed.md", "w") as rows:
                    rows.write(encoder_speed.HEADER + "\n")
                    for name in encoder_speed.ENCODERS:
                        result = encoder_speed.measure(name, sizes["encoder_steps"], sizes["chunks"],
                                                       sizes=sizes["encoder_sizes"])
                        report.setdefault("encoders", []).append(result)
                        line = encoder_speed.row(name, result)
                        rows.write(line + "\n")
                        say(f"v2a encoder stage, {name}: {result['steps_per_second']:.2f} steps/s, "
                            f"{result['ops_per_time_step']} ops per GRU time step")

            step(f"iql unroll={UNROLL}", unrolled, needs=60.0)
            step("v2a encoder stage", encoders, needs=60.0)
    except OutOfTime:
        print(f"out of time ({args.budget:.0f} s) in {report.get('current', 'the setup')}: the rest is not measured")
        report["steps"].append({"step": report.get("current", "setup"), "interrupted": "out of time"})
        report["out_of_time"] = True
    finally:
        signal.alarm(0)
        report.pop("current", None)
        finish()
    print(f"rows in {out / 'speed.md'}{f' (copied to {logs})' if logs != out else ''}; "
          f"{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
