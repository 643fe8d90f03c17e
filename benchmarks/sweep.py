"""Run a grid of algos/ scripts (variants x source/target pairs x qualities x grid points) from a TOML spec.

    python benchmarks/sweep.py benchmarks/specs/dvdf_default.toml
    python benchmarks/sweep.py SPEC.toml --print-commands > jobs.txt   # one standalone line per run; runs nothing

The spec (benchmarks/specs/dvdf_default.toml is an example; paths in it are relative to the repository root):
    out = "runs/sweeps/example"      output folder (--out overrides)
    num_seeds = 3                    --num-seeds of every run: its seeds train vmapped in one process
    seed = 0                         --seed of every run (default 0)
    pairs = [["halfcheetah-kinematic", "halfcheetah"]]     [source, target] domains, or [source, target,
                                     source dataset]: a Minari id (a mixture: crossdomain/mix/<name>-v0) or HDF5
                                     path given as --source-dataset, whose name replaces the source's in the folder
    qualities = ["medium", "expert"]
    [flags]                          flags of every run: key = value becomes --key value (underscores become
    steps = 50000                    dashes; a list gives several values; true gives --key, false --no-key)
    [grid]                           optional: flag = [values]; every combination is a configuration
    target_fraction = [0.1, 0.05]
    [algos.igdf]                     a variant: its name, the script algos/<script>.py, and its own flags
    script = "dvdf"
    flags = { lam = 1.0 }
A configuration (variant x pair x quality x grid point) is one process,
    python algos/<script>.py --source S --target T --quality Q --num-seeds N --seed s <flags>
        --out <out>/<variant>/<S>_to_<T>-<Q>[-<grid key><value>...]
(a variant's flags override [flags], grid values override both) run from the repository root, its output in
log.txt of that folder. The spec is checked when it loads: every flag must be one its script's Args takes (read
from the script's source), with a value among its choices, and the qualities, num_seeds >= 1 and seed >= 0 valid;
anything else ends with one sentence naming the key. Rerunning the sweep skips finished runs (results.json says
"finished": true, which a run with a non-finite evaluation never does) and continues interrupted ones (a checkpoint;
also one whose results.json cannot be read) with --resume; if a finished run was made with other flags than the
spec's now, the sweep stops before running anything (move the run away or choose another --out). A failed run is
reported and the others go on; the summary names each failed run's log and its last line (of a bad flag, the one
naming it), and the exit status is 1 if any failed. A run whose folder another process holds (its .lock) is
reported as failed without starting. SIGTERM or SIGINT to the sweep stops its running run too, then the sweep,
with one sentence; the same command continues it.
After each run it prints how many are left and how long they will take at the pace so far.
--only GLOB picks configurations by name (<variant>/<folder>), --dry-run shows what each would do.
<out>/sweep.json records the spec, the command of the whole sweep (without --only) and every configuration's folder
and command (--print-commands writes it too), so that benchmarks/report.py names the runs by their variants and
says how much of the sweep has finished.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import fcntl
import fnmatch
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: envs/, benchmarks/
from envs.catalog import QUALITIES  # noqa: E402
from envs.run import non_finite_evaluation, write_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = {"out", "num_seeds", "seed", "pairs", "qualities", "flags", "grid", "algos"}
SET_BY_SWEEP = {"source", "target", "quality", "num_seeds", "seed", "out", "resume"}
STOP_SECONDS = 30  # a run the sweep stops (SIGTERM or SIGINT to the sweep) has this long to end before SIGKILL


def literal_choices(annotation, literals: dict):
    """The values of a Literal[...] annotation (or of a module-level name bound to one), else None."""
    if isinstance(annotation, ast.Name):
        return literals.get(annotation.id)
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Literal":
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        if all(isinstance(element, ast.Constant) for element in elements):
            return tuple(element.value for element in elements)
    return None


def class_flags(path: Path, name: str) -> dict | None:
    """{flag: its choices (a Literal's values) or None} of the dataclass `name` in the file at `path`, read from its
    source (nothing is imported), its base classes' flags first (envs/run.py's CrossDomainArgs where a script's Args
    derives from it); None where the file has no such class."""
    tree = ast.parse(path.read_text())
    literals = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if (choices := literal_choices(node.value, {})) is not None:
                literals[node.targets[0].id] = choices
        if isinstance(node, ast.ClassDef) and node.name == name:
            flags = {}
            for base in node.bases:
                if isinstance(base, ast.Name):
                    flags |= class_flags(path, base.id) or class_flags(ROOT / "envs" / "run.py", base.id) or {}
            return flags | {item.target.id: literal_choices(item.annotation, literals) for item in node.body
                            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return None


def script_flags(script: str) -> dict | None:
    """{flag: its choices or None} of the Args dataclass of algos/<script>.py (class_flags); None without one."""
    return class_flags(ROOT / "algos" / f"{script}.py", "Args")


def check_flags(path: Path, spec: dict) -> None:
    """Every flag of [flags], a variant's flags and [grid] is one its script takes, with a value among its choices;
    the scripts take the flags the sweep gives every run."""
    for name, variant in spec["algos"].items():
        script = variant["script"]
        known = script_flags(script)
        if known is None:
            continue
        if missing := sorted(SET_BY_SWEEP - set(known)):
            raise SystemExit(f"{path}: algos.{name} runs algos/{script}.py, which has no "
                             f"--{missing[0].replace('_', '-')} that the sweep gives every run.")
        for where, flags in [("flags", spec.get("flags", {})), (f"algos.{name}.flags", variant.get("flags", {})),
                             ("grid", spec.get("grid", {}))]:
            for key, value in flags.items():
                flag = key.replace("-", "_")
                if flag not in known:
                    close = difflib.get_close_matches(flag, known, n=1)
                    hint = (f"the closest flag is {close[0]}." if close
                            else f"`python algos/{script}.py --help` lists them.")
                    raise SystemExit(f"{path}: {where}.{key} is not a flag of algos/{script}.py (variant {name}); "
                                     f"{hint}")
                choices = known[flag]
                for one in (value if where == "grid" else [value]) if choices is not None else []:
                    if one not in choices:
                        raise SystemExit(f"{path}: {where}.{key} = {one!r} is not one of "
                                         f"{', '.join(map(repr, choices))} (--{flag.replace('_', '-')} of "
                                         f"algos/{script}.py).")


def load_spec(path: Path) -> dict:
    """The spec, checked: anything wrong ends with one sentence naming the key."""
    if not path.is_file():
        raise SystemExit(f"No spec file at {path}.")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"{path} is not valid TOML: {error}.")
    if unknown := set(spec) - SPEC_KEYS:
        raise SystemExit(f"{path}: unknown key {sorted(unknown)[0]!r}; the keys are {', '.join(sorted(SPEC_KEYS))}.")
    for key in ("algos", "pairs", "qualities"):
        if not spec.get(key):
            raise SystemExit(f"{path} needs {key!r} (see benchmarks/specs/dvdf_default.toml).")
    if not isinstance(spec["algos"], dict) or not all(isinstance(v, dict) for v in spec["algos"].values()):
        raise SystemExit(f"{path}: algos must be tables [algos.<name>] with script = \"...\" and flags = {{...}}.")
    for key, least in (("num_seeds", 1), ("seed", 0)):
        value = spec.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SystemExit(f"{path}: {key} must be a whole number of at least {least}, got {value!r}.")
    if not isinstance(spec["qualities"], list) or (bad := [q for q in spec["qualities"] if q not in QUALITIES]):
        raise SystemExit(f"{path}: qualities holds {(bad or [spec['qualities']])[0]!r}; each quality is one of "
                         f"{', '.join(QUALITIES)}.")
    if not all(isinstance(pair, list) and len(pair) in (2, 3) and all(isinstance(x, str) for x in pair)
               for pair in spec["pairs"]):
        raise SystemExit(f"{path}: every entry of 'pairs' must be [source, target] or [source, target, source "
                         f"dataset], got {spec['pairs']}.")
    if any(len(pair) == 3 for pair in spec["pairs"]):
        for where, flags in [("flags", spec.get("flags", {})), ("grid", spec.get("grid", {}))] + [
                (f"algos.{name}.flags", variant.get("flags", {})) for name, variant in spec["algos"].items()]:
            if "source_dataset" in {key.replace("-", "_") for key in flags}:
                raise SystemExit(f"{path}: {where} sets source_dataset, which the pairs set.")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}.")
    for name, variant in spec["algos"].items():
        if unknown := set(variant) - {"script", "flags"}:
            raise SystemExit(f"{path}: algos.{name} has unknown key {sorted(unknown)[0]!r}; it takes script and flags.")
        if not (ROOT / "algos" / f"{variant.get('script')}.py").is_file():
            raise SystemExit(f"{path}: algos.{name} needs script = one of "
                             f"{', '.join(sorted(p.stem for p in (ROOT / 'algos').glob('*.py')))}.")
    for where, flags in [("flags", spec.get("flags", {}))] + [
            (f"algos.{name}.flags", variant.get("flags", {})) for name, variant in spec["algos"].items()] + [
            ("grid", spec.get("grid", {}))]:
        if taken := SET_BY_SWEEP & {key.replace("-", "_") for key in flags}:
            raise SystemExit(f"{path}: {where} sets {sorted(taken)[0]}, which the sweep sets itself (pairs, "
                             "qualities, num_seeds, seed, out; --resume is automatic).")
        if tables := [key for key, value in flags.items() if isinstance(value, dict)]:
            raise SystemExit(f"{path}: {where}.{tables[0]} must be a number, string, boolean or list, not a table.")
    check_flags(path, spec)
    return spec


def cli(flags: dict) -> list[str]:
    """key = value pairs as command-line flags: --key value, --key v1 v2 for lists, --key / --no-key for booleans."""
    words = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return words


def shown(path: Path) -> str:
    """A path as the command lines write it: relative to the repository root when inside it."""
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def dataset_name(dataset: str) -> str:
    """A source dataset's short name for folders: <name> of a Minari id <namespace>/<name>-v<N>, a file's stem."""
    if dataset.endswith((".hdf5", ".h5")):
        return Path(dataset).stem
    name = dataset.rsplit("/", 1)[-1]
    return name.rsplit("-v", 1)[0] if name.rsplit("-v", 1)[-1].isdigit() else name


def configurations(spec: dict, out: Path) -> list[dict]:
    grid = spec.get("grid", {})
    configs = []
    for (variant_name, variant), pair, quality, point in itertools.product(
            spec["algos"].items(), spec["pairs"], spec["qualities"], itertools.product(*grid.values())):
        (source, target), dataset = pair[:2], (pair[2] if len(pair) == 3 else None)
        point = dict(zip(grid, point))
        task = f"{source if dataset is None else dataset_name(dataset)}_to_{target}-{quality}" + "".join(
            f"-{key}{'_'.join(map(str, value)) if isinstance(value, list) else value}" for key, value in point.items())
        folder = out / variant_name / task
        flags = {"source": source, "target": target, "quality": quality, "num_seeds": spec.get("num_seeds", 1),
                 "seed": spec.get("seed", 0)} | ({} if dataset is None else {"source_dataset": dataset})
        for extra in (spec.get("flags", {}), variant.get("flags", {}), point):
            flags |= {key.replace("-", "_"): value for key, value in extra.items()}
        command = ["python", f"algos/{variant['script']}.py", *cli(flags), "--out", shown(folder)]
        configs.append({"name": f"{variant_name}/{task}", "variant": variant_name, "script": variant["script"],
                        "source": source, "target": target, "quality": quality, "grid": point,
                        "folder": os.path.relpath(folder, out), "flags": flags, "command": shlex.join(command)})
    return configs


def same(recorded, wanted) -> bool:
    """A flag value in results.json args against the spec's (a one-value list flag records a list)."""
    if isinstance(recorded, list) and not isinstance(wanted, list):
        wanted = [wanted]
    return recorded == wanted


def read_results(path: Path) -> dict | None:
    """A run's results.json, or None when it is missing or cannot be read (truncated: the run counts as unfinished,
    and --resume writes it again)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def status(folder: Path, flags: dict) -> tuple[str, str]:
    """What to do with a configuration: ("skip" | "resume" | "run" | "conflict", why). A run is finished when its
    results.json says so and every evaluation's returns and scores are finite (the harness never says finished
    otherwise; an older run that did is resumed, and so reported as failed)."""
    results_path = folder / "results.json"
    results = read_results(results_path)
    if results is None and results_path.exists() and (folder / "checkpoint.msgpack").exists():
        return "resume", f"{shown(results_path)} cannot be read, continuing with --resume"
    if results is not None:
        if results.get("finished") and non_finite_evaluation(results.get("evaluations") or []) is not None:
            return "resume", "finished with a non-finite evaluation, checked again with --resume"
        if results.get("finished"):
            changed = [key for key, value in flags.items() if not same(results["args"].get(key), value)]
            if not changed:
                return "skip", "finished"
            key = changed[0]
            return "conflict", (f"{results_path} is a finished run with --{key.replace('_', '-')} "
                                f"{results['args'].get(key)}, the spec says {flags[key]}; move it away or use "
                                "another --out")
    if (folder / "checkpoint.msgpack").exists():
        return "resume", "interrupted, continuing with --resume"
    return "run", "new"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def last_line(log: Path) -> str:
    """The last line of a log that says something (not a progress bar redraw or a box border); of a log that ends in
    a box (tyro's error for a bad flag), the box's first line, which names the flag."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    raw = [line.strip() for line in text.splitlines()]
    lines = [line.strip(" │╭╮╰╯─") for line in raw]
    last = next((i for i in reversed(range(len(raw))) if raw[i]), None)
    if last is not None and raw[last].startswith("╰"):  # a box ends the log: its first line after the title
        top = next((i for i in reversed(range(last)) if raw[i].startswith("╭")), None)
        inside = [line for line in lines[top + 1:last] if line] if top is not None else []
        if inside:
            return inside[0]
    return next((line for line in reversed(lines) if line), "(empty log)")


def busy(folder: Path) -> str | None:
    """Why a configuration's folder cannot be run now (another process, such as the run of a sweep that was killed
    with SIGKILL, holds its lock), or None."""
    if not (folder / ".lock").exists():
        return None
    descriptor = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return (f"another process is writing the run in {shown(folder)} (its .lock is held): wait for it to finish or "
                f"stop it, then run the sweep again")
    finally:
        os.close(descriptor)  # releases the lock when it was taken
    return None


class Stopped(Exception):
    """SIGTERM or SIGINT reached the sweep while a run was going."""


def run_logged(command: list[str], log, name: str) -> int:
    """Run one configuration's process with its output in `log`; its exit status. SIGTERM or SIGINT to the sweep
    stops the process too (SIGTERM, SIGKILL after STOP_SECONDS), so none is left running beside a rerun, and ends
    the sweep with one sentence."""
    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    handlers = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    child = None
    try:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return child.wait()
    except (Stopped, KeyboardInterrupt) as stopped:
        for number in handlers:  # a second signal while the run stops changes nothing
            signal.signal(number, signal.SIG_IGN)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        why = str(stopped) if isinstance(stopped, Stopped) else "SIGINT"
        raise SystemExit(f"Stopped by {why} during {name}, whose run was stopped too (its last checkpoint is kept); "
                         f"the same command continues the sweep.") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the TOML spec file")
    parser.add_argument("--out", type=Path, help="output folder (default: the spec's out)")
    parser.add_argument("--only", nargs="+", metavar="GLOB",
                        help="only configurations whose name <variant>/<task folder> matches one of these globs")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one standalone command line per configuration (for a job array) and write "
                             "sweep.json; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print what each configuration would do; run nothing")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    if args.out is None and "out" not in spec:
        raise SystemExit(f"Give --out or an out = \"...\" line in {args.spec}.")
    out = (args.out.resolve() if args.out is not None else (ROOT / spec["out"]).resolve())
    configs = configurations(spec, out)
    if args.only:
        configs = [c for c in configs if any(fnmatch.fnmatch(c["name"], pattern) for pattern in args.only)]
        if not configs:
            raise SystemExit(f"No configuration of {args.spec} matches --only {' '.join(args.only)}.")
    statuses = [status(out / c["folder"], c["flags"]) for c in configs]
    if args.dry_run:
        for c, (action, _) in zip(configs, statuses):
            print(f"{action:>8}  {c['command']}")
        return
    if conflicts := [why for action, why in statuses if action == "conflict"]:
        raise SystemExit(f"{conflicts[0]} ({len(conflicts)} such run{'s' * (len(conflicts) > 1)}; nothing ran).")

    # the manifest, also for --print-commands: the report names the runs in it by their variants and grid values
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "sweep.json"
    names = {c["name"] for c in configs}
    # the command of the whole sweep, not of this part: the manifest gathers the entries of every --only part
    whole = ["python", "benchmarks/sweep.py", shown(args.spec.resolve())] + (["--out", shown(out)] if args.out else [])
    lock = os.open(out, os.O_RDONLY)  # a lock on the folder: sweeps of one spec started at once (--only) keep
    try:                              # every entry of the manifest
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            previous = json.loads(manifest_path.read_text())["configurations"] if manifest_path.exists() else []
        except (ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"{manifest_path} cannot be read ({type(error).__name__}): it is truncated or corrupt; "
                             f"move it aside and run the sweep again (it is written anew).") from None
        write_atomic(manifest_path, json.dumps({
            "spec_file": shown(args.spec.resolve()), "spec": spec,
            "command": shlex.join(whole),
            "configurations": [c for c in previous if c["name"] not in names] + configs}, indent=1))
    finally:
        os.close(lock)  # releases the lock
    if args.print_commands:
        print("\n".join(c["command"] for c in configs))
        return

    ran, skipped, failed, spent = [], [], [], []  # spent: seconds of each run started here, for the ETA
    for index, (c, (action, why)) in enumerate(zip(configs, statuses), 1):
        folder = out / c["folder"]
        if action == "skip":
            print(f"[{index}/{len(configs)}] skip {c['name']} ({why})", flush=True)
            skipped.append(c)
            continue
        command = [sys.executable, *shlex.split(c["command"])[1:]] + (["--resume"] if action == "resume" else [])
        print(f"[{index}/{len(configs)}] {c['name']} ({why}) ...", flush=True)
        if held := busy(folder):
            print(f"    FAILED ({held})", flush=True)
            failed.append((c, held))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(folder / "log.txt", "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            code = run_logged(command, log, c["name"])
        seconds = time.perf_counter() - start
        spent.append(seconds)
        left = sum(action != "skip" for action, _ in statuses[index:])
        eta = f"; {left} to go, about {duration(sum(spent) / len(spent) * left)} at this pace" if left else ""
        if code == 0:
            print(f"    done in {duration(seconds)}{eta}", flush=True)
            ran.append(c)
        else:
            why = f"exit status {code}, log {shown(folder / 'log.txt')}: {last_line(folder / 'log.txt')}"
            print(f"    FAILED after {duration(seconds)} ({why}){eta}", flush=True)
            failed.append((c, why))

    print(f"\n{len(ran)} ran, {len(skipped)} skipped (finished), {len(failed)} failed; results in {shown(out)}")
    for c, why in failed:
        print(f"  failed: {c['name']}: {why}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
