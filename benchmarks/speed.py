"""Gradient steps per second of every algos/ script at several numbers of vmapped runs, the time of one evaluation,
and the 5-seed DVDF pipeline projected from them.

    python benchmarks/speed.py                                    # every algorithm at 1 5 20 100 runs, the pipeline
    python benchmarks/speed.py --algos iql dvdf --seeds 1 5 100   # a part of it
    python benchmarks/speed.py --pipeline run                     # time a real 5-seed DVDF pipeline (on a GPU)
    python benchmarks/speed.py --algos iql --unroll 4 --pipeline none  # lax.scan unrolled 4 steps per iteration
    bash benchmarks/device_check.sh                               # a GPU lease's check (benchmarks/device_check.py)

A rate: the script's own main() runs on synthetic datasets of HalfCheetah's shapes (1M source, 100k target
transitions; speed does not depend on the values), its pre-training stages with tiny budgets, up to where it hands
its training program to the harness (envs.run.train_loop). There it stops, and that program (init, train and the
inputs of every run) is compiled for N runs (the run axis cut to its first N) as train_loop compiles it (jit of
vmap of train, one chunk of --steps steps a call), one chunk warms up (first-call transfers and allocations), then
--chunks chunks are timed: steps/s is --steps over the median chunk time, compile time reported apart. For dvdf,
otdf, v2a, dara and bosa that is their last stage (the filtered or reweighted learner, with the frozen networks of
the earlier stages in every step). Nothing runs between the chunks: evaluation is timed on its own.

One evaluation: envs.evaluate as iql.py calls it after a chunk (10 episodes per seed on HalfCheetah), at
--eval-seeds seeds: wall and CPU seconds and the environment steps played; the policy's compile for that batch (once
per run) is timed apart.

The DVDF pipeline (SQL pre-training 1M steps, scorer 7,000 steps, 1M filtered steps with 5 seeds, an evaluation of
10 episodes per seed every 10,000 steps): `--pipeline estimate` (the default) adds up the measured rates of
sql_pretrain --no-policy and igdf_scorer with one seed (as dvdf.py trains its stages), dvdf with 5 seeds, and the
5-seed evaluation, times the pipeline's step counts, plus their compile times: a forecast, labelled as such.
`--pipeline run` runs `python algos/dvdf.py --num-seeds 5` with the default budgets on the synthetic data and
reports its wall time: the measurement to make on a GPU. `--pipeline none` skips it.

Writes benchmarks/results/speed.md (a row per algorithm, run count and device; rows of other devices and earlier
runs are kept) and speed.json (strict JSON), each written whole after every measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from envs.datasets import Dataset, save_hdf5  # noqa: E402
from envs.domains import domain_info  # noqa: E402
from envs.evaluation import _batched  # noqa: E402
from envs import run as run_module  # noqa: E402
from envs.run import json_bytes, load_script, unlock, write_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALGOS = ("iql", "sql_pretrain", "igdf_scorer", "dvdf", "otdf", "v2a", "dara", "bosa")
STAGES = {  # the stages before the measured one, each STAGE_STEPS steps; OTDF's deviation against 500 target samples
    "dvdf": ["--sql-steps", "{n}", "--scorer-steps", "{n}"],
    "v2a": ["--encoder-steps", "{n}", "--sqlz-steps", "{n}", "--scorer-steps", "{n}"],
    "otdf": ["--cvae-steps", "{n}", "--ot-target-size", "500"],
    "dara": ["--classifier-steps", "{n}"],
    "bosa": ["--vae-steps", "{n}"],
}
STAGE_STEPS = 100
NO_EPISODES = ("igdf_scorer",)  # its evaluation is its held-out separation, not episodes
SQL_STAGE = "sql_pretrain --no-policy"  # SQL as dvdf.py trains it: critics and value, no policy
PIPELINE = {"sql_steps": 1_000_000, "scorer_steps": 7_000, "steps": 1_000_000, "seeds": 5, "eval_every": 10_000,
            "eval_episodes": 10}


def synthetic(path: Path, size: int, seed: int) -> str:
    """HalfCheetah-shaped transitions in 1000-step episodes; with per-episode metadata for v2a's encoder."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(size, 17)).astype(np.float32)
    episode_ids = np.arange(size, dtype=np.int32) // 1000
    timeouts = np.zeros(size, np.float32)
    timeouts[999::1000] = 1.0
    dataset = Dataset(observations=obs, actions=rng.uniform(-1, 1, (size, 6)).astype(np.float32),
                      rewards=rng.normal(size=size).astype(np.float32),
                      next_observations=obs + 0.01 * rng.normal(size=obs.shape).astype(np.float32),
                      terminals=np.zeros(size, np.float32), timeouts=timeouts, episode_ids=episode_ids,
                      ref_min_score=-280.0, ref_max_score=12000.0, name=path.stem)
    save_hdf5(dataset, str(path))
    return str(path)


def device_name() -> str:
    return jax.devices()[0].device_kind


# ---------------------------------------------------------------- the training program of a script
class _Handed(Exception):
    """Raised by the stand-in for train_loop: main() stops where the harness would start training."""


def capture(algo: str, flags: list[str], log) -> dict:
    """Run algos/<algo>.py's main(flags) up to its train_loop call; return what it hands the harness (args, out,
    init, keys, train, inputs, in_axes, evaluate, ...) and the module, the inputs placed on the device once. What
    main() prints goes to the text file `log`; a failing main() ends with its own SystemExit."""
    module = load_script(algo, f"speed_{algo}")

    def stand_in(args, out, saved, **handed):
        raise _Handed({"args": args, "out": out, **handed})

    module.train_loop = stand_in  # the script's own name, and envs.run's (train_grid calls it there)
    real_loop, run_module.train_loop = run_module.train_loop, stand_in
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            module.main(flags)
        except _Handed as handed:
            program = handed.args[0]
        else:
            raise SystemExit(f"algos/{algo}.py finished without calling train_loop: speed.py cannot time it.")
        finally:
            run_module.train_loop = real_loop
    unlock(Path(program["out"]) / ".lock")
    return program | {"module": module, "inputs": jax.device_put(program["inputs"])}


def first_runs(program: dict, runs: int) -> tuple:
    """The keys and inputs of the program's first `runs` runs: the run axis is the keys' and that of every input
    whose in_axes is 0 (None: shared by every run)."""
    def cut(axis, part):
        if axis is None:
            return part
        assert axis == 0, f"speed.py cuts run axes 0 only, not {axis}"
        return jax.tree.map(lambda leaf: leaf[:runs], part)

    inputs = tuple(jax.tree.map(cut, axes, part, is_leaf=lambda node: node is None)
                   for axes, part in zip(program["in_axes"], program["inputs"], strict=True))
    return program["keys"][:runs], inputs


_TRIVIAL_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def step_ops(hlo: str, steps: int, every: bool = False) -> dict:
    """The operations of one gradient step in a compiled chunk: the instructions of the body of its loop of `steps`
    iterations in the optimised HLO text (`compiled.as_text()`), by opcode, without those that launch nothing
    (parameter, get-tuple-element, tuple, constant, bitcast). Each is one kernel launch per step (a fusion is one
    kernel; a nested while, call or sort counts once, though it may launch more). {} if no such loop is found.
    every: the sum over every loop of `steps` iterations (a scan's forward and backward passes), not the first."""
    computations, name = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{") and line.removeprefix("ENTRY ").startswith("%"):
            name = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            computations[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            computations[name].append(line)

    def opcode(line: str):
        found = re.match(r"\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\(", line)
        return found.group(1) if found else None

    ops = {}
    for lines in computations.values():
        for line in lines:
            if opcode(line) == "while" and f'"known_trip_count":{{"n":"{steps}"}}' in line:
                body = computations.get(re.search(r"body=%([^,\s]+)", line).group(1), [])
                for op in map(opcode, body):
                    if op and op not in _TRIVIAL_OPS:
                        ops[op] = ops.get(op, 0) + 1
                if not every:
                    return dict(sorted(ops.items(), key=lambda item: -item[1]))
    return dict(sorted(ops.items(), key=lambda item: -item[1]))


def measure(program: dict, runs: int, steps: int, chunks: int) -> tuple[dict, object, object]:
    """Compile the program for `runs` runs and chunks of `steps` steps as train_loop does, run one chunk to warm up,
    time `chunks` more; returns the rates (of the median chunk), the compiled step's operations (step_ops) and the
    last runner and metrics."""
    keys, inputs = first_runs(program, runs)
    start = time.perf_counter()
    runner = jax.block_until_ready(jax.jit(jax.vmap(program["init"]))(keys))
    chunk = jax.jit(jax.vmap(partial(program["train"], num_steps=steps), in_axes=(0, *program["in_axes"])))
    compiled = chunk.lower(runner, *inputs).compile()
    compile_seconds = time.perf_counter() - start
    unroll = run_module.SCAN_UNROLL  # the loop runs steps / unroll iterations of `unroll` steps each
    ops = step_ops(compiled.as_text(), steps // unroll)
    start = time.perf_counter()
    runner, metrics = jax.block_until_ready(compiled(runner, *inputs))
    warmup_seconds = time.perf_counter() - start
    seconds = []
    for _ in range(chunks):
        start = time.perf_counter()
        runner, metrics = jax.block_until_ready(compiled(runner, *inputs))
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    return {"steps_per_second": steps / median, "updates_per_second": steps * runs / median,
            "compile_seconds": compile_seconds, "warmup_seconds": warmup_seconds, "chunk_seconds": seconds,
            "ops_per_step": sum(ops.values()) / unroll, "ops": ops, "unroll": unroll}, \
        runner, metrics


def time_evaluation(program: dict, runner, metrics) -> dict:
    """One evaluation as the script makes it after a chunk (its evaluate(runner, step, metrics), which calls
    envs.evaluate, on host copies and the host's CPU device, as train_loop calls it), timed: wall and process CPU seconds, environment steps played; the policy's compile for this
    batch of observations (the first evaluation of a run pays it) is done first and timed apart."""
    module, played, compile_seconds = program["module"], [], []
    real = run_module.evaluate  # the same function as the script's (grid scripts evaluate in envs.run)
    patched = [m for m in (module, run_module) if hasattr(m, "evaluate")]

    def recording(policy_fn, params, domain, **kwargs):
        start = time.perf_counter()
        num_seeds = jax.tree.leaves(params)[0].shape[0]
        observations = np.zeros((num_seeds, kwargs.get("num_episodes", 10), domain_info(domain).obs_dim), np.float32)
        jax.block_until_ready(_batched(policy_fn)(params, observations))
        compile_seconds.append(time.perf_counter() - start)
        wall, cpu = time.perf_counter(), time.process_time()
        result = real(policy_fn, params, domain, **kwargs)
        played.append((time.perf_counter() - wall, time.process_time() - cpu, int(np.sum(result.episode_lengths)),
                       result.episode_returns.shape))
        return result

    for m in patched:
        m.evaluate = recording
    host = run_module.host_device()  # as train_loop evaluates: host copies, the policy on the host's CPU
    try:
        with jax.default_device(host) if host is not None else contextlib.nullcontext():
            program["evaluate"](*jax.device_get((runner, 0, metrics)))
    finally:
        for m in patched:
            m.evaluate = real
    wall, cpu, env_steps, (seeds, episodes) = played[0]
    return {"seeds": seeds, "episodes": episodes, "env_steps": env_steps, "seconds": wall, "cpu_seconds": cpu,
            "us_per_env_step": 1e6 * wall / env_steps, "policy_compile_seconds": compile_seconds[0],
            "domain": program["args"].target}


# ---------------------------------------------------------------- a session of measurements and its files
class Bench:
    """Measurements on one set of synthetic datasets, each stored (speed.json and speed.md in `out`, rewritten
    whole) as soon as it is made; a row replaces the earlier one of its algorithm, run count and device."""

    def __init__(self, out: Path, folder: Path, source_size: int, target_size: int, steps: int, chunks: int,
                 eval_episodes: int, command: str, log, extra: list[str] = (), stage_steps: int = STAGE_STEPS):
        self.out, self.folder, self.steps, self.chunks, self.log = out, folder, steps, chunks, log
        self.stage_steps = stage_steps
        self.eval_episodes, self.command, self.extra = eval_episodes, command, list(extra)
        self.device = device_name()
        out.mkdir(parents=True, exist_ok=True)
        saved = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
        self.store = {"rows": saved.get("rows", []), "evaluations": saved.get("evaluations", []),
                      "pipelines": saved.get("pipelines", [])}
        self.rates, self.kept, self.evaluations = {}, {}, {}  # this session's: (label, runs) -> rates; runners
        self.data = {"source": synthetic(folder / "source.hdf5", source_size, 0),
                     "target": synthetic(folder / "target.hdf5", target_size, 1)}

    def flags(self, algo: str, runs: int, flags: list[str]) -> list[str]:
        flags = ["--num-seeds", str(runs), "--steps", "1000", "--eval-every", "1000", "--source-dataset",
                 self.data["source"], *(flag.format(n=self.stage_steps) for flag in STAGES.get(algo, [])),
                 *self.extra, *flags,
                 "--out", str(self.folder / f"run-{algo}-{len(list(self.folder.glob('run-*')))}")]
        if algo != "sql_pretrain":  # SQL pre-training reads the source dataset only
            flags += ["--target-dataset", self.data["target"]]
        if algo not in NO_EPISODES:
            flags += ["--eval-episodes", str(self.eval_episodes)]
        if algo in STAGES:
            flags += ["--cache-dir", str(self.folder / "cache")]  # stages trained once per algorithm
        return flags

    def measure(self, algo: str, runs: list[int], flags: list[str] = (), label: str = None, keep: tuple = (),
                say=print) -> None:
        """Steps/s of algos/<algo>.py (with `flags`) at each run count of `runs`, its program captured once at the
        largest; the last runner and metrics of each count in `keep` are held for an evaluation."""
        label = label or algo
        program = capture(algo, self.flags(algo, max(runs), list(flags)), self.log)
        for count in runs:
            rates, runner, metrics = measure(program, count, self.steps, self.chunks)
            self.rates[label, count] = rates
            if count in keep:
                self.kept[label, count] = (program, runner, metrics)
            row = {"algo": label, "seeds": count, "steps": self.steps, "chunks": self.chunks, **rates,
                   "device": self.device, "host": platform.node(), "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d"), "command": self.command}
            self.store["rows"] = [r for r in self.store["rows"]
                                  if (r["algo"], r["seeds"], r["device"]) != (label, count, self.device)] + [row]
            self.save()
            say(f"{label} {count:>3} runs on {self.device}: {rates['steps_per_second']:.1f} steps/s, "
                f"{rates['updates_per_second']:.0f} seed-updates/s (median of {self.chunks} x {self.steps} steps, "
                f"chunks {min(rates['chunk_seconds']):.2f}-{max(rates['chunk_seconds']):.2f} s), compile "
                f"{rates['compile_seconds']:.1f} s")
        del program

    def evaluate(self, label: str, runs: int, say=print) -> dict:
        """One evaluation of the kept runner of `label` at `runs` runs (see time_evaluation)."""
        program, runner, metrics = self.kept.pop((label, runs))
        entry = time_evaluation(program, runner, metrics) | {"device": self.device, "cpus": os.cpu_count(),
                                                              "date": time.strftime("%Y-%m-%d"),
                                                              "command": self.command}
        self.evaluations[entry["seeds"]] = entry
        key = lambda e: (e["device"], e["seeds"], e["episodes"])  # noqa: E731
        self.store["evaluations"] = [e for e in self.store["evaluations"] if key(e) != key(entry)] + [entry]
        self.save()
        say(f"one evaluation, {entry['seeds']} seeds x {entry['episodes']} episodes of {entry['domain']} on "
            f"{self.device} ({os.cpu_count()} cpus): {entry['seconds']:.1f} s wall, {entry['cpu_seconds']:.1f} s "
            f"cpu, {entry['us_per_env_step']:.0f} us per env-step (policy compile {entry['policy_compile_seconds']:.1f}"
            f" s apart)")
        return entry

    def pipeline(self, filtered_runs: int, eval_seeds: int, say=print) -> dict:
        """The DVDF pipeline's time from this session's rates: sql_pretrain --no-policy and igdf_scorer at 1 run,
        dvdf at `filtered_runs`, the evaluation at `eval_seeds` seeds (PIPELINE's 5 and 5 for the real pipeline)."""
        sql, scorer = self.rates[SQL_STAGE, 1], self.rates["igdf_scorer", 1]
        filtered, evaluation = self.rates["dvdf", filtered_runs], self.evaluations[eval_seeds]
        evaluations = PIPELINE["steps"] // PIPELINE["eval_every"]
        parts = {"sql": PIPELINE["sql_steps"] / sql["steps_per_second"] + sql["compile_seconds"],
                 "scorer": PIPELINE["scorer_steps"] / scorer["steps_per_second"] + scorer["compile_seconds"],
                 "filtered": PIPELINE["steps"] / filtered["steps_per_second"] + filtered["compile_seconds"],
                 "evaluation": evaluations * evaluation["seconds"] + evaluation["policy_compile_seconds"]}
        result = {"kind": "estimate", "seconds": sum(parts.values()), "parts": parts,
                  "from": f"dvdf at {filtered_runs} runs, evaluations of {eval_seeds} x {evaluation['episodes']} "
                          f"episodes",
                  "rates": {"sql": sql["steps_per_second"], "scorer": scorer["steps_per_second"],
                            "filtered": filtered["steps_per_second"], "seconds_per_evaluation": evaluation["seconds"]},
                  "device": self.device, "date": time.strftime("%Y-%m-%d"), "command": self.command}
        self.store["pipelines"] = [p for p in self.store["pipelines"]
                                   if (p["device"], p["kind"]) != (self.device, "estimate")] + [result]
        self.save()
        say(f"DVDF pipeline, 5 seeds, on {self.device} (estimate from {result['from']}): "
            f"{result['seconds'] / 60:.1f} min = " + " + ".join(f"{name} {s / 60:.1f}" for name, s in parts.items()))
        return result

    def save(self) -> None:
        write_atomic(self.out / "speed.json", json_bytes(self.store))
        write_atomic(self.out / "speed.md", render(self.store))


def pipeline_run(data: dict, folder: Path) -> dict:
    """A real 5-seed DVDF pipeline with the default budgets, as a script run; its wall time."""
    start = time.perf_counter()
    out = folder / "pipe-run"
    command = [sys.executable, str(ROOT / "algos" / "dvdf.py"), "--source-dataset", data["source"],
               "--target-dataset", data["target"], "--num-seeds", str(PIPELINE["seeds"]), "--cache-dir",
               str(folder / "cache-run"), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dvdf failed:\n{done.stderr[-2000:]}")
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {"kind": "measured", "seconds": time.perf_counter() - start,
            "parts": {"stages": timing["stage_seconds"], "filtered": timing["train_seconds"],
                      "evaluation": timing["eval_seconds"], "compile": timing["compile_seconds"]},
            "rates": {"filtered": timing["steps_per_second"]}, "device": timing["device_kind"],
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/speed.py --pipeline run"}


# ---------------------------------------------------------------- speed.md
def render(store: dict) -> str:
    rows, evaluations, pipelines = store["rows"], store.get("evaluations", []), store.get("pipelines", [])
    lines = ["# Speed: gradient steps per second", "",
             "Made by `python benchmarks/speed.py` and, on a GPU lease, `bash benchmarks/device_check.sh` (options in "
             "their docstrings): each script's own training program on synthetic HalfCheetah-shaped data (1M source, "
             "100k target transitions), compile time apart. *timed*: the median of k chunks of S steps after a "
             "warm-up chunk (k x S), or, in older rows, the whole of one run of S steps (its first call included). "
             "One gradient step updates every run: seed-updates/s = steps/s x runs; speed-up = seed-updates/s over "
             "those of 1 run on the same device. dvdf, otdf, v2a, dara, bosa: their last stage (the pre-training "
             "stages are timed in the pipeline below). ops/step: the operations (kernel launches) of one step in "
             "the compiled chunk on that device (fusions, matmuls, copies, ...: step_ops), where recorded.", "",
             "| algorithm | device | runs | steps/s | seed-updates/s | speed-up | compile s | ops/step | timed | "
             "measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: ALGOS.index(r["algo"].split()[0]) if r["algo"].split()[0] in ALGOS else 99  # noqa: E731
    single = {(r["algo"], r["device"]): r["updates_per_second"] for r in rows if r["seeds"] == 1}
    for r in sorted(rows, key=lambda r: (r["device"], order(r), r["algo"], r["seeds"])):
        base = single.get((r["algo"], r["device"]))
        speedup = f"{r['updates_per_second'] / base:.1f}x" if base else "-"
        timed = f"{r['chunks']} x {r['steps']}" if "chunks" in r else f"{r['steps']}, one run"
        ops = f"{r['ops_per_step']:g}" if "ops_per_step" in r else "-"
        lines.append(f"| {r['algo']} | {r['device']} ({r.get('cpus', '?')} cpus) | {r['seeds']} | "
                     f"{r['steps_per_second']:.1f} | {r['updates_per_second']:.0f} | {speedup} | "
                     f"{r['compile_seconds']:.1f} | {ops} | {timed} | {r.get('date', '')} |")
    lines += ["", "Reading it: on a CPU the runs of a vmapped step share the same cores, so seed-updates/s stay "
              "roughly flat as runs are added (the cores are busy with arithmetic already at one run); vmapping "
              "pays on an accelerator, where one run's small matrices leave most of the device idle. Targets on one "
              "H100-class GPU: 100 runs at least 20x the seed-updates/s of one run, and the 5-seed DVDF pipeline "
              "below in under 15 minutes."]
    if evaluations:
        lines += ["", "## One evaluation", "",
                  "envs.evaluate as iql.py calls it after a chunk, deterministic actions, every episode to its end; "
                  "the policy's compile for the batch (once per run) apart. cpu s: the process's CPU time.", "",
                  "| domain | device | seeds x episodes | env steps | wall s | cpu s | us per env-step | policy "
                  "compile s | measured |", "|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(evaluations, key=lambda e: (e["device"], e["seeds"], e["episodes"])):
            lines.append(f"| {e['domain']} | {e['device']} ({e.get('cpus', '?')} cpus) | {e['seeds']} x "
                         f"{e['episodes']} | {e['env_steps']} | {e['seconds']:.1f} | {e['cpu_seconds']:.1f} | "
                         f"{e['us_per_env_step']:.0f} | {e['policy_compile_seconds']:.1f} | {e['date']} |")
    if pipelines:
        lines += ["", "## The whole DVDF pipeline, 5 seeds", "",
                  "SQL pre-training 1M steps, scorer 7,000 steps, 1M filtered IQL steps with 5 vmapped seeds, an "
                  "evaluation of 10 episodes per seed every 10,000 steps. An *estimate* adds up measured rates times "
                  "these step counts (it is a forecast, not a run); *measured* is the wall time of a real run.", "",
                  "| device | kind | total | SQL | scorer | filtered IQL | evaluation | date |",
                  "|---|---|---|---|---|---|---|---|"]
        fmt = lambda s: f"{s:.0f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"  # noqa
        for p in pipelines:
            parts = p["parts"]
            kind = p["kind"] + (f" ({p['from']})" if "from" in p else "")
            lines.append(f"| {p['device']} | {kind} | {fmt(p['seconds'])} | "
                         f"{fmt(parts.get('sql', parts.get('stages', 0)))} | {fmt(parts.get('scorer', 0))} | "
                         f"{fmt(parts['filtered'])} | {fmt(parts['evaluation'])} | {p['date']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 5, 20, 100], help="numbers of vmapped runs")
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps of a timed chunk")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks (after one warm-up chunk)")
    parser.add_argument("--eval-seeds", nargs="*", type=int, default=[5], help="seeds of the timed evaluations")
    parser.add_argument("--pipeline", choices=("estimate", "run", "none"), default="estimate")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of speed.md and speed.json")
    parser.add_argument("--render", action="store_true", help="only rewrite speed.md from speed.json")
    parser.add_argument("--unroll", type=int, default=1, help="steps per loop iteration of a chunk (lax.scan unroll, "
                        "envs.run.SCAN_UNROLL); rows labelled 'ALGO unroll=K'")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every script")
    args = parser.parse_args()
    if args.steps < 1 or args.chunks < 1 or min(args.seeds + args.eval_seeds) < 1:
        parser.error("--steps, --chunks and every --seeds and --eval-seeds value must be at least 1")
    if args.unroll < 1 or args.steps % args.unroll:
        parser.error("--unroll must be at least 1 and divide --steps")
    if args.unroll != 1 and args.pipeline == "estimate":
        parser.error("--unroll other than 1 times rows apart from the pipeline: add --pipeline none")
    run_module.SCAN_UNROLL, suffix = args.unroll, f" unroll={args.unroll}" if args.unroll != 1 else ""
    if args.render:
        store = json.loads((args.out / "speed.json").read_text())
        write_atomic(args.out / "speed.md", render(store | {k: store.get(k, []) for k in ("evaluations",
                                                                                          "pipelines")}))
        return
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "runs.log", "w") as log:
        print("writing synthetic datasets ...", flush=True)
        bench = Bench(args.out, Path(tmp), 1_000_000, 100_000, args.steps, args.chunks, PIPELINE["eval_episodes"],
                      "python benchmarks/speed.py " + " ".join(sys.argv[1:]), log, args.extra)
        estimate = args.pipeline == "estimate"
        evaluated = sorted(set(args.eval_seeds) | ({PIPELINE["seeds"]} if estimate else set()))
        wanted = {"iql": evaluated, "dvdf": [PIPELINE["seeds"]] if estimate else []}
        for algo in [*args.algos, *(name for name in wanted if wanted[name] and name not in args.algos)]:
            runs = sorted((set(args.seeds) if algo in args.algos else set()) | set(wanted.get(algo, [])))
            bench.measure(algo, runs, label=algo + suffix, keep=tuple(evaluated) if algo == "iql" else ())
            if algo == "iql":
                for seeds in evaluated:
                    bench.evaluate("iql" + suffix, seeds)
        if estimate:
            bench.measure("sql_pretrain", [1], ["--no-policy"], label=SQL_STAGE)
            if ("igdf_scorer", 1) not in bench.rates:
                bench.measure("igdf_scorer", [1])
            bench.pipeline(PIPELINE["seeds"], PIPELINE["seeds"])
        elif args.pipeline == "run":
            result = pipeline_run(bench.data, Path(tmp))
            print(f"DVDF pipeline, 5 seeds, on {result['device']} (measured): {result['seconds'] / 60:.1f} min")
            bench.store["pipelines"] = [p for p in bench.store["pipelines"]
                                        if (p["device"], p["kind"]) != (result["device"], "measured")] + [result]
            bench.save()
    print(f"wrote {args.out / 'speed.md'}")


if __name__ == "__main__":
    main()
