"""The run harness every algos/ script shares: flag checks, output folders and --resume, sharding over devices, the
chunked and checkpointed training loop, cached pre-training stages, atomic strict-JSON files, fingerprints.

An algos/ file holds its algorithm (networks, losses, the jitted `train`) and hands that to this module:

    out, saved = open_run(args, default_out(args, "iql"))     # the folder; the checkpoint to continue with --resume
    start_block(args, argv, out, [("iql", args.steps, args.num_seeds)], saved)  # what runs, where, how long
    results = train_loop(args, out, saved, algo=..., init=init, train=train, keys=keys, inputs=(data, hparams),
                         in_axes=(0, 0), evaluate=..., report=...)

train(runner, *inputs, num_steps) -> (runner, metrics) trains one run for num_steps steps (a `jax.lax.scan`);
train_loop vmaps it over the leading run axis (seeds, or a grid of settings x seeds), compiles one program per
chunk length ahead of time, and after every --eval-every steps evaluates, checkpoints and rewrites results.json.
load_source_target loads a cross-domain run's source and target datasets (one target subsample per seed);
train_grid is train_loop for a (lam, xi) grid x seeds (dvdf.py, v2a.py and their -otdf variants), evaluated by
make_grid_evaluate. CrossDomainArgs holds the flags every cross-domain script takes first; variant_script hands a
flag-named variant (dvdf.py --dynamics-score ot) to its own file.
default_out differs for any two runs whose flags differ (datasets included). start_block prints the stages and
their budgets, the datasets (and which will be generated), the folder and the estimated time (the rates recorded in
benchmarks/results/speed.json for this device, else CPU_RATES); every loop's progress bar (Progress) counts timed
work only, shows the whole job's ETA and moves every few seconds while a chunk runs. Ctrl-C in train_loop,
run_stage or the OT stage ends in one sentence (`stopped`): what is saved, and the command line plus --resume.

Files of a run, in its folder (--out), each written to a temporary file beside it and renamed, so there whole or not
at all:
    results.json        strict JSON (a non-finite number is written as null): "algo", "finished" (false until the
                        last step), "step", "args" (every flag), "seeds", the script's own keys ("data", "grid",
                        "stages", "artifact", ...), "evaluations" (one entry per evaluation: step, per-run returns
                        and scores, mean and std over seeds, the per-run losses of the chunk), "final" (the last
                        evaluation without its losses, once finished), "timing" (steps_per_second: gradient steps of
                        all runs at once; updates_per_second: times the runs; compile, train, eval and wall seconds;
                        checkpoint_step: the step of the checkpoint on disk; padding_runs: copies of the last run
                        that filled the last device's share; evaluation_overlapped: whether evaluations ran during
                        the next chunk; the device) and "versions" (package versions); a run with an evaluation
                        whose return or score is not finite never says finished: "failed" says where, and the script
                        ends with that sentence (exit status 1)
    checkpoint.msgpack  {"runner": every run's train state and rng key, "step", "evaluations" (JSON), "flags" (JSON),
                        "inputs" (the fingerprint of the training inputs: datasets, subsamples, frozen stages)}:
                        written after an evaluation (every one while writing is cheap, else spaced: train_loop),
                        before results.json; --resume continues from it and ends bit for bit where an
                        uninterrupted run ends (on CPU), and refuses other flags or other data
Pre-training stages (run_stage, used by dvdf.py and v2a.py) cache what they train under --cache-dir:
    <kind>-<sha>.msgpack   the first-seed parameters of a finished stage (params stacked over a seed axis of 1)
    <kind>-<sha>.json      what it was trained on and how: "kind", "version", fingerprints, sizes, flags, "step",
                           "steps", "finished", "final_losses"; <sha> is cache_key of everything the stage depends on
    <kind>-<sha>.partial.msgpack   an unfinished stage's runner and step, saved about every minute: resumed there
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, fields
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from tqdm import tqdm

from envs.catalog import Quality
from envs.datasets import load_dataset, subsample
from envs.domains import check_domain
from envs.evaluation import evaluate

LOSS_LIMIT = 1e10  # a squared TD error beyond this (|Q - y| ~ 1e5) leaves any MuJoCo return scale float32 can fit
STAGE_CHUNKS = (100, 1_000, 10_000)  # the chunk sizes a pre-training stage runs between two saves
STAGE_SAVE_SECONDS = 60.0  # a stage saves and reports progress about this often, at most every 10,000 steps
CHECKPOINT_SHARE = 0.05  # train_loop's checkpoints take at most this share of a run's time (383 MB at 100 runs: 5 s)
CHEAP_CHECKPOINT_SECONDS = 0.25  # a checkpoint written faster than this is written after every chunk
SCAN_UNROLL = 1  # gradient steps per iteration of scan_chunk's loop (lax.scan's unroll; benchmarks/speed.py --unroll)
OVERLAP_EVALUATION = None  # train_loop evaluates during the next chunk: None = on an accelerator, not on the CPU
STAGE_SCRIPTS = {"sql": "sql_pretrain", "scorer": "igdf_scorer", "encoder": "v2a", "sqlz": "v2a", "ot": "otdf",
                 "cvae": "otdf"}
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "gymnasium", "mujoco", "minari", "tyro")


# ---------------------------------------------------------------- files
def write_atomic(path: Path, content: Union[bytes, str, Callable]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to a temporary file of a unique
    name next to `path`, then rename it over `path`: whole or not at all, and two processes writing the same file
    never share a temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SystemExit(f"The disk of {path.parent} is full: {path.name} was not written (a previous "
                             f"{path.name} there is still whole). Free some space, then run the same command again "
                             f"(with --resume for a run that has a checkpoint).") from None
        raise


def finite_json(value):
    """`value` with every non-finite float replaced by None, so that json.dumps writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def json_bytes(value) -> bytes:
    """Strict JSON (NaN and infinities as null), indented one space, as every results file of the project."""
    return json.dumps(finite_json(value), indent=1, allow_nan=False).encode()


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(arrays) -> str:
    """A short sha256 of arrays: artefacts and caches name the exact data they were trained on."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def dataset_arrays(dataset) -> tuple:
    """The fields a dataset's fingerprint covers, in a fixed order."""
    return (dataset.observations, dataset.actions, dataset.rewards, dataset.next_observations, dataset.terminals)


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- flags and folders
@dataclass
class CrossDomainArgs:
    """The flags every cross-domain algos/ script takes first (iql, dvdf, dvdf_otdf, v2a, v2a_otdf, otdf, dara,
    bosa): the experiment, the source and target data, the length of training and the evaluation. A script's Args
    adds its own after them (`class Args(CrossDomainArgs)`); results.json lists them all under "args"."""
    # --- experiment ---
    seed: int = 0
    """seed of the first run; seed k of --num-seeds uses seed + k; the pre-training stages are trained with --seed"""
    num_seeds: int = 1
    """seeds per setting, all vmapped in one jitted program"""
    out: Optional[str] = None
    """output folder; default runs/<algorithm>/<source>_to_<target>-<quality>[/<grid>]/seed<seed>[-<hash>]
    (envs.run.default_out; the script's docstring names its own)"""
    resume: bool = False
    """continue the interrupted run in --out from its last checkpoint (same flags)"""
    # --- data ---
    source: str = "halfcheetah-kinematic"
    """source domain (python -m envs list)"""
    target: str = "halfcheetah"
    """target domain: the target dataset's domain and where the policy is evaluated"""
    quality: Quality = "medium"
    """quality of the generated source and target datasets"""
    target_fraction: float = 0.1
    """fraction of the target dataset kept, in (0, 1]"""
    target_size: Optional[int] = None
    """keep exactly this many target transitions instead of --target-fraction (the papers' low-data 5000)"""
    source_dataset: Optional[str] = None
    """a Minari id or D4RL-format HDF5 path to use instead of the generated source dataset"""
    target_dataset: Optional[str] = None
    """a Minari id or D4RL-format HDF5 path to use instead of the generated target dataset"""
    physics: Literal["papers", "v5"] = "papers"
    """simulator of the generated datasets and of the evaluation: papers (gym v3 on mujoco-py, the papers' and
    D4RL's, reproduced in current MuJoCo) or v5 (Gymnasium's v5 environments as they ship)"""
    references: Literal["d4rl", "zoo"] = "d4rl"
    """score references: d4rl (D4RL's for the original tasks in the papers' physics, as the papers; each domain's
    own otherwise) or zoo (each domain's own random and expert returns)"""
    # --- training and evaluation ---
    steps: int = 1_000_000
    """gradient steps of the last stage, the policy's training"""
    eval_every: int = 10_000
    """gradient steps between evaluations (and checkpoints)"""
    eval_episodes: int = 10
    """episodes per evaluation and run"""


def need(ok: bool, message: str) -> None:
    """Exit with `message`, one sentence naming the flag and its valid range, unless `ok`."""
    if not ok:
        raise SystemExit(message)


def check_common_flags(args) -> None:
    """The checks of the flags that two or more scripts share, each where the script has the flag: a flag means the
    same in every script that has it, so it is checked here once, with one sentence."""
    for flag in ("source", "target"):
        if getattr(args, flag, None) is not None:
            check_domain(getattr(args, flag), flag=f"--{flag}")
    for flag in ("steps", "eval_every", "eval_episodes", "num_seeds"):
        if hasattr(args, flag):
            need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    if hasattr(args, "seed"):
        need(args.seed >= 0, f"--seed must be 0 or more, got {args.seed}.")
    if hasattr(args, "hidden"):
        need(len(args.hidden) >= 1 and min(args.hidden) >= 1,
             f"--hidden must be one or more positive layer widths, got {args.hidden}.")
    if hasattr(args, "lr"):
        need(args.lr > 0, f"--lr must be positive, got {args.lr}.")
    if hasattr(args, "discount"):
        need(0.0 <= args.discount <= 1.0, f"--discount must be in [0, 1], got {args.discount}.")
    if hasattr(args, "tau"):
        need(0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}.")
    # the target subsample
    if hasattr(args, "target_fraction"):
        need(0.0 < args.target_fraction <= 1.0, f"--target-fraction must be in (0, 1], got {args.target_fraction}.")
    if hasattr(args, "target_size"):
        need(args.target_size is None or args.target_size >= 1,
             f"--target-size must be a positive number of transitions, got {args.target_size}.")
    # IQL's losses and the SQL stage
    if hasattr(args, "expectile"):
        need(0.0 < args.expectile < 1.0, f"--expectile must be in (0, 1), got {args.expectile}.")
    if hasattr(args, "temperature"):
        need(args.temperature >= 0, f"--temperature must be 0 or more, got {args.temperature}.")
    if hasattr(args, "max_weight"):
        need(args.max_weight > 0, f"--max-weight must be positive, got {args.max_weight}.")
    if hasattr(args, "alpha"):
        need(args.alpha is None or args.alpha > 0, f"--alpha must be positive, got {args.alpha}.")
    # the copied pre-training stages: IGDF's scorer, otdf.py's OT deviation and CVAE (num_samples: BOSA's too)
    for flag in ("sql_steps", "sql_batch_size", "scorer_steps", "repr_dim", "num_samples", "ot_chunk", "ot_iterations",
                 "cvae_steps", "cvae_batch_size"):
        if hasattr(args, flag):
            need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    if hasattr(args, "scorer_batch_size"):
        need(args.scorer_batch_size >= 2, f"--scorer-batch-size must be at least 2 (one positive and one negative "
                                          f"per row), got {args.scorer_batch_size}.")
    if hasattr(args, "holdout_fraction"):
        need(0.0 < args.holdout_fraction <= 0.5,
             f"--holdout-fraction must be in (0, 0.5], got {args.holdout_fraction}.")
    if hasattr(args, "reg_weight"):
        need(args.reg_weight is None or args.reg_weight >= 0, f"--reg-weight must be 0 or more, got {args.reg_weight}.")
    if hasattr(args, "ot_target_size"):
        need(args.ot_target_size is None or args.ot_target_size >= 1,
             f"--ot-target-size must be a positive number of transitions, got {args.ot_target_size}.")
    if hasattr(args, "ot_epsilon"):
        need(args.ot_epsilon is None or args.ot_epsilon > 0, f"--ot-epsilon must be positive, got {args.ot_epsilon}.")
    if hasattr(args, "ot_threshold"):
        need(args.ot_threshold > 0, f"--ot-threshold must be positive, got {args.ot_threshold}.")
    if hasattr(args, "cvae_lr"):
        need(args.cvae_lr > 0 and args.cvae_kl_weight >= 0,
             f"--cvae-lr must be positive and --cvae-kl-weight 0 or more, got {args.cvae_lr} and "
             f"{args.cvae_kl_weight}.")
    if hasattr(args, "beta"):
        need(args.beta > 0, f"--beta must be positive, got {args.beta}.")
    # DVDF's (lam, xi) grid
    if hasattr(args, "lam"):
        need(len(args.lam) >= 1 and all(0.0 <= lam <= 1.0 for lam in args.lam),
             f"--lam must be one or more values in [0, 1], got {list(args.lam)}.")
    if hasattr(args, "xi"):
        need(len(args.xi) >= 1 and all(0.0 < xi <= 1.0 for xi in args.xi),
             f"--xi must be one or more values in (0, 1], got {list(args.xi)}.")
    if hasattr(args, "lam") and hasattr(args, "xi"):
        need(len(set(args.lam)) == len(args.lam) and len(set(args.xi)) == len(args.xi),
             f"--lam and --xi must not repeat a value, got {list(args.lam)} and {list(args.xi)}.")
    if hasattr(args, "xi") or hasattr(args, "proportion"):  # the filters' batches: half source, half target
        need(args.batch_size >= 2 and args.batch_size % 2 == 0,
             f"--batch-size must be even and at least 2 (half source, half target), got {args.batch_size}.")
    if hasattr(args, "xi"):  # the kept count int(B xi) of DVDF step 4
        need(min(int(args.batch_size // 2 * xi) for xi in args.xi) >= 1,
             f"--xi {min(args.xi)} keeps no source sample of {args.batch_size // 2}; raise --xi or --batch-size.")


def run_flags(args) -> dict:
    """The flags that define a run (all but --resume and --out), as JSON values."""
    return run_flags_value({k: v for k, v in asdict(args).items() if k not in ("resume", "out")})


NOT_RUN_FLAGS = ("out", "resume", "cache_dir")  # where a run's files go, never what it computes


def dataset_tag(name: str) -> str:
    """A short readable folder name for a dataset flag: a file's stem, or a Minari id without its first namespace
    ("crossdomain/mix/halfcheetah-kinematic-random-expert-v0" -> "mix.halfcheetah-kinematic-random-expert-v0")."""
    path = Path(name)
    if name.endswith((".hdf5", ".h5", ".hdf")) or path.is_file():
        tag = path.stem
    else:
        parts = name.strip("/").split("/")
        tag = ".".join(parts[1:] if len(parts) > 1 else parts)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)[:60] or "dataset"


def default_out(args, algo: str, *levels: str, shown: tuple = ()) -> str:
    """The default --out: runs/<algo>/<data>/<levels>/seed<seed>[-<hash>], which differs for any two runs whose
    flags differ in anything but --out, --resume and --cache-dir. <data> is <source>_to_<target>-<quality>, where
    --source-dataset / --target-dataset put their dataset_tag in place of the domain (the quality only stays while
    a generated dataset is read) and the v5 physics adds -v5physics; `levels` are a script's own folders, naming
    the flags in `shown`. <hash> is 8 hex digits of every other flag that is not at its default (the datasets'
    full names included, as their tags shorten them); results.json lists them all under "args"."""
    source = getattr(args, "source_dataset", None)
    target = getattr(args, "target_dataset", None)
    in_path = {"seed", "physics", *shown, *NOT_RUN_FLAGS}  # the flags the path shows in full
    data = dataset_tag(source) if source else args.source
    in_path |= set() if source else {"source"}
    if hasattr(args, "target"):
        data += f"_to_{dataset_tag(target) if target else args.target}"
        in_path |= set() if target else {"target"}
    if not source or (hasattr(args, "target") and not target):
        data += f"-{args.quality}"
        in_path.add("quality")
    data += "-v5physics" if getattr(args, "physics", None) == "v5" else ""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(args)
                if f.default is not MISSING or f.default_factory is not MISSING}
    flags = run_flags(args)
    changed = {name: value for name, value in flags.items()
               if name not in in_path and name in defaults and value != run_flags_value(defaults[name])}
    seed = f"seed{args.seed}" + (f"-{cache_key(changed)[:8]}" if changed else "")
    return str(Path("runs", algo, data, *levels, seed))


def run_flags_value(value):
    """A flag's value as run_flags writes it (JSON: tuples become lists)."""
    return json.loads(json.dumps(value))


_LOCKS: dict = {}  # path -> file descriptor of each lock this process holds


def lock(path: Path, holder: str, wait: bool = False) -> int:
    """Hold an exclusive lock on the file `path` (created if missing) until this process ends: a second process
    asking for it stops with one sentence naming `holder`, or with `wait` waits for the first to finish. This
    process may ask again for a lock it holds (a resumed main() in the same interpreter)."""
    key = str(Path(path).resolve())
    if key in _LOCKS:
        return _LOCKS[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            raise SystemExit(f"Another process is writing {holder} ({path} is locked); wait for it to finish or "
                             f"choose another --out.")
        print(f"waiting for another process that is writing {holder} ({path})", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _LOCKS[key] = fd
    return fd


def unlock(path: Path) -> None:
    """Release a lock this process holds (the lock file stays: removing it would race with a waiting process)."""
    fd = _LOCKS.pop(str(Path(path).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def load_script(name: str, module_name: Optional[str] = None):
    """algos/<name>.py as a module (its main(argv), networks and losses), for the benchmarks that drive a script."""
    spec = importlib.util.spec_from_file_location(module_name or f"algos_{name}",
                                                  Path(__file__).resolve().parents[1] / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_script(argv: Optional[list], flag: str, scripts: dict, default: str) -> tuple[Optional[Callable], list]:
    """A variant that has its own algos/ file, chosen by a flag of the script it came from (dvdf.py --dynamics-score
    ot is algos/dvdf_otdf.py): (a function that runs that file's main() on argv less the flag, or None when the flag
    is absent or `default`; argv less the flag). argv None is the command line's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv):
        name, equals, inline = word.partition("=")
        if name.replace("_", "-") != flag:
            continue
        value, rest = (inline, argv[:i] + argv[i + 1:]) if equals else (
            argv[i + 1] if i + 1 < len(argv) else "", argv[:i] + argv[i + 2:])
        if value == default:
            return None, rest
        if value not in scripts:
            raise SystemExit(f"{flag} must be one of {', '.join([default, *scripts])}, got {value or 'nothing'}.")
        return (lambda: load_script(scripts[value]).main(rest)), rest
    return None, argv


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, or one sentence when it cannot be read."""
    try:
        saved = serialization.msgpack_restore(path.read_bytes())
        json.loads(saved["flags"]), json.loads(saved["evaluations"]), int(saved["step"])
        return saved
    except Exception as error:  # msgpack, JSON and key errors of a truncated or overwritten file
        raise SystemExit(f"{path} cannot be read ({type(error).__name__}): it is truncated or corrupt. Move it "
                         f"aside to start this run again from step 0, or put back a copy of it.") from None


def open_run(args, default_out: str) -> tuple[Path, Optional[dict]]:
    """The output folder (--out, else `default_out`), created and locked for this process, and the checkpoint to
    continue with --resume (whose flags must be this run's). --resume of a run that has no checkpoint yet (one
    cut off in a pre-training stage, whose progress its --cache-dir keeps) starts it."""
    out = Path(args.out or default_out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder: name a folder for the run's files.")
    out.mkdir(parents=True, exist_ok=True)
    lock(out / ".lock", f"the run in {out}")
    checkpoint_path = out / "checkpoint.msgpack"
    if not args.resume and checkpoint_path.exists():
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    if not checkpoint_path.exists():
        if args.resume:
            print(f"note: --resume found no checkpoint at {checkpoint_path}: the run starts at step 0 (a "
                  f"pre-training stage it had begun continues from its cache).", flush=True)
        return out, None
    saved = read_checkpoint(checkpoint_path)
    saved_flags = json.loads(saved["flags"])
    for name, value in run_flags(args).items():
        if value != saved_flags.get(name):
            raise SystemExit(f"--resume needs the interrupted run's flags, but --{name.replace('_', '-')} is "
                             f"{value} here and {saved_flags.get(name)} in {checkpoint_path}.")
    return out, saved


# ---------------------------------------------------------------- data
def load_source_target(args, seeds: list[int], with_source: bool = True, with_target: bool = True) -> tuple:
    """(source, target_full, targets) of a cross-domain run, host objects: the source dataset (--source-dataset, else
    --source's generated --quality data), the full target dataset (likewise) and one subsample of it per seed
    (--target-size transitions, else --target-fraction of them, drawn with that seed); None for a dataset not
    asked for, and no subsamples without the target. Ends with one sentence when the two datasets' observation or
    action sizes differ, or --target-size exceeds the target dataset."""
    target_full = source = None
    if with_target:
        target_full = load_dataset(args.target_dataset, domain=args.target, physics=args.physics,
                                   quality=None if args.target_dataset else args.quality)
    if with_source:
        source = load_dataset(args.source_dataset, domain=args.source, physics=args.physics,
                              quality=None if args.source_dataset else args.quality)
    if target_full is None:
        return source, None, []
    if source is not None and (source.obs_dim, source.act_dim) != (target_full.obs_dim, target_full.act_dim):
        raise SystemExit(f"The source dataset has observation/action sizes {source.obs_dim}/{source.act_dim} "
                         f"but the target has {target_full.obs_dim}/{target_full.act_dim}; pick domains of "
                         f"the same task.")
    if args.target_size is not None and args.target_size > target_full.size:
        raise SystemExit(f"--target-size must be at most the target dataset's {target_full.size} transitions, got "
                         f"{args.target_size}.")
    size = {"count": args.target_size} if args.target_size else {"fraction": args.target_fraction}
    return source, target_full, [subsample(target_full, **size, seed=seed) for seed in seeds]


def datasets_line(args) -> str:
    """"<source> -> <target> (<quality>)" (a dataset flag in place of its domain), for a script's last line."""
    return f"{args.source_dataset or args.source} -> {args.target_dataset or f'{args.target} ({args.quality})'}"


# ---------------------------------------------------------------- devices
def run_shardings(num_runs: int):
    """(per-run, shared) shardings that spread the leading run axis (the vmapped seeds) over every accelerator
    and copy shared data to each, so one jitted program runs each device's share of the runs; None on a single
    device, or when the runs do not divide evenly among the devices (train_loop pads them to a multiple first)."""
    devices = jax.devices()
    if len(devices) < 2 or num_runs % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("runs",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def host_device():
    """The host's CPU device, where train_loop runs evaluations while an accelerator trains (a program sent to the
    accelerator would wait behind the training chunk); None where JAX was started without its CPU backend."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def pad_runs(tree, in_axes, padding: int):
    """`tree` with `padding` copies of the last run appended to each part whose vmap axis (in `in_axes`, a prefix of
    the tree) is 0; parts with axis None are shared and stay as they are."""
    def pad(axis, part):
        if axis is None:
            return part
        return jax.tree.map(lambda leaf: jnp.concatenate([leaf, jnp.repeat(leaf[-1:], padding, axis=0)]), part)

    return jax.tree.map(pad, in_axes, tree, is_leaf=lambda node: node is None)


def place(tree, in_axes, shardings):
    """`tree` with each part whose vmap axis (in `in_axes`, a prefix of the tree) is 0 sharded over the run axis
    and each part with axis None copied to every device."""
    per_run, shared = shardings
    return jax.tree.map(lambda axis, part: jax.device_put(part, shared if axis is None else per_run),
                        in_axes, tree, is_leaf=lambda node: node is None)


# ---------------------------------------------------------------- divergence
def divergence(metrics: dict, value_bound: Optional[float]) -> Optional[str]:
    """Why a chunk's metrics say training diverged, or None: a non-finite metric, a loss beyond LOSS_LIMIT, or a
    mean Q beyond `value_bound` (a discounted return no reward of the data can reach: 10 max|r| / (1 - discount))."""
    for name, value in metrics.items():
        if not np.all(np.isfinite(np.asarray(value))):
            return f"{name} is not finite"
    for name, value in metrics.items():
        if name.endswith("_loss") and float(np.max(np.abs(np.asarray(value)))) > LOSS_LIMIT:
            return f"{name} reached {float(np.max(np.abs(np.asarray(value)))):.3g}, beyond {LOSS_LIMIT:.0e}"
    if value_bound is not None and "q_mean" in metrics:
        q_mean = float(np.max(np.abs(np.asarray(metrics["q_mean"]))))
        if q_mean > value_bound:
            return f"|mean Q| reached {q_mean:.3g}, beyond {value_bound:.3g}, ten times any discounted return of the data"
    return None


def value_bound_of(rewards, discount: float) -> float:
    """Ten times the largest discounted return any reward of the data can add up to: a mean Q beyond it diverged."""
    return 10.0 * float(np.abs(np.asarray(rewards)).max()) / max(1.0 - discount, 1e-3)


# ---------------------------------------------------------------- results rows
def losses_entry(metrics: dict) -> dict:
    return {name: np.asarray(value, dtype=np.float64).tolist() for name, value in metrics.items()}


def evaluation_entry(step: int, result, metrics) -> dict:
    """One row of results.json: per-seed return and normalised score, their mean and std over seeds (ddof 0),
    and the per-seed losses averaged over the chunk of steps that led here."""
    returns = np.asarray(result.mean_return, dtype=np.float64)
    scores = np.asarray(result.normalized_score, dtype=np.float64)
    return {"step": step, "returns": returns.tolist(), "scores": scores.tolist(),
            "return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "score_mean": float(scores.mean()), "score_std": float(scores.std()), "losses": losses_entry(metrics)}


def grid_evaluation_entry(step: int, returns, scores, settings: list, losses, filter_stats: dict) -> dict:
    """One row of results.json of a (lam, xi) grid: per-run return and score; per setting their mean and std over
    seeds (ddof 0); over all runs only when there is one setting (then it is the usual mean +- std over seeds); the
    per-run losses and filter diagnostics of the chunk of steps that led here."""
    returns, scores = np.asarray(returns, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    per_setting = [(r, s) for r, s in zip(returns.reshape(len(settings), -1), scores.reshape(len(settings), -1))]
    one_setting = len(settings) == 1
    return {"step": step, "returns": returns.tolist(), "scores": scores.tolist(),
            "by_setting": [{"lam": lam, "xi": xi, "return_mean": float(r.mean()), "return_std": float(r.std()),
                            "score_mean": float(s.mean()), "score_std": float(s.std())}
                           for (lam, xi), (r, s) in zip(settings, per_setting)],
            "return_mean": float(returns.mean()) if one_setting else None,
            "return_std": float(returns.std()) if one_setting else None,
            "score_mean": float(scores.mean()) if one_setting else None,
            "score_std": float(scores.std()) if one_setting else None,
            "losses": losses_entry(losses), "filter": filter_stats}


def non_finite_evaluation(evaluations: list) -> Optional[str]:
    """Where the first evaluation whose per-run returns or scores hold a non-finite number (or a null, as results.json
    writes one) is, or None. A run with such an evaluation is not finished."""
    for entry in evaluations:
        for key in ("returns", "scores"):
            values = np.asarray([np.nan if v is None else v for v in np.ravel(entry.get(key) or [])], np.float64)
            bad = np.flatnonzero(~np.isfinite(values)).tolist()
            if bad:
                runs = f"run{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}"
                return f"the {key[:-1]} of {runs} at step {entry.get('step')} is not finite"
    return None


def without_losses(entry: dict) -> dict:
    """The "final" of results.json: the last evaluation without its per-chunk diagnostics."""
    return {key: value for key, value in entry.items() if key not in ("losses", "filter")}


# ---------------------------------------------------------------- the job: start block, progress bars, Ctrl-C
RECORDED_RATES = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "speed.json"
CPU_RATES = {  # gradient steps/s of one run on a 2-core CPU, where RECORDED_RATES has no row of this device
    "iql": 208, "sql_pretrain": 387, "igdf_scorer": 442, "dvdf": 163, "v2a": 198,  # benchmarks/results/speed.md
    "sql": 493, "scorer": 449,  # as dvdf.py and v2a.py train them (speed.md's pipeline: SQL without a policy)
    # issue 29: timed like speed.py (one jitted chunk, compile apart) on the same 2-core CPU while other jobs ran
    # on it, times 1.6, the ratio of iql's rate above to iql's timed there in the same session
    "otdf": 20, "dara": 170, "bosa": 24, "encoder": 7, "sqlz": 98, "cvae": 124, "dara_classifier": 455, "bosa_vae": 8,
}
RATE_OF = {"igdf": "dvdf", "dvdf-otdf": "otdf", "v2a-otdf": "otdf"}  # runs at the rate of the same program
OT_PAIRS_PER_SECOND = {5_000: 2.9e6, 20_000: 1.2e6}  # target size -> source x target pairs the OT stage solves
# per second on that CPU (chunks of 10,000 source transitions, 100 Sinkhorn iterations; measured as CPU_RATES' last)
EVAL_EPISODE_SECONDS = 0.08  # one evaluation episode of one run (speed.md: 10 episodes x 5 seeds in 3.8 s)
DATASET_MB_PER_MILLION = 360  # the Minari store's size of 1M generated HalfCheetah transitions (their states too)
_JOB: dict = {}  # the running script's plan: set by start_block, read by the progress bars and Ctrl-C


def duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _recorded_rates(device: str) -> dict:
    """name -> [(runs, steps/s)] recorded for this device kind: RECORDED_RATES (benchmarks/speed.py's rows where the
    repository holds them), else CPU_RATES on a CPU."""
    rates: dict = {}
    try:
        recorded = json.loads(RECORDED_RATES.read_text())
        for row in recorded.get("rows", []):
            if row.get("device") == device and row.get("steps_per_second"):
                runs = row.get("runs", row.get("seeds", 1))
                rates.setdefault(row["algo"], []).append((runs, float(row["steps_per_second"])))
        for pipeline in recorded.get("pipelines", []):
            if pipeline.get("device") == device:
                for name in ("sql", "scorer"):
                    if pipeline.get("rates", {}).get(name):
                        rates.setdefault(name, []).append((1, float(pipeline["rates"][name])))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # no benchmarks/ beside envs/, or unreadable
        pass
    if device == "cpu":
        for name, rate in CPU_RATES.items():
            if rate and name not in rates:
                rates[name] = [(1, float(rate))]
    return rates


def stage_rate(name: str, runs: int, rates: dict) -> Optional[float]:
    """The expected steps/s of a stage of `runs` vmapped runs: the recorded row of the nearest run count, at its
    seed-updates/s (steps/s x runs); None where nothing is recorded."""
    rows = rates.get(RATE_OF.get(name, name))
    if not rows:
        return None
    row_runs, rate = min(rows, key=lambda row: abs(math.log(row[0] / runs)))
    return rate * row_runs / runs


def continue_command() -> str:
    """The command that continues this run: the same command line with --resume."""
    if not _JOB.get("script"):
        return "the same command with --resume"
    argv = list(_JOB["argv"])
    return shlex.join(["python", _JOB["script"], *argv, *([] if "--resume" in argv else ["--resume"])])


def stopped(where: str, saved: str) -> SystemExit:
    """The one sentence Ctrl-C ends a script with: where it stopped, what is saved, the command that continues. In
    the script's own process it then exits at once, instead of waiting for the computation XLA is running."""
    if _JOB.get("own_process"):
        atexit.register(_exit_now)
    return SystemExit(f"Stopped by Ctrl-C {where}: {saved}. Continue with: {continue_command()}")


def _exit_now():
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(130)


def _interrupt_hook(kind, value, traceback):
    """Ctrl-C outside a stage's loop (loading or generating data, between stages): one sentence, no traceback."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    cache = f", the stages finished so far in {_JOB['cache_dir']}" if _JOB.get("cache_dir") else ""
    print(f"\nStopped by Ctrl-C before a stage's training loop: the datasets made so far stay in the Minari store"
          f"{cache} and any checkpoint in {_JOB.get('out')}. Continue with: {continue_command()}", file=sys.stderr)
    _exit_now()


def start_block(args, argv: Optional[list], out: Path, stages: list, saved: Optional[dict] = None,
                datasets: Optional[tuple] = None, episodes: Optional[int] = None) -> None:
    """Print what the script will do before it does any of it, and keep the plan for the progress bars (the whole
    job's ETA) and for Ctrl-C (the command that continues). `stages` lists (name, steps[, runs]) in order, the
    last trained by train_loop (`saved`: its checkpoint); a name is the stage's cache kind (run_stage's <kind>)
    or the script's, and "ot" counts source transitions (None: all of them) against the OT target set. `datasets`
    names the sides ("source", "target") whose dataset flags it reads (default: both where the flags exist);
    `episodes` per evaluation of the last stage (default --eval-episodes)."""
    from envs.datasets import dataset_state
    script = sys._getframe(1).f_globals.get("__file__")  # the calling algos/ file
    # the script's own process: started as this algos/ file, or as a sibling that hands over to it (variant_script)
    own = script is not None and Path(sys.argv[0]).resolve().parent == Path(script).resolve().parent
    if script is not None:
        path = Path(script).resolve()
        script = str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
    argv = list(sys.argv[1:] if argv is None else argv)
    device = jax.devices()[0].device_kind
    rates = _recorded_rates(device)
    lines = [shlex.join(["python", script or "<script>", *argv])]
    generate_seconds, source_size = 0.0, None
    from envs.generate import GENERATION_RATE
    for side in datasets or tuple(side for side in ("source", "target") if hasattr(args, f"{side}_dataset")):
        given = getattr(args, f"{side}_dataset")
        name, present, size = dataset_state(given, domain=getattr(args, side), quality=None if given else args.quality,
                                            physics=getattr(args, "physics", "papers"))
        if side == "source":
            source_size = size
        if present:
            state = "in the Minari store" if not _looks_like_path(name) else "a file"
        elif size:
            generate_seconds += size / GENERATION_RATE
            state = (f"not in the store yet, so generated first from the policy zoo ({size:,} transitions, ~"
                     f"{duration(size / GENERATION_RATE)}, ~{size / 1e6 * DATASET_MB_PER_MILLION:.0f} MB)")
        else:
            state = "not found (the run stops with what to do)"
        share = ""
        if side == "target" and hasattr(args, "target_fraction"):
            share = (f", {args.target_size:,} transitions of it" if getattr(args, "target_size", None)
                     else f", {args.target_fraction:.0%} of it")
        lines.append(f"  {side:9} {name}: {state}{share}")
    plan, total = [], generate_seconds
    episodes = getattr(args, "eval_episodes", 0) if episodes is None else episodes
    for index, stage in enumerate(stages):
        name, steps, runs = (*stage, 1)[:3]
        done = int(saved["step"]) if saved is not None and index == len(stages) - 1 else 0
        if name == "ot":
            targets = getattr(args, "ot_target_size", None) or getattr(args, "target_size", None) or \
                int(getattr(args, "target_fraction", 0.1) * 1e6)
            steps = steps or source_size or 1_000_000
            measured = min(OT_PAIRS_PER_SECOND, key=lambda size: abs(math.log(size / targets)))
            rate = OT_PAIRS_PER_SECOND[measured] / targets if device == "cpu" else None
            budget = f"{steps:,} source x about {targets:,} target transitions"
        else:
            rate = stage_rate(name, runs, rates)
            budget = f"{steps:,} steps x {runs} run{'s' * (runs > 1)}"
        seconds = (steps - done) / rate if rate else None
        evaluation = ""
        if index == len(stages) - 1 and episodes and hasattr(args, "eval_every"):
            count = math.ceil((steps - done) / args.eval_every)
            eval_seconds = count * episodes * runs * EVAL_EPISODE_SECONDS
            seconds = None if seconds is None else seconds + eval_seconds
            evaluation = f" + {count} evaluation{'s' * (count > 1)} of {episodes} episode{'s' * (episodes > 1)}"
        resumed = f", resumed at step {done:,}" if done else ""
        lines.append(f"  stage {index + 1}/{len(stages)} {name}: {budget}{evaluation}{resumed}, ~{duration(seconds)}"
                     + ("" if rate else " (no recorded rate on this device)"))
        plan.append({"name": name, "steps": steps, "rate": rate, "seconds": seconds,
                     "per_eval": episodes * runs * EVAL_EPISODE_SECONDS if evaluation else 0.0})
        total = None if total is None or seconds is None else total + seconds
    cache_dir = getattr(args, "cache_dir", None)
    lines.append(f"  output    {out}" + (f" (stages cached in {cache_dir}, skipped when there)" if cache_dir else ""))
    origin = "benchmarks/results/speed.md" if RECORDED_RATES.exists() else "envs/run.py's CPU_RATES"
    known = sum(entry["seconds"] or 0.0 for entry in plan) + generate_seconds
    if total is not None:
        estimate = f"~{duration(total)} on this {device} at the rates recorded in {origin}"
    else:
        estimate = (f"{'more than ' + duration(known) if known else 'unknown'}: no rate recorded for every stage on "
                    f"this {device} ({origin})")
    lines.append(f"  estimate  {estimate}; the progress bars refresh it as they measure")
    print("\n".join(lines), flush=True)
    _JOB.clear()
    _JOB.update(script=script, argv=argv, own_process=own, out=out, cache_dir=cache_dir, plan=plan, factor=1.0)
    if own:
        sys.excepthook = _interrupt_hook


def _looks_like_path(name: str) -> bool:
    return name.endswith((".hdf5", ".h5", ".hdf")) or os.path.isfile(name)


def _plan_entry(name: Optional[str]) -> Optional[dict]:
    """The plan's entry of a stage: the first unfinished one of this name (None: the last, train_loop's)."""
    plan = _JOB.get("plan") or []
    if name is None:
        return plan[-1] if plan else None
    return next((entry for entry in plan if entry["name"] == name and not entry.get("finished")), None)


def stage_finished(name: str) -> None:
    """A stage the cache (or an artefact) provides: the job's ETA no longer counts it."""
    entry = _plan_entry(name)
    if entry is not None:
        entry["finished"] = True


class Progress:
    """A stage's progress bar. Its rate and ETAs count timed work only (compilation never); "job" adds the stages
    after this one at their recorded rates, scaled by how this machine's measured rates compare with them. While a
    chunk runs, the bar says for how long it has been running, every few seconds."""

    def __init__(self, title: str, total: int, initial: int = 0, unit: str = "step", name: Optional[str] = None):
        self.entry = _plan_entry(name)
        self.total, self.unit, self.step, self.timed, self.seconds, self.note = total, unit, initial, 0, 0.0, ""
        self.eval_seconds, self.evals, self.evals_left = 0.0, 0, 0
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=title,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def rate(self) -> Optional[float]:
        if self.timed and self.seconds > 0:
            return self.timed / self.seconds
        if self.entry is not None and self.entry["rate"]:
            return self.entry["rate"] * _JOB.get("factor", 1.0)
        return None

    def seconds_left(self) -> Optional[float]:
        """This stage's steps left at its rate, plus its evaluations left (train_loop sets evals_left) at their
        measured time (their estimate before the first)."""
        rate = self.rate()
        if rate is None:
            return None
        per_eval = self.eval_seconds / self.evals if self.evals else (self.entry or {}).get("per_eval", 0.0)
        return (self.total - self.step) / rate + self.evals_left * per_eval

    def job_left(self) -> Optional[float]:
        """This stage's time left plus that of every later stage of the plan that is not cached."""
        left = self.seconds_left()
        plan = _JOB.get("plan") or []
        if self.entry is None or left is None:
            return None
        for entry in plan[plan.index(self.entry) + 1:]:
            if not entry.get("finished"):
                if entry["seconds"] is None:
                    return None
                left += entry["seconds"] / _JOB.get("factor", 1.0)
        return left

    def _refresh(self, running: str = "") -> None:
        rate, plan = self.rate(), _JOB.get("plan") or [None]
        parts = [f"{rate:.3g} {self.unit}/s" if self.timed and rate else ""]
        if self.entry is None or self.entry is not plan[-1]:
            parts.append(f"ETA {duration(self.seconds_left())}")
        if self.entry is not None:  # the last stage's ETA is the job's
            parts.append(f"job ETA {duration(self.job_left())}")
        self.bar.set_postfix_str(", ".join(part for part in (*parts, running, self.note) if part), refresh=True)

    def wait(self, tree, steps: int):
        """`tree` once XLA has computed it; meanwhile the bar shows for how long this chunk of `steps` has run,
        and Ctrl-C is heard at once (a blocking wait would hear it only when the chunk ends)."""
        leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "is_ready")]
        start = last = time.perf_counter()
        pause = 1e-3
        rate = self.rate()
        while not all(leaf.is_ready() for leaf in leaves):
            time.sleep(pause)
            pause = min(2 * pause, 0.2)
            if time.perf_counter() - last > 2.0:
                last = time.perf_counter()
                expected = f" of ~{duration(steps / rate)}" if rate else ""
                self._refresh(f"chunk of {steps:,} running {duration(last - start)}{expected}")
        return jax.block_until_ready(tree)

    def advance(self, steps: int, seconds: float, note: Optional[str] = None) -> None:
        """`steps` more done in `seconds` of timed work (no compilation in it)."""
        self.step += steps
        self.timed += steps
        self.seconds += seconds
        if note is not None:
            self.note = note
        if self.entry is not None and self.entry["rate"] and self.timed >= min(self.total, 100):
            _JOB["factor"] = (self.timed / self.seconds) / self.entry["rate"]  # later estimates follow this machine
        self.bar.update(steps)
        self._refresh()

    def evaluated(self, seconds: float, evals_left: int) -> None:
        self.eval_seconds += seconds
        self.evals += 1
        self.evals_left = evals_left

    def close(self) -> None:
        self.bar.close()
        if self.entry is not None:
            self.entry["finished"] = self.step >= self.total


# ---------------------------------------------------------------- the training loop
def scan_chunk(step: Callable, runner, num_steps: int, means: bool = True):
    """num_steps of `step(runner, None) -> (runner, metrics)` in one jax.lax.scan: the runner after them and the
    metrics' means over the chunk (their sums with means=False). The sums run in the scan's carry instead of
    stacking every step's metrics into arrays (one dynamic-update-slice kernel per metric per step otherwise). The
    loop runs SCAN_UNROLL steps per iteration (the same steps; unrolling only changes what XLA fuses)."""
    shapes = jax.eval_shape(lambda r: step(r, None)[1], runner)
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)

    def body(carry, _):
        runner, sums = carry
        runner, metrics = step(runner, None)
        return (runner, jax.tree.map(jnp.add, sums, metrics)), None

    (runner, sums), _ = jax.lax.scan(body, (runner, zeros), None, length=num_steps, unroll=SCAN_UNROLL)
    return runner, jax.tree.map(lambda total: total / num_steps, sums) if means else sums


def train_loop(args, out: Path, saved: Optional[dict], *, algo: str, title: str, init, keys, train, inputs: tuple,
               in_axes: tuple, evaluate: Callable, report: Callable, header: Optional[dict] = None,
               final: Optional[Callable] = without_losses, before_checkpoint: Optional[Callable] = None,
               losses_of: Callable = lambda metrics: metrics, value_bound: Optional[float] = None,
               advice: str = "try a smaller --lr", timing: Optional[dict] = None, name: Optional[str] = None) -> dict:
    """Train every run of the leading run axis for args.steps steps, evaluating every args.eval_every steps.

    init(key) -> runner and train(runner, *inputs, num_steps) -> (runner, metrics) are one run's; `keys` holds one
    PRNG key per run and `in_axes` the vmap axes of `inputs` (0: one slice per run, None: shared by every run).
    After each chunk (on an accelerator the next one already dispatched, so that training goes on meanwhile;
    OVERLAP_EVALUATION), with the runner and metrics copied to the host and the host's CPU as the default device:
    `evaluate(runner, step, metrics)` gives the chunk's evaluations entry, `before_checkpoint(runner, step)` writes
    a script's own files (an artefact), then the checkpoint (after every
    chunk while writing it is cheap, else at most CHECKPOINT_SHARE of the run's time, always after the last chunk
    and on Ctrl-C), then results.json: {"algo", "finished", "step", "args", "seeds": args.seed .. args.seed +
    args.num_seeds - 1, **header, "evaluations", "final": final(last entry) once finished, "timing" (with `timing`
    added), "versions"}. `report(step, entry, metrics)` gives (progress-bar postfix, a line to print). A chunk
    whose losses_of(metrics) diverge (`divergence`) ends the run with one sentence that starts with `name`
    (default: the algo in capitals) and ends with `advice`; nothing of that chunk is saved. An evaluation whose
    returns or scores are not finite (`non_finite_evaluation`) is noted when it happens; the run trains on and is
    saved as usual, but results.json never says finished and the last step ends with one sentence ("failed" in
    results.json). The checkpoint records the fingerprint of `inputs`:
    --resume on other data (a dataset changed since the run started) stops with one sentence. Returns the last
    results written.
    """
    wall_start = time.perf_counter()
    num_runs = len(keys)
    start = time.perf_counter()
    runner = jax.block_until_ready(jax.jit(jax.vmap(init))(keys))
    compile_seconds = time.perf_counter() - start
    start_step, evaluations = 0, []
    # what the runs train on, so that --resume on other data (a dataset regenerated or edited since) is refused
    inputs_fingerprint = fingerprint(np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(inputs)))
    if saved is not None:
        if saved.get("inputs", inputs_fingerprint) != inputs_fingerprint:  # checkpoints before this check lack it
            raise SystemExit(f"--resume needs the data the interrupted run trained on, but its inputs here "
                             f"(datasets, target subsamples, frozen stages) have fingerprint {inputs_fingerprint} and "
                             f"{saved['inputs']} in {out / 'checkpoint.msgpack'}: a dataset changed since the run "
                             f"started; put that data back, or start the run again in another --out.")
        runner = serialization.from_state_dict(runner, saved["runner"])
        start_step, evaluations = int(saved["step"]), json.loads(saved["evaluations"])
    padding = -num_runs % jax.device_count()
    if padding:  # every device trains an equal share: copies of the last run fill the run axis, never reported
        runner, inputs = pad_runs(runner, 0, padding), pad_runs(inputs, in_axes, padding)
        copies = "1 copy of the last run fills" if padding == 1 else f"{padding} copies of the last run fill"
        print(f"{num_runs} runs on {jax.device_count()} devices: {copies} the last device's share; they train too, "
              f"and are left out of every result.")
    shardings = run_shardings(num_runs + padding)
    if shardings is not None:  # several accelerators: each trains its share of the runs
        runner, inputs = place(runner, 0, shardings), place(inputs, in_axes, shardings)

    # One program per chunk length (--eval-every, and the remainder if --steps is not a multiple of it), compiled
    # ahead of time: no chunk recompiles, and compile time is measured apart from training speed.
    chunks = [min(args.eval_every, args.steps - step) for step in range(start_step, args.steps, args.eval_every)]
    compiled = {}
    for num_steps in sorted(set(chunks)):
        start = time.perf_counter()
        chunk = jax.jit(jax.vmap(partial(train, num_steps=num_steps), in_axes=(0, *in_axes)))
        compiled[num_steps] = chunk.lower(runner, *inputs).compile()
        compile_seconds += time.perf_counter() - start

    seeds = [args.seed + k for k in range(args.num_seeds)]

    def failure(step: int) -> Optional[str]:
        """The sentence a run that trained all its steps with a non-finite evaluation ends with, else None."""
        where = non_finite_evaluation(evaluations)
        if step < args.steps or where is None:
            return None
        return (f"{name or algo.upper()} trained all {args.steps} steps, but {where} (a NaN or infinite return, or "
                f"a score of equal or missing reference returns), so results.json in {out} says it did not finish; "
                f"check the datasets and the reference returns, then run it again in another --out.")

    def write_results(step: int, run_timing: Optional[dict]) -> dict:
        failed = failure(step)
        finished = step == args.steps and failed is None
        results = {"algo": algo, "finished": finished, "step": step, "args": asdict(args), "seeds": seeds,
                   **(header or {}), "evaluations": evaluations,
                   "final": final(evaluations[-1]) if finished and final is not None and evaluations else None,
                   "timing": run_timing, "versions": package_versions(), **({"failed": failed} if failed else {})}
        write_atomic(out / "results.json", json_bytes(results))
        return finite_json(results)

    out.mkdir(parents=True, exist_ok=True)
    step, train_seconds, eval_seconds = start_step, 0.0, 0.0
    results = None
    if not chunks:  # --resume of a finished run: results.json again from the checkpoint, with its last timing
        try:
            previous = json.loads((out / "results.json").read_text())
        except (OSError, ValueError):  # missing, or truncated by a crash of another writer: timing is lost, no more
            previous = {}
        results = write_results(step, previous.get("timing") if isinstance(previous, dict) else None)
    progress = Progress(title, args.steps, start_step)
    saved_at = {"step": start_step, "time": time.perf_counter(), "seconds": 0.0}  # the last checkpoint written
    unsaved = None  # (runner on the host, step, evaluations) of the newest chunk, when its checkpoint was skipped

    def save(host_runner, at_step: int, count: int) -> None:
        begin = time.perf_counter()
        checkpoint = {"runner": serialization.to_state_dict(host_runner), "step": at_step,
                      "evaluations": json.dumps(finite_json(evaluations[:count])), "flags": json.dumps(run_flags(args)),
                      "inputs": inputs_fingerprint}
        write_atomic(out / "checkpoint.msgpack", serialization.msgpack_serialize(checkpoint))
        saved_at.update(step=at_step, time=time.perf_counter(), seconds=time.perf_counter() - begin)

    def time_to_save(last: bool) -> bool:
        """After the last chunk, and after every chunk while a checkpoint is cheap; else once the time since the
        last one is 1 / CHECKPOINT_SHARE times what writing it took (every ~2 min for 100 runs' 5-second write)."""
        return (last or saved_at["seconds"] < CHEAP_CHECKPOINT_SECONDS
                or time.perf_counter() - saved_at["time"] >= saved_at["seconds"] / CHECKPOINT_SHARE)

    # On an accelerator the next chunk is dispatched before this one is evaluated and saved from its host copy: the
    # device trains while the host plays the evaluation episodes (their policy on the host's CPU device, since a
    # program on the accelerator would queue behind the chunk) and writes the files. Where the chunks train on the
    # CPU itself, evaluation and training would share its cores and queue: there they take turns.
    host = host_device()
    overlap = (OVERLAP_EVALUATION if OVERLAP_EVALUATION is not None else
               host is not None and jax.default_backend() != "cpu")
    on_host = jax.default_device(host) if host is not None else contextlib.nullcontext()
    running = None
    try:
        for index, num_steps in enumerate(chunks):
            if running is None:
                running, dispatched = compiled[num_steps](runner, *inputs), time.perf_counter()
            runner, metrics = progress.wait(running, num_steps)
            chunk_seconds = time.perf_counter() - dispatched  # with the previous chunk's evaluation, if overlapping
            train_seconds += chunk_seconds
            last, running = index == len(chunks) - 1, None
            if overlap and not last:  # the device goes on at once; this runner stays valid (no buffer is donated)
                running, dispatched = compiled[chunks[index + 1]](runner, *inputs), time.perf_counter()
            host_runner, metrics = jax.tree.map(lambda leaf: leaf[:num_runs], jax.device_get((runner, metrics)))
            diverged = divergence(losses_of(metrics), value_bound)
            if diverged:  # nothing of this chunk is saved: the last checkpoint and results stay the sound ones
                where = saved_at["step"] if unsaved is None else unsaved[1]
                if unsaved is not None:
                    save(*unsaved)
                kept = f"the checkpoint in {out} stays at step {where}" if where > 0 else "nothing was saved"
                raise SystemExit(f"{name or algo.upper()} diverged in the {step}-{step + num_steps} chunk "
                                 f"({diverged}); {kept}. {advice[0].upper() + advice[1:]}.")
            step += num_steps

            start = time.perf_counter()
            with on_host:
                evaluations.append(evaluate(host_runner, step, metrics))
            eval_seconds += time.perf_counter() - start
            # overlapping, only the last evaluation adds to the run's time; the others run during the next chunk
            progress.evaluated(time.perf_counter() - start, evals_left=(0 if last else 1) if overlap else
                               len(chunks) - index - 1)
            if (where := non_finite_evaluation(evaluations[-1:])) and not non_finite_evaluation(evaluations[:-1]):
                tqdm.write(f"note: {where}; the run goes on, but it will not count as finished.")
            if before_checkpoint is not None:
                with on_host:
                    before_checkpoint(host_runner, step)
            # checkpoint first: if killed before results.json is rewritten, --resume rewrites it
            unsaved = (host_runner, step, len(evaluations))
            if time_to_save(last):
                save(*unsaved)
                unsaved = None
            timed_steps = step - start_step
            results = write_results(step, {
                "steps_per_second": timed_steps / train_seconds,  # gradient steps, every run at once
                "updates_per_second": timed_steps * num_runs / train_seconds,
                "compile_seconds": compile_seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                **(timing or {}), "wall_seconds": time.perf_counter() - wall_start, "timed_steps": timed_steps,
                "resumed_from_step": start_step, "checkpoint_step": saved_at["step"], "padding_runs": padding,
                "evaluation_overlapped": overlap,
                "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
                "devices": jax.device_count() if shardings else 1})

            postfix, line = report(step, evaluations[-1], metrics)
            progress.advance(num_steps, chunk_seconds, postfix)
            tqdm.write(line)
        progress.close()
    except KeyboardInterrupt:
        progress.close()
        if unsaved is not None:  # the newest evaluated chunk, whose checkpoint the cadence had skipped
            save(*unsaved)
        kept = (f"the checkpoint of step {saved_at['step']:,} is in {out}" if saved_at["step"] else
                f"no checkpoint yet (the first comes at step {min(args.eval_every, args.steps):,})")
        if _JOB.get("cache_dir"):
            kept += f", the finished stages are cached in {_JOB['cache_dir']}"
        raise stopped(f"in {title} at step {step:,} of {args.steps:,}", kept) from None
    unlock(out / ".lock")  # the run is done: another process may --resume it (a finished run rewrites results)
    if results.get("failed"):
        raise SystemExit(results["failed"])
    return results


# ---------------------------------------------------------------- a (lam, xi) grid of runs (dvdf.py, v2a.py)
def grid_level(args) -> str:
    """The folder of a (lam, xi) grid under default_out: "lam0.7-1_xi0.5" for --lam 0.7 1 --xi 0.5."""
    return f"lam{'-'.join(f'{v:g}' for v in args.lam)}_xi{'-'.join(f'{v:g}' for v in args.xi)}"


def settings_line(entry: dict, label: str = "score") -> str:
    """Each setting's mean score +- std over seeds in an evaluations row, for the log."""
    return ", ".join(f"lam {setting['lam']:g} xi {setting['xi']:g} {label} {setting['score_mean']:.1f} +- "
                     f"{setting['score_std']:.1f}" for setting in entry["by_setting"])


def make_grid_evaluate(args, policy, settings: list, seeds: list[int], ref_scores: tuple, filter_stats: Callable):
    """evaluate(runner, step, (losses, sums)) -> the evaluations row of results.json: one evaluation per (lam, xi)
    setting (the runs' actors are runner.state.actor.params, settings outermost), in which seed k plays the episodes
    of a 1-seed run with seed + k (the same in every setting), and filter_stats(sums, num_steps), the filter's
    diagnostics of the chunk of steps since the last evaluation (envs.diagnostics.filter_diagnostics)."""

    def evaluate_grid(runner, step: int, metrics) -> dict:
        losses, sums = metrics
        returns, scores = [], []
        for index in range(len(settings)):
            actor_params = jax.tree.map(lambda x: x[index * len(seeds):(index + 1) * len(seeds)],
                                        runner.state.actor.params)
            result = evaluate(policy, actor_params, args.target, num_episodes=args.eval_episodes,
                              seed=args.seed + step, ref_scores=ref_scores, physics=args.physics)
            returns.append(result.mean_return)
            scores.append(result.normalized_score)
        chunk_steps = step - (step - 1) // args.eval_every * args.eval_every  # an evaluation ends every chunk
        return grid_evaluation_entry(step, np.concatenate(returns), np.concatenate(scores), settings, losses,
                                     filter_stats(sums, chunk_steps))

    return evaluate_grid


def train_grid(args, out: Path, saved: dict | None, *, algo: str, stage: int, grid: list, settings: list, init,
               train, inputs: tuple, policy, ref_scores: tuple, filter_stats: Callable, report: Callable, header: dict,
               timing: dict) -> dict:
    """train_loop over every run of a (lam, xi) grid at once, the last stage (number `stage`) of dvdf.py and v2a.py.

    `grid` holds one row per run ({"lam", "xi", "seed", ...}, settings outermost), whose "seed" makes the run's key;
    train(runner, *inputs, num_steps) -> (runner, (losses, filter sums)), every input shared by the runs but the
    last (the runs' traced hyperparameters); evaluated by make_grid_evaluate. results.json gets "grid" and
    "settings" ([{"lam", "xi"}]) before `header`."""
    return train_loop(
        args, out, saved, algo=algo, title=f"stage {stage}/{stage}: {algo} {args.target} x{len(grid)}", init=init,
        keys=jnp.stack([jax.random.PRNGKey(run["seed"]) for run in grid]), train=train, inputs=inputs,
        in_axes=(None,) * (len(inputs) - 1) + (0,),
        evaluate=make_grid_evaluate(args, policy, settings, [args.seed + k for k in range(args.num_seeds)],
                                    ref_scores, filter_stats),
        report=report, losses_of=lambda metrics: metrics[0],
        header={"grid": grid, "settings": [{"lam": lam, "xi": xi} for lam, xi in settings], **header}, timing=timing)


# ---------------------------------------------------------------- cached pre-training stages
class CorruptArtifact(SystemExit):
    """An artefact or cache entry that cannot be read: one sentence for a user's artefact; a cache entry is set
    aside and trained again."""


def set_aside(path: Path) -> Path:
    """Rename a corrupt file to <name>.corrupt-<time> beside it (never delete what may be a user's) and say so."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    print(f"note: {path} could not be read (truncated or corrupt); it is kept as {aside.name} and made again.",
          flush=True)
    return aside


def read_artifact(path: str, kind: str, flag: str, obs_dim: int, act_dim: int) -> tuple[dict, dict]:
    """(the first seed's parameters, the artefact's description) of a stage's artefact, or one clear exit."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{kind}.msgpack"
    info_path = path.with_suffix(".json")
    if not path.is_file() or not info_path.is_file():
        raise SystemExit(f"{flag} {path} is not an artefact: give the {kind}.msgpack (with its {kind}.json beside it) "
                         f"that algos/{STAGE_SCRIPTS.get(kind, kind)}.py wrote.")
    try:
        info = json.loads(info_path.read_text())
        params = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # a truncated or overwritten file
        raise CorruptArtifact(f"{flag} {path} cannot be read ({type(error).__name__}): it or {info_path.name} is "
                              f"truncated or corrupt; train it again with algos/{STAGE_SCRIPTS.get(kind, kind)}.py "
                              f"or give another artefact.") from None
    if info.get("kind") != kind:
        raise SystemExit(f"{flag} {path} holds a {info.get('kind')!r} artefact, not a {kind!r} one.")
    if (info.get("obs_dim"), info.get("act_dim")) != (obs_dim, act_dim):
        raise SystemExit(f"{flag} {path} was trained on observation/action sizes {info.get('obs_dim')}/"
                         f"{info.get('act_dim')}, but the datasets here have {obs_dim}/{act_dim}.")
    if not info.get("finished", False):
        print(f"note: {flag} {path} is from step {info.get('step')} of {info.get('steps')}; its training did not "
              f"finish.")
    return jax.tree.map(lambda x: x[0], params), info | {"path": str(path)}


def stage_path(cache_dir: str, kind: str, info: dict) -> Path:
    """Where a stage of this description is cached: <cache_dir>/<kind>-<cache_key(info)>.msgpack."""
    return Path(cache_dir) / f"{kind}-{cache_key(info)}.msgpack"


def cached_stage(cache_dir: str, kind: str, info: dict, obs_dim: int, act_dim: int):
    """(params, info) of the finished stage of this description in the cache, or None: then this process holds the
    entry's lock (<kind>-<sha>.lock; a second run that needs the same stage waits for it, then reads the cache)
    until save_stage caches what it trained. A corrupt entry is set aside and trained again."""
    path = stage_path(cache_dir, kind, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock(path.with_suffix(".lock"), f"the cached {kind} stage", wait=True)
    if path.is_file() and path.with_suffix(".json").is_file():
        try:
            params, saved = read_artifact(str(path), kind, f"the cached {kind} stage", obs_dim, act_dim)
            unlock(path.with_suffix(".lock"))
            stage_finished(kind)
            return params, saved | {"origin": "cache"}
        except CorruptArtifact:
            set_aside(path), set_aside(path.with_suffix(".json"))
    return None


def save_stage(path: Path, partial_path: Path, artifact: dict, info: dict) -> tuple[dict, dict]:
    """Cache a finished stage (artefact, then its description, then drop the partial file); its first-seed params."""
    write_atomic(path, serialization.msgpack_serialize(artifact))
    write_atomic(path.with_suffix(".json"), json_bytes(info))
    partial_path.unlink(missing_ok=True)
    unlock(path.with_suffix(".lock"))
    return jax.tree.map(lambda x: x[0], artifact), info | {"path": str(path), "origin": "trained"}


def stage_chunk(remaining: int, seconds_per_step: Optional[float]) -> int:
    """The steps to run before the next save: the largest of STAGE_CHUNKS expected to take at most
    STAGE_SAVE_SECONDS at the measured speed (the smallest while the speed is unknown or slow), and at most
    `remaining`; a remainder below the smallest size runs as one chunk. Sizes from one short list keep compilations
    to a handful."""
    size = STAGE_CHUNKS[0]
    if seconds_per_step is not None:
        size = max([size] + [n for n in STAGE_CHUNKS if n * seconds_per_step <= STAGE_SAVE_SECONDS])
    fitting = [n for n in STAGE_CHUNKS if n <= min(size, remaining)]
    return max(fitting) if fitting else remaining


def run_stage(title: str, path: Path, runner, train, in_axes: tuple, inputs: tuple, steps: int,
              value_bound: Optional[float] = None, advice: str = "try a smaller --lr"):
    """Train a pre-training stage for `steps` steps in chunks (stage_chunk) with a progress bar.

    train(runner, *inputs, num_steps) -> (runner, metrics) is the stage's train for one seed, run vmapped with
    in_axes over a seed axis of 1, as the stage's own script runs it. After every chunk the runner is saved to
    <path>.partial.msgpack (the path is keyed by all the stage depends on), so an interrupted stage resumes there.
    The first chunk is STAGE_CHUNKS[0] steps; later ones are sized to the measured speed, so a slow stage (the V2A
    encoder on a CPU runs a few steps per second) still reports and saves about every minute. The chunking does not
    change the result: a scan of a + b steps equals a scan of a then one of b. A chunk whose metrics diverge
    (`divergence`, with `value_bound` for a value stage) stops the run with one sentence and is not saved.
    """
    partial_path = path.with_name(path.stem + ".partial.msgpack")
    step = 0
    if partial_path.exists():
        try:
            saved = serialization.msgpack_restore(partial_path.read_bytes())
            runner, step = serialization.from_state_dict(runner, saved["runner"]), int(saved["step"])
            print(f"{title}: resuming from step {step} ({partial_path})")
        except Exception:  # a truncated or overwritten partial file: the stage starts again
            set_aside(partial_path)
    compiled, metrics, seconds_per_step = {}, {}, None
    progress = Progress(title, steps, step, name=path.name.rsplit("-", 1)[0])
    try:
        while step < steps:
            num_steps = stage_chunk(steps - step, seconds_per_step)
            if num_steps not in compiled:
                chunk = jax.jit(jax.vmap(partial(train, num_steps=num_steps), in_axes=in_axes))
                compiled[num_steps] = chunk.lower(runner, *inputs).compile()
            start = time.perf_counter()
            runner, metrics = progress.wait(compiled[num_steps](runner, *inputs), num_steps)
            seconds_per_step = (time.perf_counter() - start) / num_steps
            diverged = divergence(jax.device_get(metrics), value_bound)
            if diverged:  # the partial file keeps the last sound chunk; nothing is cached
                raise SystemExit(f"{title} diverged in steps {step}-{step + num_steps} ({diverged}); nothing of it is "
                                 f"cached: {advice}.")
            step += num_steps
            write_atomic(partial_path, serialization.msgpack_serialize(
                {"runner": serialization.to_state_dict(jax.device_get(runner)), "step": step}))
            progress.advance(num_steps, seconds_per_step * num_steps,
                             ", ".join(f"{name}={float(np.mean(value)):.3g}" for name, value in metrics.items()))
        progress.close()
    except KeyboardInterrupt:
        progress.close()
        kept = f"its step {step:,} is saved in {partial_path}" if step else "no step of it was saved yet"
        raise stopped(f"in {title} at step {step:,} of {steps:,}",
                      f"{kept} (the finished stages are cached in {path.parent})") from None
    return runner, {name: float(np.mean(value)) for name, value in metrics.items()}, partial_path
