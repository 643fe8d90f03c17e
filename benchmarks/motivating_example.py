"""DVDF's motivating example: a source dataset that mixes random and expert trajectories of a shifted domain.
Dynamics-only filtering (IGDF, lam = 1) cannot tell them apart (both follow the source dynamics); DVDF's value
term (lam = 0.7) should keep the expert data.

    python benchmarks/motivating_example.py                       # 3 seeds, stage budgets below, ~1 h on 2 CPU cores

For each seed, one `algos/dvdf.py` run with `--lam 1.0 0.7` (both settings in one program, on the same frozen SQL
and scorer networks, trained with that seed) on the source mixture crossdomain/mix/halfcheetah-kinematic-random-expert-v0
(500k random + 500k expert transitions of halfcheetah-kinematic, envs/generate.py MIXTURES) and the target
halfcheetah medium dataset (10%, the default). The filter only depends on the frozen networks and the batch, so a
short filtered stage (--steps) measures it: results.json's filter diagnostics give, over every training batch, the
share of expert transitions among the kept source samples and each quality's keep rate. Writes
benchmarks/results/motivating_example.md and .json (whole or not at all).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: envs/, benchmarks/
from envs.run import write_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = "crossdomain/mix/halfcheetah-kinematic-random-expert-v0"
SETTINGS = (1.0, 0.7)  # IGDF, DVDF


def run(seed: int, args) -> dict:
    out = Path(args.runs) / f"seed{seed}"
    flags = ["--source-dataset", MIXTURE, "--source", "halfcheetah-kinematic", "--target", "halfcheetah",
             "--quality", args.quality, "--lam", *map(str, SETTINGS), "--xi", "0.5", "--seed", str(seed),
             "--sql-steps", str(args.sql_steps), "--scorer-steps", str(args.scorer_steps), "--steps",
             str(args.steps), "--eval-every", str(args.steps), "--eval-episodes", "1", "--out", str(out)]
    if (out / "results.json").exists() and json.loads((out / "results.json").read_text())["finished"]:
        print(f"seed {seed}: finished run in {out}, reused")
    else:
        flags += ["--resume"] if (out / "checkpoint.msgpack").exists() else []
        print(f"seed {seed}: python algos/dvdf.py {' '.join(flags)}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "algos" / "dvdf.py"), *flags], cwd=ROOT, check=True)
    return json.loads((out / "results.json").read_text())


def summarise(results: list[dict]) -> dict:
    """Per setting: the expert share among kept samples and each quality's keep rate, per seed (the filter
    statistics of the whole filtered stage, summed over its batches)."""
    rows = {}
    for lam in SETTINGS:
        per_seed = {"expert_share_kept": [], "expert_share_batch": [], "keep_rate_expert": [],
                    "keep_rate_random": [], "dynamics_score_kept": [], "advantage_kept": []}
        for result in results:
            index = next(i for i, run in enumerate(result["grid"]) if run["lam"] == lam)
            stats = [e["filter"] for e in result["evaluations"]]
            # evaluations cover equal chunks of steps: their plain mean is the mean over every batch
            mean = lambda get: float(np.mean([get(s)[index] for s in stats]))  # noqa: E731
            per_seed["expert_share_kept"].append(mean(lambda s: s["kept_share"]["quality"]["expert"]))
            per_seed["expert_share_batch"].append(mean(lambda s: s["batch_share"]["quality"]["expert"]))
            per_seed["keep_rate_expert"].append(mean(lambda s: s["keep_rate"]["quality"]["expert"]))
            per_seed["keep_rate_random"].append(mean(lambda s: s["keep_rate"]["quality"]["random"]))
            per_seed["dynamics_score_kept"].append(mean(lambda s: s["dynamics_score_kept"]))
            per_seed["advantage_kept"].append(mean(lambda s: s["advantage_kept"]))
        rows[lam] = per_seed
    return rows


def render(rows: dict, results: list[dict], command: str) -> str:
    args = results[0]["args"]
    stages = results[0]["stages"]
    auc = [r["stages"]["scorer"]["separation"]["auc"][0] for r in results]
    lines = ["# Motivating example: random + expert source data", "",
             f"Made by `{command}`. Source: `{MIXTURE}` (500k uniform-random + 500k expert transitions of "
             "halfcheetah-kinematic, whole trajectories); target: halfcheetah "
             f"{args['quality']}, {args['target_fraction']:.0%} of it. Per seed one `algos/dvdf.py` run with "
             f"`--lam 1.0 0.7 --xi 0.5` (SQL {stages['sql']['steps']:,} steps, scorer {stages['scorer']['steps']:,} "
             f"steps, trained with that seed and shared by both settings; {args['steps']:,} filtered steps whose "
             f"batches give the statistics: {args['steps'] * args['batch_size'] // 2:,} source samples per run). "
             f"Seeds: {', '.join(str(r['seeds'][0]) for r in results)}; mean ± std over seeds (ddof 0).", "",
             "| setting | expert share among kept | expert share in batches | keep rate of expert | "
             "keep rate of random | mean h of kept | mean advantage of kept |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda values, pct=True: (f"{100 * np.mean(values):.1f}% ± {100 * np.std(values):.1f}" if pct  # noqa
                                    else f"{np.mean(values):.3f} ± {np.std(values):.3f}")
    for lam, per_seed in rows.items():
        name = "IGDF (lam = 1)" if lam == 1.0 else f"DVDF (lam = {lam})"
        lines.append(f"| {name} | {fmt(per_seed['expert_share_kept'])} | {fmt(per_seed['expert_share_batch'])} | "
                     f"{fmt(per_seed['keep_rate_expert'])} | {fmt(per_seed['keep_rate_random'])} | "
                     f"{fmt(per_seed['dynamics_score_kept'], False)} | {fmt(per_seed['advantage_kept'], False)} |")
    lines += ["", "Per seed, expert share among kept samples:", "",
              "| seed | " + " | ".join(f"lam = {lam}" for lam in rows) + " |", "|---|" + "---|" * len(rows)]
    for k, result in enumerate(results):
        lines.append(f"| {result['seeds'][0]} | " + " | ".join(f"{100 * rows[lam]['expert_share_kept'][k]:.1f}%"
                                                               for lam in rows) + " |")
    if any(a is not None for a in auc):
        lines += ["", "Scorer held-out AUC (target above source transitions), per seed: "
                  + ", ".join(f"{a:.3f}" for a in auc if a is not None) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quality", default="medium", help="quality of the target dataset")
    parser.add_argument("--sql-steps", type=int, default=100_000)
    parser.add_argument("--scorer-steps", type=int, default=7_000)
    parser.add_argument("--steps", type=int, default=2_000, help="filtered IQL steps measured")
    parser.add_argument("--runs", default="runs/motivating_example")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motivating_example")
    args = parser.parse_args()
    results = [run(seed, args) for seed in args.seeds]
    rows = summarise(results)
    command = "python benchmarks/motivating_example.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", render(rows, results, command.strip())),
                         (".json", json.dumps({"command": command.strip(), "settings": {str(k): v for k, v in
                                                                                     rows.items()}}, indent=1))):
        write_atomic(args.out.with_suffix(suffix), text)
    print(render(rows, results, command.strip()))


if __name__ == "__main__":
    main()
