"""DVDF's motivating example: a source dataset that mixes random and expert trajectories of a shifted domain.
Dynamics-only filtering (IGDF, lam = 1; OTDF) cannot tell them apart (both follow the source dynamics); DVDF's value
term (lam = 0.7, with IGDF's or OTDF's dynamics score) should keep the expert data.

    python benchmarks/motivating_example.py                       # 3 seeds, stage budgets below, ~1 h on 2 CPU cores
    python benchmarks/motivating_example.py --methods igdf ot otdf --ot-target-size 5000 --out \
        benchmarks/results/otdf_motivating_example                # with OTDF and DVDF-OTDF

For each seed and method, one run with that seed: `igdf`, `algos/dvdf.py --lam 1.0 0.7` (IGDF and DVDF-IGDF in one
program, on the same frozen SQL and scorer networks); `ot`, `algos/dvdf_otdf.py --lam 1.0 0.7` (the OT filter alone
and DVDF-OTDF, on otdf.py's stages); `otdf`, `algos/otdf.py` (the top 80% by the OT deviation). On the source
mixture crossdomain/mix/halfcheetah-kinematic-random-expert-v0
(500k random + 500k expert transitions of halfcheetah-kinematic, envs/generate.py MIXTURES) and the target
halfcheetah medium dataset (10%, the default). The filter only depends on the frozen networks and the batch, so a
short filtered stage (--steps) measures it: results.json's filter diagnostics give, over every training batch, the
share of expert transitions among the kept source samples and each quality's keep rate. The OT stage's measured
rate is reported with the rate it implies for the papers' 1M x 100k. Writes benchmarks/results/motivating_example.md
and .json (or --out; whole or not at all).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: envs/, benchmarks/
from envs.run import write_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = "crossdomain/mix/halfcheetah-kinematic-random-expert-v0"
SETTINGS = (1.0, 0.7)  # IGDF, DVDF (and their OT forms)
# per method: (script, its own flags, the settings it reports: (row name, lam or None for otdf.py's one run))
METHODS = {"igdf": ("dvdf", ["--lam", *map(str, SETTINGS), "--xi", "0.5"],
                    (("IGDF (lam = 1, xi 0.5)", 1.0), ("DVDF-IGDF (lam = 0.7, xi 0.5)", 0.7))),
           "ot": ("dvdf_otdf", ["--lam", *map(str, SETTINGS), "--xi", "0.5"],
                  (("OT filter alone (lam = 1, xi 0.5)", 1.0), ("DVDF-OTDF (lam = 0.7, xi 0.5)", 0.7))),
           "otdf": ("otdf", [], (("OTDF (top 80% by the OT deviation)", None),))}


def run(seed: int, method: str, args) -> dict:
    script, own, _ = METHODS[method]
    out = Path(args.runs) / method / f"seed{seed}"
    flags = ["--source-dataset", MIXTURE, "--source", "halfcheetah-kinematic", "--target", "halfcheetah",
             "--quality", args.quality, "--seed", str(seed), "--steps", str(args.steps), "--eval-every",
             str(args.steps), "--eval-episodes", "1", "--out", str(out), "--cache-dir", args.cache_dir, *own]
    if script in ("dvdf", "dvdf_otdf"):
        flags += ["--sql-steps", str(args.sql_steps)]
    if script == "dvdf":
        flags += ["--scorer-steps", str(args.scorer_steps)]
    if method in ("ot", "otdf") and args.ot_target_size:
        flags += ["--ot-target-size", str(args.ot_target_size)]
    if (out / "results.json").exists() and json.loads((out / "results.json").read_text())["finished"]:
        print(f"seed {seed}, {method}: finished run in {out}, reused")
    else:
        flags += ["--resume"] if (out / "checkpoint.msgpack").exists() else []
        print(f"seed {seed}, {method}: python algos/{script}.py {' '.join(flags)}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), *flags], cwd=ROOT, check=True)
    return json.loads((out / "results.json").read_text())


def summarise(results: dict) -> dict:
    """Per reported setting: the expert share among kept samples and each quality's keep rate, per seed (the filter
    statistics of the whole filtered stage, summed over its batches). results: {method: [results.json per seed]}."""
    rows = {}
    for method, per_method in results.items():
        for name, lam in METHODS[method][2]:
            per_seed = {"expert_share_kept": [], "expert_share_batch": [], "keep_rate_expert": [],
                        "keep_rate_random": [], "dynamics_score_kept": [], "advantage_kept": [], "seeds": []}
            for result in per_method:
                index = 0 if lam is None else next(i for i, run in enumerate(result["grid"]) if run["lam"] == lam)
                stats = [e["filter"] for e in result["evaluations"]]
                # evaluations cover equal chunks of steps: their plain mean is the mean over every batch
                mean = lambda get: float(np.mean([get(s)[index] for s in stats]))  # noqa: E731
                per_seed["expert_share_kept"].append(mean(lambda s: s["kept_share"]["quality"]["expert"]))
                per_seed["expert_share_batch"].append(mean(lambda s: s["batch_share"]["quality"]["expert"]))
                per_seed["keep_rate_expert"].append(mean(lambda s: s["keep_rate"]["quality"]["expert"]))
                per_seed["keep_rate_random"].append(mean(lambda s: s["keep_rate"]["quality"]["random"]))
                per_seed["dynamics_score_kept"].append(mean(lambda s: s["dynamics_score_kept"]))
                per_seed["advantage_kept"].append(mean(lambda s: s["advantage_kept"]) if "advantage_kept" in stats[0]
                                                  else None)
                per_seed["seeds"].append(result["seeds"][0])
            rows[name] = per_seed
    return rows


def ot_timing(results: dict) -> Optional[dict]:
    """The OT stage's measured time (where a run trained it rather than read it from the cache) and what its rate
    per source x target pair implies for 1M x 100k."""
    for per_method in results.values():
        for result in per_method:
            info = result.get("stages", {}).get("ot")
            if info and info.get("origin") == "trained":
                pairs = info["source_size"] * info["target_transitions"]
                return {"source": info["source_size"], "target": info["target_transitions"],
                        "seconds": info["train_seconds"], "chunk": info["chunk"],
                        "implied_seconds_1m_x_100k": info["train_seconds"] / pairs * 1e6 * 1e5}
    return None


def render(rows: dict, results: dict, command: str, timing: Optional[dict]) -> str:
    first = next(iter(results.values()))[0]
    args, stages = first["args"], {}
    for per_method in results.values():
        stages |= per_method[0]["stages"]
    budgets = [f"SQL {stages['sql']['steps']:,} steps" if "sql" in stages else None,
               f"scorer {stages['scorer']['steps']:,} steps" if "scorer" in stages else None,
               f"OT against {stages['ot']['target_transitions']:,} target transitions" if "ot" in stages else None,
               f"CVAE {stages['cvae']['steps']:,} steps" if "cvae" in stages else None]
    lines = ["# Motivating example: random + expert source data", "",
             f"Made by `{command}`. Source: `{MIXTURE}` (500k uniform-random + 500k expert transitions of "
             "halfcheetah-kinematic, whole trajectories); target: halfcheetah "
             f"{args['quality']}, {args['target_fraction']:.0%} of it. CPU budget: per seed and method one run "
             f"({', '.join(b for b in budgets if b)}, each stage trained with that seed and shared by the settings of "
             f"one run; {args['steps']:,} filtered steps whose batches give the statistics: "
             f"{args['steps'] * args['batch_size'] // 2:,} source samples per run). Mean ± std over the seeds of "
             "each row (ddof 0); h is IGDF's cosine score or OTDF's batch-normalised deviation c in [-1, 0].", "",
             "| setting | seeds | expert share among kept | expert share in batches | keep rate of expert | "
             "keep rate of random | mean h of kept | mean advantage of kept |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda values, pct=True: ("n/a" if values[0] is None else  # noqa: E731
                                    f"{100 * np.mean(values):.1f}% ± {100 * np.std(values):.1f}" if pct
                                    else f"{np.mean(values):.3f} ± {np.std(values):.3f}")
    for name, per_seed in rows.items():
        lines.append(f"| {name} | {', '.join(map(str, per_seed['seeds']))} | {fmt(per_seed['expert_share_kept'])} | "
                     f"{fmt(per_seed['expert_share_batch'])} | {fmt(per_seed['keep_rate_expert'])} | "
                     f"{fmt(per_seed['keep_rate_random'])} | {fmt(per_seed['dynamics_score_kept'], False)} | "
                     f"{fmt(per_seed['advantage_kept'], False)} |")
    all_seeds = sorted({s for r in rows.values() for s in r["seeds"]})
    lines += ["", "Per seed, expert share among kept samples:", "",
              "| setting | " + " | ".join(f"seed {seed}" for seed in all_seeds) + " |",
              "|---|" + "---|" * len(all_seeds)]
    for name, per_seed in rows.items():
        share = dict(zip(per_seed["seeds"], per_seed["expert_share_kept"]))
        lines.append(f"| {name} | " + " | ".join(f"{100 * share[s]:.1f}%" if s in share else "" for s in all_seeds)
                     + " |")
    auc = [r["stages"]["scorer"]["separation"]["auc"][0] for r in results.get("igdf", [])]
    if any(a is not None for a in auc):
        lines += ["", "Scorer held-out AUC (target above source transitions), per seed: "
                  + ", ".join(f"{a:.3f}" for a in auc if a is not None) + "."]
    if timing:
        lines += ["", f"OT stage (ott-jax Sinkhorn, chunks of {timing['chunk']:,} source transitions, 100 iterations "
                  f"each): {timing['source']:,} source x {timing['target']:,} target transitions took "
                  f"{timing['seconds'] / 60:.1f} min on this machine (2 CPU cores, shared with two SAC trainings); "
                  f"at that rate per source-target pair, the papers' 1M x 100k would take "
                  f"{timing['implied_seconds_1m_x_100k'] / 3600:.1f} h (an extrapolation, not a run)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quality", default="medium", help="quality of the target dataset")
    parser.add_argument("--sql-steps", type=int, default=100_000)
    parser.add_argument("--scorer-steps", type=int, default=7_000)
    parser.add_argument("--steps", type=int, default=2_000, help="filtered IQL steps measured")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["igdf"])
    parser.add_argument("--ot-target-size", type=int, default=None,
                        help="OT against this many target transitions (default: all of the target data)")
    parser.add_argument("--runs", default="runs/motivating_example")
    parser.add_argument("--cache-dir", default="runs/cache", help="where the runs cache their stages")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motivating_example")
    args = parser.parse_args()
    results = {method: [] for method in args.methods}
    for seed in args.seeds:  # seed by seed, so that the tables fill as the seeds finish
        for method in args.methods:
            results[method].append(run(seed, method, args))
        rows, timing = summarise(results), ot_timing(results)
        command = ("python benchmarks/motivating_example.py " + " ".join(sys.argv[1:])).strip()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = render(rows, results, command, timing)
        write_atomic(args.out.with_suffix(".md"), text)
        write_atomic(args.out.with_suffix(".json"), json.dumps({"command": command, "settings": rows,
                                                                "ot_timing": timing}, indent=1))
        print(text)


if __name__ == "__main__":
    main()
