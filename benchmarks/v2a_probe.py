"""How well V2A's trajectory representation z separates the source domains of a heterogeneous mixture.

    python benchmarks/v2a_probe.py                                          # the default mixture, 0 and 1,000 steps
    python benchmarks/v2a_probe.py --mixtures hopper-kinematic-morph-random --encoder-steps 0 1000 100000

For each mixture (envs/generate.py MIXTURES; made on demand) and each encoder budget, one
`python algos/v2a.py --representation-only --source-dataset crossdomain/mix/<mixture>-v0 --encoder-steps N`: the
trajectory encoder trained N steps (0: untrained, the baseline that says how much of the separation training
adds), every trajectory relabelled with its z, and a linear probe (multinomial logistic regression on
standardised z) fitted on 70% of each domain's trajectories and scored on the other 30%, beside the chance level
(the majority class) and a nearest-centroid probe; the same for the trajectories' quality when the mixture has
several. The default mixture, halfcheetah-kinematic-morph-random, plays uniform random actions in both domains:
only the dynamics tell its trajectories apart. The runs go to runs/v2a_probe/<mixture>/encoder<N>.
Writes benchmarks/results/<--name>.md and .json (whole or not at all) and, per mixture, the 2-D PCA of z of its
largest budget as <--name>_<mixture>.png. A run again trains nothing that v2a.py's stage cache (--cache-dir) holds
for the same data and flags: only the relabelling and the probes are redone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: envs/, benchmarks/
from envs.run import write_atomic  # noqa: E402

from envs.datasets import load_dataset  # noqa: E402
from envs.generate import MIXTURES, check_mixture, mixture_id  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def run(name: str, dataset: str, domain: str | None, encoder_steps: int, args) -> dict:
    """v2a.py --representation-only on one dataset (a Minari id or HDF5 path) whose first episode is of `domain`
    (None: unknown; it only names the stage in v2a.py's cache record)."""
    out = Path(args.runs) / name / f"encoder{encoder_steps}"
    flags = ["--representation-only", "--source-dataset", dataset, "--encoder-steps", str(encoder_steps),
             "--seed", str(args.seed), "--cache-dir", args.cache_dir, "--out", str(out)]
    flags += ["--source", domain] if domain else []
    if args.relabel_window is not None:
        flags += ["--relabel-window", str(args.relabel_window)]
    print(f"python algos/v2a.py {' '.join(flags)}", flush=True)  # an encoder trained before comes from the cache
    subprocess.run([sys.executable, str(ROOT / "algos" / "v2a.py"), *flags], cwd=ROOT, check=True)
    return json.loads((out / "results.json").read_text()) | {"out": str(out)}


def row(name: str, result: dict) -> dict:
    representation = result["representation"]
    probes = representation["probe"]
    entry = {"mixture": name, "encoder_steps": result["args"]["encoder_steps"],
             "trajectories": representation["trajectories"], "out": result["out"],
             "final_losses": result["stages"]["encoder"].get("final_losses", {})}
    for key in ("domain", "quality"):
        probe = probes.get(key)
        entry[key] = None if probe is None else {
            "linear": probe["accuracy"], "centroid": probe["nearest_centroid_accuracy"], "chance": probe["chance"],
            "classes": probe["classes"], "test_trajectories": probe["test_trajectories"]}
    return entry


def render(rows: list[dict], command: str) -> str:
    lines = ["# V2A: how well the trajectory representation z separates the source domains", "",
             f"Made by `{command}` (benchmarks/v2a_probe.py). Per mixture and encoder budget: accuracy of a "
             "linear probe (and of a nearest-centroid probe) that predicts each held-out trajectory's domain "
             "(quality) from its z, fitted on 70% of each class's trajectories, tested on the other 30%; chance = "
             "always the majority class. 0 encoder steps = the untrained encoder (the baseline). The encoder is "
             "unsupervised: it never sees the labels.", "",
             "| mixture | encoder steps | trajectories | domain: linear | domain: centroid | domain: chance "
             "| quality: linear | quality: chance | reconstruction MSE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in rows:
        domain, quality = entry["domain"], entry["quality"]
        cells = [entry["mixture"], str(entry["encoder_steps"]), str(entry["trajectories"])]
        cells += (["-"] * 3 if domain is None else
                  [f"{domain['linear']:.3f}", f"{domain['centroid']:.3f}", f"{domain['chance']:.3f}"])
        cells += ["-"] * 2 if quality is None else [f"{quality['linear']:.3f}", f"{quality['chance']:.3f}"]
        loss = entry["final_losses"].get("reconstruction")
        cells.append("-" if loss is None else f"{loss:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Projections (PCA of z, coloured by domain) of each mixture's largest budget: "
              + ", ".join(f"`{entry['png']}`" for entry in rows if entry.get("png")) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixtures", nargs="*", default=["halfcheetah-kinematic-morph-random"],
                        help=f"named mixtures (envs/generate.py MIXTURES): {', '.join(sorted(MIXTURES))}")
    parser.add_argument("--datasets", nargs="+", default=[],
                        help="other heterogeneous datasets (Minari ids or D4RL-format HDF5 paths with episode "
                             "metadata), probed as well")
    parser.add_argument("--encoder-steps", nargs="+", type=int, default=[0, 1000],
                        help="encoder budgets (the paper: 100000; ~2-5 steps/s on a 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relabel-window", type=int, default=None)
    parser.add_argument("--runs", default="runs/v2a_probe", help="output folder of the v2a.py runs")
    parser.add_argument("--cache-dir", default="runs/cache", help="v2a.py's stage cache")
    parser.add_argument("--name", default="v2a_probe", help="results file name in --results")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    args = parser.parse_args(argv)
    for mixture in args.mixtures:
        check_mixture(mixture)
    if min(args.encoder_steps) < 0:
        raise SystemExit(f"--encoder-steps must be 0 (untrained) or more, got {min(args.encoder_steps)}.")

    for dataset in args.datasets:
        if not Path(dataset).is_file() and "/" not in dataset:
            raise SystemExit(f"--datasets takes Minari ids (namespace/name-v0) or HDF5 paths, got '{dataset}'.")
    jobs = [(mixture, mixture_id(mixture), check_mixture(mixture)[0][0]) for mixture in args.mixtures]
    for dataset in args.datasets:
        metadata = load_dataset(dataset).episode_metadata
        jobs.append((Path(dataset).stem if Path(dataset).is_file() else dataset.replace("/", "_"), dataset,
                     metadata[0].get("domain") if metadata else None))

    rows = []
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, dataset, domain in jobs:
        for steps in sorted(set(args.encoder_steps)):
            rows.append(row(name, run(name, dataset, domain, steps, args)))
        largest = rows[-1]
        png = results_dir / f"{args.name}_{name}.png"
        shutil.copyfile(Path(largest["out"]) / "z_projection.png", png.with_suffix(".tmp.png"))
        png.with_suffix(".tmp.png").replace(png)
        largest["png"] = png.name
    command = "python benchmarks/v2a_probe.py " + " ".join(
        (["--mixtures", *args.mixtures] if args.mixtures else []) + (["--datasets", *args.datasets] if args.datasets
                                                                     else [])
        + ["--encoder-steps", *map(str, sorted(set(args.encoder_steps)))]
        + ([] if args.name == "v2a_probe" else ["--name", args.name]))
    write_atomic(results_dir / f"{args.name}.json", json.dumps({"command": command, "rows": rows}, indent=1))
    write_atomic(results_dir / f"{args.name}.md", render(rows, command))
    for entry in rows:
        domain = entry["domain"]
        print(f"{entry['mixture']}, {entry['encoder_steps']} encoder steps: domain probe "
              + ("n/a" if domain is None else f"{domain['linear']:.3f} (chance {domain['chance']:.3f})"))
    print(f"results in {results_dir / args.name}.md")


if __name__ == "__main__":
    main()
