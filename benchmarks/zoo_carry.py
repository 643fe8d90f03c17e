"""Carry the zoo's unfinished SAC runs (issue 21) from one machine to the next, through the repository.

    python benchmarks/zoo_carry.py --runs /work/zoo_runs        # before a session ends: then commit benchmarks/zoo_carry

A SAC run of 1M steps takes longer than one session on a 2-core machine, and a later session may get a fresh
machine without the run's folder. Its checkpoint.npz is mostly the replay buffer (80 MB at 450k steps); the
networks, their optimiser states and the temperature are about 3 MB. For every domain of --runs that has a checkpoint
and is not harvested (<runs>/<domain>/HARVESTED), this writes that part, compressed, to
benchmarks/zoo_carry/<domain>.npz (whole or not at all), with the step and the learning curve it came from.

--sources <domain> ... also keeps the networks of (harvested) domains that others start from (zoo_retrain.sh's
<domain>@<source>) in benchmarks/zoo_carry/from/<source>.npz.

benchmarks/zoo_retrain.sh continues such a domain on a machine without its run folder with
`algos/sac.py --init-from benchmarks/zoo_carry/<domain>.npz`: a fine-tuned run (sac.py's own mode) that starts from
those networks with an empty replay buffer, filled by the loaded actor before the first update. It is a warm restart,
not a bit-exact resume: the zoo needs an expert policy, and a run that fine-tunes is harvested like any other
(benchmarks/policy_zoo.py). Domains harvested since are dropped from benchmarks/zoo_carry.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from envs.run import write_atomic  # noqa: E402

CARRY = Path(__file__).parent / "zoo_carry"
KEPT = ("args", "step", "history")  # besides the "state..." arrays: what --init-from and the curve need


def networks(checkpoint: Path) -> dict:
    """The networks, optimiser states, temperature, step, flags and curve of a sac.py checkpoint, without its buffer."""
    with np.load(checkpoint) as arrays:
        return {k: arrays[k] for k in arrays.files if k.startswith("state") or k in KEPT}


def carry_sources(runs: Path, domains: list[str], out: Path = CARRY) -> list[str]:
    """Keep the networks of (harvested) domains that zoo_retrain.sh starts other domains from (<domain>@<other>) in
    out/from/<other>.npz, so that such a fine-tune can start on a machine without <runs>/<other>."""
    written = []
    for domain in domains:
        checkpoint = runs / domain / "seed0" / "checkpoint.npz"
        if not checkpoint.is_file():
            raise SystemExit(f"--sources {domain}: {checkpoint} does not exist; name a domain trained under --runs.")
        kept = out / "from" / f"{domain}.npz"
        kept.parent.mkdir(parents=True, exist_ok=True)
        state = networks(checkpoint)
        write_atomic(kept, lambda f, state=state: np.savez_compressed(f, **state))
        written.append(f"from/{domain} ({int(state['step']):,} steps, {kept.stat().st_size / 1e6:.1f} MB)")
    return written


def carry(runs: Path, out: Path = CARRY) -> list[str]:
    """Write the networks of every unfinished run under runs/ to out/<domain>.npz; drop harvested domains' files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for domain_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        checkpoint, kept = domain_dir / "seed0" / "checkpoint.npz", out / f"{domain_dir.name}.npz"
        if (domain_dir / "HARVESTED").exists():
            kept.unlink(missing_ok=True)
            continue
        if not checkpoint.is_file():
            continue
        state = networks(checkpoint)
        step = int(state["step"])
        fine_tuned = json.loads(str(state["args"])).get("init_from") is not None
        if kept.is_file() and not fine_tuned:  # a run from scratch never replaces a longer carried one
            with np.load(kept) as previous:
                if int(previous["step"]) > step:
                    continue
        write_atomic(kept, lambda f, state=state: np.savez_compressed(f, **state))
        written.append(f"{domain_dir.name} ({step:,} steps, {kept.stat().st_size / 1e6:.1f} MB)")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the zoo_retrain.sh root")
    parser.add_argument("--out", type=Path, default=CARRY)
    parser.add_argument("--sources", nargs="*", default=[],
                        help="domains other domains start from (zoo_retrain.sh <domain>@<source>): their networks go "
                             "to <out>/from/<source>.npz, harvested or not")
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs} is not a folder; give the root zoo_retrain.sh trains into.")
    written = carry(args.runs, args.out) + carry_sources(args.runs, args.sources, args.out)
    print(f"carried to {args.out}: " + (", ".join(written) if written else "nothing (no unfinished run)"))


if __name__ == "__main__":
    main()
