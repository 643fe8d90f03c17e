"""Time of one evaluation (envs.evaluate) at several seed counts: wall and CPU seconds, env-steps played, returns.

The policy is the zoo's expert of the domain (envs/policies/<domain>/expert.npz, its deterministic action tanh(mean)),
the same weights for every seed, so the episodes are those of a trained policy (hopper's last the full 1,000 steps).
Each row is the median of --repeats evaluations after one that builds what the evaluator keeps (environments,
worker processes) and compiles the policy; CPU seconds count this process and its live children (worker processes).
The returns of every row are recorded: run once before and once after a change of the evaluator and compare them
(--compare FILE says whether every episode return is the same to the last bit).

    python benchmarks/eval_speed.py --label before --out benchmarks/results/eval_speed_before.json
    python benchmarks/eval_speed.py --label after --compare benchmarks/results/eval_speed_before.json
    python benchmarks/eval_speed.py --render before.json after.json --out benchmarks/results/eval_speed.md
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from envs import evaluate
from envs.generate import zoo_path
from envs.run import write_atomic


def expert_policy(domain: str, num_seeds: int):
    """(policy_fn, params stacked over seeds) of the zoo's expert, float32."""
    with np.load(zoo_path(domain, "expert")) as arrays:
        layers = {f"{kind}{i}": jnp.asarray(arrays[f"{kind}{i}"], jnp.float32) for i in range(3) for kind in "wb"}
    act_dim = layers["b2"].shape[0] // 2

    def policy(params, observations):
        h = observations
        for i in range(2):
            h = jax.nn.relu(h @ params[f"w{i}"] + params[f"b{i}"])
        return jnp.tanh((h @ params["w2"] + params["b2"])[..., :act_dim])

    return policy, jax.tree.map(lambda x: jnp.stack([x] * num_seeds), layers)


def children_cpu_seconds() -> float:
    """utime + stime of this process's live children (the evaluator's worker processes), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def render(paths: list[Path], note: str = "") -> str:
    """A markdown table of the rows of eval_speed.py's JSON files, with the command of each."""
    lines = ["# One evaluation: wall and CPU time", "",
             ("envs.evaluate with the zoo's expert policy (deterministic), 10 episodes per seed, median of the repeats "
             "after a first evaluation that builds the copies and compiles. CPU seconds include the worker processes. "
             "'same returns' compares every episode return with the first file's row, to the last bit."), "",
             ("| label | domain | seeds | workers | wall s | CPU s | env-steps | us per env-step | same returns | "
             "load |"), "|---|---|---|---|---|---|---|---|---|---|"]
    files = [json.loads(path.read_text()) for path in paths]
    first = {(r["domain"], r["seeds"]): r["returns"] for r in files[0]["rows"]}
    for data in files:
        for r in data["rows"]:
            same = first.get((r["domain"], r["seeds"]))
            lines.append(f"| {r['label']} | {r['domain']} | {r['seeds']} | {'auto' if r['workers'] is None else r['workers']} | {r['wall_seconds']:.2f} | "
                         f"{r['cpu_seconds']:.2f} | {r['env_steps']:,} | {r['us_per_env_step']:.0f} | "
                         f"{'-' if same is None else ('yes' if same == r['returns'] else 'NO')} | "
                         f"{r['load_average']:.1f} |")
    lines += ["", "Commands:", ""] + [f"- `{data['command']}`" for data in files]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", nargs="+", default=["halfcheetah", "hopper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="envs.evaluate's workers (default: its own choice)")
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the rows (default: print only)")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier run's JSON: are the returns the same?")
    parser.add_argument("--note", default="", help="with --render: a paragraph after the table")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="write the markdown table of these JSON files to --out instead of measuring")
    args = parser.parse_args(argv)
    if args.render:
        write_atomic(args.out, render(args.render, args.note))
        return
    takes_workers = "workers" in inspect.signature(evaluate).parameters
    extra = {"workers": args.workers} if takes_workers and args.workers is not None else {}
    rows = []
    for domain in args.domains:
        for seeds in args.seeds:
            policy, params = expert_policy(domain, seeds)
            evaluate(policy, params, domain, num_episodes=args.episodes, seed=0, **extra)  # builds, compiles
            times = []
            for _ in range(args.repeats):
                cpu, child, wall = time.process_time(), children_cpu_seconds(), time.perf_counter()
                result = evaluate(policy, params, domain, num_episodes=args.episodes, seed=0, **extra)
                times.append((time.perf_counter() - wall, time.process_time() - cpu + children_cpu_seconds() - child))
            wall, cpu = (float(np.median([t[k] for t in times])) for k in (0, 1))
            steps = int(result.episode_lengths.sum())
            row = {"label": args.label, "domain": domain, "seeds": seeds, "episodes": args.episodes,
                   "wall_seconds": wall, "cpu_seconds": cpu, "env_steps": steps,
                   "us_per_env_step": 1e6 * wall / steps, "workers": args.workers if takes_workers else "n/a",
                   "returns": result.episode_returns.tolist(), "cpus": len(os.sched_getaffinity(0)),
                   "load_average": os.getloadavg()[0]}
            rows.append(row)
            print(f"{args.label}: {domain} {seeds} seeds x {args.episodes} episodes: {wall:.2f} s wall, {cpu:.2f} s "
                  f"CPU, {steps:,} env-steps, {row['us_per_env_step']:.0f} us per env-step (load {row['load_average']:.1f})",
                  flush=True)
    if args.compare is not None:
        earlier = {(r["domain"], r["seeds"]): r for r in json.loads(args.compare.read_text())["rows"]}
        for row in rows:
            before = earlier.get((row["domain"], row["seeds"]))
            if before is not None:
                row["same_returns_as"] = {"label": before["label"], "same": before["returns"] == row["returns"],
                                          "max_abs_difference": float(np.max(np.abs(
                                              np.asarray(before["returns"]) - np.asarray(row["returns"]))))}
                print(f"{row['domain']} {row['seeds']} seeds: returns the same as {before['label']}: "
                      f"{row['same_returns_as']['same']} (max |difference| {row['same_returns_as']['max_abs_difference']:.3g}); "
                      f"wall {before['wall_seconds']:.2f} -> {row['wall_seconds']:.2f} s, CPU {before['cpu_seconds']:.2f}"
                      f" -> {row['cpu_seconds']:.2f} s")
    if args.out is not None:
        write_atomic(args.out, json.dumps({"command": " ".join(["python", "benchmarks/eval_speed.py", *(argv or sys.argv[1:])]),
                                           "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
