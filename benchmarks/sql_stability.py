"""Is SQL's value pre-training stable? Loss curves of sql_pretrain.py (critics and value only, as DVDF uses it)
under the DVDF authors' setting and the variants that could stabilise it, on one generated source dataset.

    python benchmarks/sql_stability.py --source halfcheetah-kinematic --quality medium --steps 150000

Variants (each a `python algos/sql_pretrain.py --no-policy` run; the divergence guard stops a run whose losses turn
non-finite or whose mean Q leaves any return the data allows, and the stop is recorded):
    authors         raw rewards, alpha 0.1 (0.2 on Ant), no LayerNorm: DVDF's configs
    scaled          rewards x 1000 / (max - min episode return) (IQL's and IVR's normalisation), same alpha
    scaled-ln       scaled rewards and LayerNorm in the critics and value (sql_pretrain.py's and dvdf.py's defaults)
    scaled-ln-a1    scaled rewards, LayerNorm, alpha 1.0
Writes benchmarks/results/sql_stability_<source>-<quality>.{json,md,png}; the runs go to --runs (resumable).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from envs.run import load_script, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "authors": ["--no-reward-scaling", "--no-layer-norm"],
    "scaled": ["--reward-scaling", "--no-layer-norm"],
    "scaled-ln": ["--reward-scaling", "--layer-norm"],  # the defaults
    "scaled-ln-a1": ["--reward-scaling", "--layer-norm", "--alpha", "1.0"],
}
CURVES = ("value_loss", "critic_loss", "q_mean", "advantage_mean")


def run_variant(sql, name: str, flags: list[str], args) -> dict:
    out = Path(args.runs) / f"{args.source}-{args.quality}" / name
    argv = ["--source", args.source, "--quality", args.quality, "--no-policy", "--steps", str(args.steps),
            "--eval-every", str(args.every), "--num-seeds", str(args.num_seeds), "--out", str(out), *flags]
    if (out / "checkpoint.msgpack").exists():
        argv.append("--resume")
    stopped = None
    try:
        sql.main(argv)
    except SystemExit as stop:
        if "diverged" not in str(stop):
            raise
        stopped = str(stop)
    results = json.loads((out / "results.json").read_text())
    curves = {"steps": [e["step"] for e in results["evaluations"]]}
    for key in CURVES:  # mean over seeds of each chunk's mean
        curves[key] = [float(np.mean(e["losses"][key])) for e in results["evaluations"]]
    return {"flags": flags, "command": "python algos/sql_pretrain.py " + " ".join(argv), "stopped": stopped,
            "reached": results["step"], "reward_scale": results["data"].get("reward_scale", 1.0),
            "alpha": results["alpha"], "curves": curves}


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, key in zip(axes, CURVES):
        for name, variant in record["variants"].items():
            steps, values = variant["curves"]["steps"], np.asarray(variant["curves"][key])
            ax.plot(steps, values, label=name + (" (stopped)" if variant["stopped"] else ""))
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("gradient step")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SQL pre-training on {record['source']} ({record['quality']}), mean over {record['num_seeds']} "
                 f"seeds of each chunk's mean")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="halfcheetah-kinematic")
    parser.add_argument("--quality", default="medium")
    parser.add_argument("--steps", type=int, default=150_000)
    parser.add_argument("--every", type=int, default=5000, help="steps per chunk (one point of the curves)")
    parser.add_argument("--num-seeds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", default="runs/sql_stability")
    args = parser.parse_args(argv)
    sql = load_script("sql_pretrain")
    record = {"command": "python benchmarks/sql_stability.py " + " ".join(argv or sys.argv[1:]),
              "source": args.source, "quality": args.quality, "steps": args.steps, "num_seeds": args.num_seeds,
              "variants": {name: run_variant(sql, name, VARIANTS[name], args) for name in args.variants}}
    stem = RESULTS / f"sql_stability_{args.source}-{args.quality}"
    write_atomic(stem.with_suffix(".json"), json.dumps(record, indent=1, allow_nan=False))
    lines = [f"# SQL stability: {args.source} ({args.quality}), {args.steps:,} steps", "",
             f"`{record['command']}`; {args.num_seeds} seed(s), curves in `{stem.name}.png`.", "",
             "| variant | flags | alpha | reward scale | reached | value loss (last) | critic loss (last) | "
             "mean Q (last) | mean advantage (last) | stopped by the guard |", "|---" * 10 + "|"]
    for name, v in record["variants"].items():
        last = {key: v["curves"][key][-1] if v["curves"][key] else float("nan") for key in CURVES}
        lines.append(f"| {name} | `{' '.join(v['flags']) or '(defaults)'}` | {v['alpha']:g} | {v['reward_scale']:.3g} "
                     f"| {v['reached']:,} | {last['value_loss']:.3g} | {last['critic_loss']:.3g} | "
                     f"{last['q_mean']:.3g} | {last['advantage_mean']:.3g} | "
                     f"{(v['stopped'] or 'no').replace('|', chr(92) + '|')} |")
    write_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(record, stem.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
