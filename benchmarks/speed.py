"""Gradient steps per second of the algos/ scripts for several numbers of vmapped seeds.

    python benchmarks/speed.py --algos iql --seeds 1 5 20 --steps 3000

Each measurement is a real run of the script (`python algos/<algo>.py --num-seeds N --steps S ...`) on synthetic
datasets of HalfCheetah's shapes (speed does not depend on the values), with one evaluation episode at the end;
its results.json timing gives the steady-state rate (compile time apart). Writes benchmarks/results/speed.md
(a row per algorithm, seed count and device, merged with earlier rows) and speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.datasets import Dataset, save_hdf5  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def synthetic(path: Path, size: int, seed: int) -> str:
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


def measure(algo: str, seeds: int, steps: int, data: dict, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "algos" / f"{algo}.py"), "--num-seeds", str(seeds), "--steps", str(steps),
               "--eval-every", str(steps), "--eval-episodes", "1", "--source-dataset", data["source"],
               "--target-dataset", data["target"], "--out", str(out), *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    timing = json.loads((out / "results.json").read_text())["timing"]
    return {"algo": algo, "seeds": seeds, "steps": steps, "steps_per_second": timing["steps_per_second"],
            "updates_per_second": timing["updates_per_second"], "compile_seconds": timing["compile_seconds"],
            "device": timing["device_kind"], "command": " ".join(["python", f"algos/{algo}.py", *command[2:4]])}


def render(rows: list[dict]) -> str:
    lines = ["# Speed: gradient steps per second", "",
             "Made by `python benchmarks/speed.py --algos <algos> --seeds <N...>`: a real run of each script on "
             "synthetic HalfCheetah-shaped data (1M source, 100k target transitions), steady-state rate from its "
             "results.json (compile time apart). One gradient step updates every seed; seed-updates/s = steps/s x "
             "seeds.", "",
             "| algorithm | device | seeds | steps/s | seed-updates/s | compile s |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["algo"], r["device"], r["seeds"])):
        lines.append(f"| {r['algo']} | {r['device']} | {r['seeds']} | {r['steps_per_second']:.0f} | "
                     f"{r['updates_per_second']:.0f} | {r['compile_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["iql"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 5, 20])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every script")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "speed.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        data = {"source": synthetic(Path(tmp) / "source.hdf5", 1_000_000, 0),
                "target": synthetic(Path(tmp) / "target.hdf5", 100_000, 1)}
        for algo in args.algos:
            for seeds in args.seeds:
                row = measure(algo, seeds, args.steps, data, Path(tmp) / f"{algo}-{seeds}", args.extra)
                print(f"{algo} {seeds:>3} seeds on {row['device']}: {row['steps_per_second']:.0f} steps/s, "
                      f"{row['updates_per_second']:.0f} seed-updates/s, compile {row['compile_seconds']:.1f} s",
                      flush=True)
                rows = [r for r in rows if (r["algo"], r["seeds"], r["device"]) != (algo, seeds, row["device"])]
                rows.append(row)
    for path, text in ((store, json.dumps(rows, indent=1)), (RESULTS / "speed.md", render(rows))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
