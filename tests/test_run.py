"""The run harness of envs/run.py: atomic strict-JSON files, the flag checks every script shares, open_run and
--resume, the chunked training loop (checkpoint, results, resume, divergence guard), on a tiny hand-checkable train
function; the cached-stage helpers are exercised through dvdf.py and v2a.py in their own tests; the start block,
Ctrl-C and the default --out, on the scripts themselves."""
import dataclasses
import errno
import importlib.util
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from flax import serialization

from envs import run, subsample
from synthetic import write_d4rl

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- files
def test_write_atomic_takes_bytes_text_or_a_writer_and_leaves_no_temporary_file(tmp_path):
    run.write_atomic(tmp_path / "a.bin", b"\x00\x01")
    run.write_atomic(tmp_path / "b.txt", "text")
    run.write_atomic(tmp_path / "c.bin", lambda f: f.write(b"written"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "b.txt").read_text() == "text"
    assert (tmp_path / "c.bin").read_bytes() == b"written"

    def fails(f):
        f.write(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        run.write_atomic(tmp_path / "b.txt", fails)
    assert (tmp_path / "b.txt").read_text() == "text"  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.bin"]


def test_results_are_strict_json_with_null_for_non_finite_numbers():
    value = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, "x"), "e": None}
    assert run.finite_json(value) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"], "e": None}
    text = run.json_bytes(value).decode()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"], "e": None}


def test_fingerprint_and_cache_key_name_exact_contents():
    a = (np.arange(4, dtype=np.float32), np.ones(2, dtype=np.float32))
    assert run.fingerprint(a) == run.fingerprint((a[0].copy(), a[1].copy())) and len(run.fingerprint(a)) == 16
    assert run.fingerprint(a) != run.fingerprint((a[0] + 1, a[1]))
    assert run.cache_key({"x": 1, "y": [2]}) == run.cache_key({"y": [2], "x": 1})  # key order does not matter
    assert run.cache_key({"x": 1}) != run.cache_key({"x": 2})


# ---------------------------------------------------------------- flags and folders
@dataclasses.dataclass
class Args:
    steps: int = 30
    eval_every: int = 10
    seed: int = 0
    num_seeds: int = 2
    lr: float = 0.1
    increment: float = 1.0
    out: Optional[str] = None
    resume: bool = False


def test_common_flag_checks_name_the_flag_and_its_range():
    run.check_common_flags(Args())
    for change, message in [({"steps": 0}, "--steps must be at least 1, got 0."),
                            ({"eval_every": -1}, "--eval-every must be at least 1, got -1."),
                            ({"seed": -2}, "--seed must be 0 or more, got -2."),
                            ({"lr": 0.0}, "--lr must be positive, got 0.0.")]:
        with pytest.raises(SystemExit) as error:
            run.check_common_flags(dataclasses.replace(Args(), **change))
        assert str(error.value) == message

    @dataclasses.dataclass
    class WithDomain:
        source: str = "halfcheetah-kinematc"

    with pytest.raises(SystemExit, match="--source"):
        run.check_common_flags(WithDomain())


@dataclasses.dataclass
class AlgorithmArgs:  # the flags that two or more algos/ scripts share, at valid values
    target_fraction: float = 0.1
    target_size: int | None = None
    expectile: float = 0.7
    temperature: float = 3.0
    max_weight: float = 100.0
    alpha: float | None = None
    scorer_steps: int = 10
    scorer_batch_size: int = 2
    repr_dim: int = 4
    holdout_fraction: float = 0.1
    num_samples: int = 1
    ot_chunk: int = 5
    ot_iterations: int = 3
    ot_target_size: int | None = None
    ot_epsilon: float | None = None
    reg_weight: float | None = None
    cvae_steps: int = 1
    cvae_batch_size: int = 1
    lam: tuple = (0.0, 1.0)
    xi: tuple = (0.5,)
    batch_size: int = 8
    sql_steps: int = 1
    sql_batch_size: int = 1
    ot_threshold: float = 1e-9
    cvae_lr: float = 1e-3
    cvae_kl_weight: float = 0.5
    beta: float = 0.4


def test_flags_the_scripts_share_are_checked_once_with_their_sentences():
    run.check_common_flags(AlgorithmArgs())
    run.check_common_flags(AlgorithmArgs(target_size=5, alpha=0.1, ot_target_size=3, ot_epsilon=0.05, reg_weight=0.0))
    for change, message in [
            ({"target_fraction": 1.5}, "--target-fraction must be in (0, 1], got 1.5."),
            ({"target_fraction": 0.0}, "--target-fraction must be in (0, 1], got 0.0."),
            ({"target_size": 0}, "--target-size must be a positive number of transitions, got 0."),
            ({"expectile": 1.0}, "--expectile must be in (0, 1), got 1.0."),
            ({"temperature": -1.0}, "--temperature must be 0 or more, got -1.0."),
            ({"max_weight": 0.0}, "--max-weight must be positive, got 0.0."),
            ({"alpha": 0.0}, "--alpha must be positive, got 0.0."),
            ({"scorer_steps": 0}, "--scorer-steps must be at least 1, got 0."),
            ({"repr_dim": 0}, "--repr-dim must be at least 1, got 0."),
            ({"num_samples": 0}, "--num-samples must be at least 1, got 0."),
            ({"ot_chunk": 0}, "--ot-chunk must be at least 1, got 0."),
            ({"cvae_batch_size": 0}, "--cvae-batch-size must be at least 1, got 0."),
            ({"scorer_batch_size": 1},
             "--scorer-batch-size must be at least 2 (one positive and one negative per row), got 1."),
            ({"holdout_fraction": 0.6}, "--holdout-fraction must be in (0, 0.5], got 0.6."),
            ({"reg_weight": -0.1}, "--reg-weight must be 0 or more, got -0.1."),
            ({"ot_target_size": 0}, "--ot-target-size must be a positive number of transitions, got 0."),
            ({"ot_epsilon": 0.0}, "--ot-epsilon must be positive, got 0.0."),
            ({"lam": (1.5,)}, "--lam must be one or more values in [0, 1], got [1.5]."),
            ({"lam": ()}, "--lam must be one or more values in [0, 1], got []."),
            ({"xi": (0.0,)}, "--xi must be one or more values in (0, 1], got [0.0]."),
            ({"xi": (0.5, 0.5)}, "--lam and --xi must not repeat a value, got [0.0, 1.0] and [0.5, 0.5]."),
            ({"batch_size": 7}, "--batch-size must be even and at least 2 (half source, half target), got 7."),
            ({"batch_size": 2, "xi": (0.5,)}, "--xi 0.5 keeps no source sample of 1; raise --xi or --batch-size."),
            ({"sql_steps": 0}, "--sql-steps must be at least 1, got 0."),
            ({"sql_batch_size": 0}, "--sql-batch-size must be at least 1, got 0."),
            ({"ot_threshold": 0.0}, "--ot-threshold must be positive, got 0.0."),
            ({"cvae_lr": 0.0}, "--cvae-lr must be positive and --cvae-kl-weight 0 or more, got 0.0 and 0.5."),
            ({"cvae_kl_weight": -1.0},
             "--cvae-lr must be positive and --cvae-kl-weight 0 or more, got 0.001 and -1.0."),
            ({"beta": 0.0}, "--beta must be positive, got 0.0."),
    ]:
        with pytest.raises(SystemExit) as error:
            run.check_common_flags(dataclasses.replace(AlgorithmArgs(), **change))
        assert str(error.value) == message, change


def test_a_variant_flag_hands_the_command_to_the_variants_own_script(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "load_script", lambda name: type("Script", (), {
        "main": staticmethod(lambda argv: calls.append((name, argv)) or name)}))
    scripts, flag = {"ot": "dvdf_otdf"}, "--dynamics-score"
    assert run.variant_script(["--lam", "0.7"], flag, scripts, "contrastive") == (None, ["--lam", "0.7"])
    for argv in (["--lam", "0.7", "--dynamics-score", "contrastive"], ["--dynamics_score=contrastive", "--lam", "0.7"]):
        assert run.variant_script(argv, flag, scripts, "contrastive") == (None, ["--lam", "0.7"])  # default: dropped
    for argv in (["--dynamics-score", "ot", "--lam", "0.7"], ["--lam", "0.7", "--dynamics-score=ot"]):
        variant, rest = run.variant_script(argv, flag, scripts, "contrastive")
        assert rest == ["--lam", "0.7"] and variant() == "dvdf_otdf" and calls[-1] == ("dvdf_otdf", ["--lam", "0.7"])
    monkeypatch.setattr(sys, "argv", ["algos/dvdf.py", "--dynamics-score", "ot"])  # argv None: the command line's
    variant, rest = run.variant_script(None, flag, scripts, "contrastive")
    assert rest == [] and variant() == "dvdf_otdf"
    for argv, shown in ((["--dynamics-score", "sinkhorn"], "sinkhorn"), (["--dynamics-score"], "nothing")):
        with pytest.raises(SystemExit) as error:
            run.variant_script(argv, flag, scripts, "contrastive")
        assert str(error.value) == f"--dynamics-score must be one of contrastive, ot, got {shown}."


def test_the_cross_domain_scripts_take_the_shared_flags_first_with_their_defaults():
    shared = [field.name for field in dataclasses.fields(run.CrossDomainArgs)]
    assert shared[:4] == ["seed", "num_seeds", "out", "resume"] and shared[-3:] == ["steps", "eval_every",
                                                                                     "eval_episodes"]
    for name in ("iql", "dvdf", "dvdf_otdf", "v2a", "v2a_otdf", "otdf", "dara", "bosa"):
        spec = importlib.util.spec_from_file_location(f"args_of_{name}", ROOT / "algos" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert issubclass(module.Args, run.CrossDomainArgs), name
        assert [field.name for field in dataclasses.fields(module.Args)][:len(shared)] == shared, name
        args = tyro.cli(module.Args, args=["--quality", "expert", "--target-size", "5000"])
        assert (args.quality, args.target_size, args.steps, args.eval_episodes) == ("expert", 5000, 1_000_000, 10)


@dataclasses.dataclass
class DataArgs:
    source_dataset: str
    target_dataset: str
    source: str = "hopper"
    target: str = "hopper-gravity-0.5"
    quality: str = "medium"
    physics: str = "papers"
    target_fraction: float = 0.1
    target_size: int | None = None


def test_load_source_target_draws_one_subsample_per_seed_and_checks_the_sizes(tmp_path):
    rng = np.random.default_rng(0)
    source_file, target_file = (write_d4rl(tmp_path / f"{name}.hdf5", rng, 500, 50, obs_dim=11, act_dim=3)
                                for name in ("source", "target"))
    args = DataArgs(source_file, target_file, target_size=40)
    source, target_full, targets = run.load_source_target(args, [3, 4])
    assert (source.size, target_full.size, [t.size for t in targets]) == (500, 500, [40, 40])
    for target, seed in zip(targets, [3, 4]):  # each seed its own subsample, the same one every time
        np.testing.assert_array_equal(target.observations, subsample(target_full, count=40, seed=seed).observations)
    assert not np.array_equal(targets[0].observations, targets[1].observations)
    fraction = run.load_source_target(dataclasses.replace(args, target_size=None, target_fraction=0.2), [0])[2]
    assert fraction[0].size == 100
    assert run.load_source_target(args, [], with_source=False)[0] is None  # iql.py --data target
    source_only = run.load_source_target(args, [3], with_target=False)  # v2a.py --representation-only
    assert source_only[0].size == 500 and source_only[1:] == (None, [])

    with pytest.raises(SystemExit) as error:
        run.load_source_target(dataclasses.replace(args, target_size=501), [0])
    assert str(error.value) == "--target-size must be at most the target dataset's 500 transitions, got 501."
    cheetah = write_d4rl(tmp_path / "cheetah.hdf5", rng, 500, 50)  # HalfCheetah's 17/6 sizes
    with pytest.raises(SystemExit) as error:
        run.load_source_target(DataArgs(cheetah, target_file, source="halfcheetah"), [0])
    assert str(error.value) == ("The source dataset has observation/action sizes 17/6 but the target has 11/3; "
                                "pick domains of the same task.")


def test_the_grid_folder_log_lines_and_datasets_line():
    args = AlgorithmArgs(lam=(0.7, 1.0), xi=(0.5,))
    assert run.grid_level(args) == "lam0.7-1_xi0.5"
    entry = {"by_setting": [{"lam": 0.7, "xi": 0.5, "score_mean": 41.26, "score_std": 2.04},
                            {"lam": 1.0, "xi": 0.5, "score_mean": 39.0, "score_std": 0.0}]}
    assert run.settings_line(entry, "final score") == ("lam 0.7 xi 0.5 final score 41.3 +- 2.0, "
                                                       "lam 1 xi 0.5 final score 39.0 +- 0.0")
    named = DataArgs("data/source.hdf5", None, target="hopper-gravity-0.5")
    assert run.datasets_line(named) == "data/source.hdf5 -> hopper-gravity-0.5 (medium)"
    assert run.datasets_line(dataclasses.replace(named, source_dataset=None, target_dataset="t")) == "hopper -> t"


def test_open_run_refuses_to_overwrite_and_resume_needs_the_same_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.open_run(Args(out=str(out)), "unused") == (out, None)
    # --resume before any checkpoint (a run cut off in a pre-training stage): it starts, and says so
    assert run.open_run(Args(out=str(out), resume=True), "unused") == (out, None)
    assert "--resume found no checkpoint" in capsys.readouterr().out
    (out / "checkpoint.msgpack").write_bytes(serialization.msgpack_serialize(
        {"runner": {}, "step": 10, "evaluations": "[]", "flags": json.dumps(run.run_flags(Args()))}))
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        run.open_run(Args(out=str(out)), "unused")
    with pytest.raises(SystemExit, match="--lr is 0.2 here and 0.1 in"):
        run.open_run(Args(out=str(out), resume=True, lr=0.2), "unused")
    assert run.open_run(Args(out=str(out), resume=True), "unused")[1]["step"] == 10
    assert run.run_flags(Args(out="x", resume=True)) == run.run_flags(Args())  # --out and --resume define no run


def test_out_naming_a_file_and_a_corrupt_checkpoint_end_in_one_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^--out .*file is a file, not a folder"):
        run.open_run(Args(out=str(tmp_path / "file")), "unused")
    for content in (b"", b"\x93\x01garbage", serialization.msgpack_serialize({"step": 3})):  # empty, random, keyless
        out = tmp_path / f"run{len(content)}"
        out.mkdir()
        (out / "checkpoint.msgpack").write_bytes(content)
        with pytest.raises(SystemExit) as error:
            run.open_run(Args(out=str(out), resume=True), "unused")
        assert str(error.value).startswith(f"{out / 'checkpoint.msgpack'} cannot be read")
        assert "Move it aside to start this run again" in str(error.value)


def test_a_run_folder_is_locked_against_a_second_process(tmp_path):
    run.open_run(Args(out=str(tmp_path / "run")), "unused")  # this process holds the lock now
    second = subprocess.run([sys.executable, "-c", "import sys; from envs import run; "
                             f"run.lock(__import__('pathlib').Path({str(tmp_path / 'run' / '.lock')!r}), 'the run')"],
                            cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 1 and second.stderr.strip().startswith("Another process is writing the run (")
    assert "Traceback" not in second.stderr
    run.open_run(Args(out=str(tmp_path / "run"), resume=True), "unused")  # this process may open it again


def test_a_full_disk_ends_in_one_sentence_and_leaves_no_partial_file(tmp_path):
    (tmp_path / "results.json").write_text("{}")

    def full(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as error:
        run.write_atomic(tmp_path / "results.json", full)
    assert str(error.value).startswith(f"The disk of {tmp_path} is full: results.json was not written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert (tmp_path / "results.json").read_text() == "{}"


def test_a_corrupt_cache_entry_is_set_aside_and_a_corrupt_artefact_named(tmp_path, capsys):
    info = {"kind": "sql", "obs_dim": 3, "act_dim": 1, "steps": 5}
    path = run.stage_path(str(tmp_path), "sql", info)
    tmp_path.mkdir(exist_ok=True)
    path.write_bytes(b"\x00truncated")
    path.with_suffix(".json").write_text(json.dumps(info | {"finished": True}))
    with pytest.raises(SystemExit, match=r"cannot be read \(.*\): it or .*json is truncated or corrupt; train it "
                                         r"again with algos/sql_pretrain.py"):
        run.read_artifact(str(path), "sql", "--sql-artifact", 3, 1)
    assert run.cached_stage(str(tmp_path), "sql", info, 3, 1) is None  # to be trained again
    assert not path.exists() and len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1  # kept, renamed
    assert "could not be read (truncated or corrupt)" in capsys.readouterr().out
    artifact = {"value": {"w": np.ones((1, 2), np.float32)}}
    params, saved = run.save_stage(path, tmp_path / "none.partial.msgpack", artifact, info | {"finished": True})
    assert run.cached_stage(str(tmp_path), "sql", info, 3, 1)[1]["origin"] == "cache"
    np.testing.assert_array_equal(params["value"]["w"], np.ones(2))


# ---------------------------------------------------------------- the training loop
def init(key):
    return {"w": jnp.zeros(3), "key": key}


def train(runner, increment, *, num_steps):
    """w grows by `increment` a step; the chunk's loss is the mean over its steps of sum(w) before the step."""
    def step(runner, _):
        return {"w": runner["w"] + increment, "key": runner["key"]}, jnp.sum(runner["w"])

    runner, loss = run.scan_chunk(step, runner, num_steps)
    return runner, {"critic_loss": loss}


def loop(args: Args, out: Path, saved=None, report=None, evaluate=None):
    seeds = [args.seed + k for k in range(args.num_seeds)]
    return run.train_loop(
        args, out, saved, algo="fake", title="fake", init=init, keys=jnp.stack([jax.random.PRNGKey(s) for s in seeds]),
        train=train, inputs=(jnp.float32(args.increment),), in_axes=(None,),
        evaluate=evaluate or (lambda runner, step, metrics: {"step": step, "w": np.asarray(runner["w"][:, 0]).tolist(),
                                                             "nan": float("nan"), "losses": run.losses_entry(metrics)}),
        report=report or (lambda step, entry, metrics: ("", f"step {step}")), header={"data": {"n": 1}})


def test_the_loop_trains_every_run_checkpoints_and_writes_strict_results(tmp_path):
    results = loop(Args(), tmp_path)
    assert results["finished"] and results["step"] == 30 and results["seeds"] == [0, 1]
    assert [entry["w"] for entry in results["evaluations"]] == [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]
    # chunk 2 (steps 11-20): sum(w) before each step is 3 * (10 .. 19), mean 3 * 14.5
    assert results["evaluations"][1]["losses"]["critic_loss"] == [43.5, 43.5]
    assert results["final"] == {"step": 30, "w": [30.0, 30.0], "nan": None}  # without the losses
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results and written["data"] == {"n": 1} and written["timing"]["timed_steps"] == 30
    assert list(written)[:5] == ["algo", "finished", "step", "args", "seeds"]
    saved = serialization.msgpack_restore((tmp_path / "checkpoint.msgpack").read_bytes())
    assert int(saved["step"]) == 30
    np.testing.assert_array_equal(saved["runner"]["w"], np.full((2, 3), 30.0))


def test_scan_chunk_gives_the_means_or_sums_of_its_steps_metrics():
    def step(runner, _):  # metrics of a step: the counter before it, and a pair (counter, 1)
        return runner + 1.0, {"before": runner, "pair": (runner, jnp.int32(1))}

    runner, means = run.scan_chunk(step, jnp.float32(2.0), 4)
    assert float(runner) == 6.0 and float(means["before"]) == 3.5  # (2 + 3 + 4 + 5) / 4
    runner, sums = run.scan_chunk(step, jnp.float32(2.0), 4, means=False)
    assert float(sums["pair"][0]) == 14.0 and int(sums["pair"][1]) == 4 and sums["pair"][1].dtype == jnp.int32


@pytest.mark.parametrize("overlap", [None, True])
def test_the_loop_evaluates_host_copies_and_spaces_slow_checkpoints(tmp_path, monkeypatch, overlap):
    """Writing a checkpoint is "slow" here (any time at all), so after the first chunk's the next comes only at the
    end: results.json of step 20 names the checkpoint of step 10. Evaluation gets the runner as host arrays, with the
    host's CPU as the default device; on this CPU it takes turns with training (None), and overlapping it with the
    next chunk (as on an accelerator) changes nothing in the results."""
    monkeypatch.setattr(run, "CHEAP_CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(run, "CHECKPOINT_SHARE", 1e-12)
    monkeypatch.setattr(run, "OVERLAP_EVALUATION", overlap)
    seen, checkpoints = [], []

    def evaluate(runner, step, metrics):
        seen.append((type(runner["w"]), jax.config.jax_default_device))
        return {"step": step, "w": runner["w"][:, 0].tolist(), "losses": run.losses_entry(metrics)}

    def report(step, entry, metrics):
        checkpoints.append(json.loads((tmp_path / "results.json").read_text())["timing"]["checkpoint_step"])
        return "", ""

    results = loop(Args(), tmp_path, report=report, evaluate=evaluate)
    assert checkpoints == [10, 10, 30] and seen == [(np.ndarray, run.host_device())] * 3
    assert results["timing"]["evaluation_overlapped"] is bool(overlap)
    assert [entry["w"] for entry in results["evaluations"]] == [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]
    assert int(serialization.msgpack_restore((tmp_path / "checkpoint.msgpack").read_bytes())["step"]) == 30


@pytest.mark.parametrize("slow_checkpoints", [False, True])
def test_an_interrupted_loop_resumes_from_its_checkpoint(tmp_path, monkeypatch, slow_checkpoints):
    """With slow checkpoints the cadence skipped the one of step 20: Ctrl-C writes it before stopping."""
    if slow_checkpoints:
        monkeypatch.setattr(run, "CHEAP_CHECKPOINT_SECONDS", 0.0)
        monkeypatch.setattr(run, "CHECKPOINT_SHARE", 1e-12)

    def interrupt(step, entry, metrics):
        if step == 20:
            raise KeyboardInterrupt
        return "", ""

    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C in fake at step 20 of 30: the checkpoint of step 20 is"):
        loop(Args(out=str(tmp_path)), tmp_path, report=interrupt)
    assert json.loads((tmp_path / "results.json").read_text())["finished"] is False
    saved = serialization.msgpack_restore((tmp_path / "checkpoint.msgpack").read_bytes())
    assert int(saved["step"]) == 20 and [e["step"] for e in json.loads(saved["evaluations"])] == [10, 20]
    out, saved = run.open_run(Args(out=str(tmp_path), resume=True), "unused")
    results = loop(Args(out=str(tmp_path), resume=True), out, saved)
    assert [entry["step"] for entry in results["evaluations"]] == [10, 20, 30]
    assert results["final"]["w"] == [30.0, 30.0] and results["timing"]["resumed_from_step"] == 20


def test_resume_on_other_data_stops_with_one_sentence(tmp_path):
    """The checkpoint records the fingerprint of the training inputs: a dataset that changed since the run started
    (here the increment every step adds) is refused, not trained on silently."""
    def interrupt(step, entry, metrics):
        if step == 20:
            raise KeyboardInterrupt
        return "", ""

    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        loop(Args(out=str(tmp_path)), tmp_path, report=interrupt)
    out, saved = run.open_run(Args(out=str(tmp_path), resume=True), "unused")
    with pytest.raises(SystemExit) as error:
        loop(Args(out=str(tmp_path), resume=True, increment=2.0), out, saved)
    text = str(error.value)
    assert text.startswith("--resume needs the data the interrupted run trained on, but its inputs here (datasets, "
                           "target subsamples, frozen stages) have fingerprint ")
    assert f"in {tmp_path / 'checkpoint.msgpack'}: a dataset changed since the run started" in text
    assert "\n" not in text and text.endswith("in another --out.")
    assert loop(Args(out=str(tmp_path), resume=True), out, saved)["finished"]  # the same data resumes


def test_a_run_with_a_non_finite_evaluation_is_not_finished(tmp_path, capsys):
    """A NaN score (here of run 1 at step 20) is written as null, the run trains to the end and is saved, but it
    never says finished: it ends with one sentence, and --resume of it says the same again."""
    def evaluate(runner, step, metrics):
        scores = [1.0, float("nan") if step == 20 else 2.0]
        return {"step": step, "returns": [10.0, 20.0], "scores": scores, "losses": run.losses_entry(metrics)}

    with pytest.raises(SystemExit) as error:
        loop(Args(out=str(tmp_path)), tmp_path, evaluate=evaluate)
    assert str(error.value) == (
        f"FAKE trained all 30 steps, but the score of run 1 at step 20 is not finite (a NaN or infinite return, or a "
        f"score of equal or missing reference returns), so results.json in {tmp_path} says it did not finish; check "
        f"the datasets and the reference returns, then run it again in another --out.")
    assert "note: the score of run 1 at step 20 is not finite; the run goes on" in capsys.readouterr().out

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads((tmp_path / "results.json").read_text(), parse_constant=strict)
    assert written["finished"] is False and written["step"] == 30 and written["final"] is None
    assert written["evaluations"][1]["scores"] == [1.0, None] and written["failed"] == str(error.value)
    out, saved = run.open_run(Args(out=str(tmp_path), resume=True), "unused")
    with pytest.raises(SystemExit, match="^FAKE trained all 30 steps, but the score of run 1 at step 20"):
        loop(Args(out=str(tmp_path), resume=True), out, saved, evaluate=evaluate)
    assert json.loads((tmp_path / "results.json").read_text())["finished"] is False


def test_resume_of_a_finished_run_rewrites_a_truncated_results_file(tmp_path):
    results = loop(Args(out=str(tmp_path)), tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(results)[:100])
    out, saved = run.open_run(Args(out=str(tmp_path), resume=True), "unused")
    again = loop(Args(out=str(tmp_path), resume=True), out, saved)
    assert again["finished"] and again["evaluations"] == results["evaluations"] and again["timing"] is None
    assert json.loads((tmp_path / "results.json").read_text()) == again


def test_a_diverging_loop_stops_with_one_sentence_and_keeps_the_last_sound_checkpoint(tmp_path):
    # chunk means 13.5 d and 43.5 d: with d = 5e8 the second chunk's loss (2.175e10) passes LOSS_LIMIT (1e10)
    with pytest.raises(SystemExit) as error:
        loop(Args(increment=5e8), tmp_path)
    text = str(error.value)
    assert text.startswith("FAKE diverged in the 10-20 chunk (critic_loss reached 2.17e+10, beyond 1e+10)")
    assert f"the checkpoint in {tmp_path} stays at step 10" in text and text.endswith("Try a smaller --lr.")
    assert int(serialization.msgpack_restore((tmp_path / "checkpoint.msgpack").read_bytes())["step"]) == 10
    with pytest.raises(SystemExit, match=r"FAKE diverged in the 0-10 chunk \(critic_loss is not finite\); nothing was saved"):
        loop(Args(increment=float("inf")), tmp_path / "inf")


def test_divergence_names_what_left_its_bounds():
    bound = run.value_bound_of(np.array([-2.0, 1.0]), discount=0.99)
    assert bound == pytest.approx(2000.0)
    assert run.divergence({"q_mean": np.array([150.0, -199.0]), "value_loss": np.array([1.0, 2.0])}, bound) is None
    assert run.divergence({"q_mean": np.array([10.0, -2100.0]), "value_loss": np.array([1.0])}, bound).startswith(
        "|mean Q| reached 2.1e+03, beyond 2e+03")
    assert run.divergence({"critic_loss": np.array([np.nan])}, None) == "critic_loss is not finite"


# ---------------------------------------------------------------- the start block, Ctrl-C and the default --out
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"run_test_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tyro reads the flags' docstrings through it
    spec.loader.exec_module(module)
    return module


def _hopper_data(folder: Path, *names: str) -> list[str]:
    """Tiny Hopper-shaped D4RL files: Hopper's random-policy evaluation episodes end within tens of steps."""
    rng = np.random.default_rng(0)
    return [write_d4rl(folder / f"{name}.hdf5", rng, 1000, 100, obs_dim=11, act_dim=3) for name in names]


def _printed_script() -> str:
    """This file as the start block names it: relative to the working directory where it is under it."""
    path = Path(__file__).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def test_start_block_and_ctrl_c_in_the_loop_name_the_checkpoint_and_the_command_that_continues(tmp_path, capsys):
    """The block says what runs, where, and how long (a stage with no recorded rate says so); Ctrl-C after the
    step-20 checkpoint ends in one sentence naming it and the same command line plus --resume, which continues."""
    argv = ["--steps", "30", "--out", str(tmp_path)]
    run.start_block(Args(out=str(tmp_path)), argv, tmp_path, [("fake", 30, 2)])
    block = capsys.readouterr().out.splitlines()
    assert block[0] == f"python {_printed_script()} --steps 30 --out {tmp_path}"
    assert block[1] == "  stage 1/1 fake: 30 steps x 2 runs, ~? (no recorded rate on this device)"
    assert block[2] == f"  output    {tmp_path}" and block[3].startswith("  estimate  unknown: no rate recorded")

    def interrupt(step, entry, metrics):
        if step == 20:
            raise KeyboardInterrupt
        return "", ""

    with pytest.raises(SystemExit) as error:
        loop(Args(out=str(tmp_path)), tmp_path, report=interrupt)
    assert str(error.value) == (f"Stopped by Ctrl-C in fake at step 20 of 30: the checkpoint of step 20 is in "
                                f"{tmp_path}. Continue with: python {_printed_script()} --steps 30 --out {tmp_path} "
                                f"--resume")
    out, saved = run.open_run(Args(out=str(tmp_path), resume=True), "unused")
    assert loop(Args(out=str(tmp_path), resume=True), out, saved)["finished"]
    run._JOB.clear()


def test_ctrl_c_ends_a_script_within_seconds_in_one_line_while_xla_runs_a_chunk(tmp_path):
    """A real Ctrl-C (SIGINT) while XLA runs a chunk that would take minutes: the script ends within seconds, prints
    no traceback, and its last line says what is saved and gives the exact command that continues (its --resume
    continuing from a checkpoint is the in-process test above)."""
    source, target = _hopper_data(tmp_path, "source", "target")
    out = tmp_path / "run"
    argv = ["--source", "hopper-kinematic", "--target", "hopper", "--source-dataset", source, "--target-dataset",
            target, "--steps", "100000000", "--eval-every", "50000000", "--hidden", "8", "8", "--batch-size", "16",
            "--out", str(out)]
    child = subprocess.Popen([sys.executable, "algos/iql.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: child.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while "iql merged hopper x1:" not in "".join(stderr):  # the bar: the first chunk is running
        assert child.poll() is None and time.time() < deadline, "".join(stderr)
        time.sleep(0.05)
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    sent = time.time()
    child.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(stderr)
    assert time.time() - sent < 10 and child.returncode == 130
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("Stopped by Ctrl-C in iql merged hopper x1 at step 0 of 100,000,000: no checkpoint yet "
                           "(the first comes at step 50,000,000). Continue with: python algos/iql.py ")
    assert shlex.split(last.split("Continue with: ")[1]) == ["python", "algos/iql.py", *argv, "--resume"]


def test_the_default_out_names_the_datasets_and_hashes_the_other_flags():
    dvdf = _script("dvdf")

    def folder(*flags):
        return run.default_out(tyro.cli(dvdf.Args, args=list(flags)), "dvdf", "grid", shown=("lam", "xi"))

    assert folder() == "runs/dvdf/halfcheetah-kinematic_to_halfcheetah-medium/grid/seed0"  # the papers' defaults
    assert folder("--cache-dir", "elsewhere", "--resume") == folder()  # where the files go changes no result
    v5 = "runs/dvdf/halfcheetah-kinematic_to_halfcheetah-medium-v5physics/grid/seed2"
    assert folder("--seed", "2", "--physics", "v5") == v5
    mixture = folder("--source-dataset", "crossdomain/mix/halfcheetah-kinematic-random-expert-v0")
    assert mixture.startswith("runs/dvdf/mix.halfcheetah-kinematic-random-expert-v0_to_halfcheetah-medium/grid/seed0-")
    files = folder("--source-dataset", "/data/a/medium.hdf5", "--target-dataset", "/data/hc.hdf5")
    assert files.startswith("runs/dvdf/medium_to_hc/grid/seed0-")  # no quality: no generated dataset is read
    assert files != folder("--source-dataset", "/data/b/medium.hdf5", "--target-dataset", "/data/hc.hdf5")
    steps = folder("--steps", "30000")
    assert len(steps.rsplit("-", 1)[1]) == 8 and steps != folder("--steps", "30001")
    assert folder("--steps", "30000", "--sql-steps", "30000") not in (steps, folder())


def test_two_runs_differing_only_in_the_source_dataset_get_their_own_default_folders(tmp_path, monkeypatch):
    iql = _script("iql")
    monkeypatch.chdir(tmp_path)
    source_a, source_b, target = _hopper_data(tmp_path, "source_a", "source_b", "target")
    flags = ["--source", "hopper-kinematic", "--target", "hopper", "--target-dataset", target, "--steps", "20",
             "--eval-every", "20", "--eval-episodes", "1", "--hidden", "8", "8", "--batch-size", "16"]
    for source in (source_a, source_b):
        assert iql.main(["--source-dataset", source, *flags])["finished"]  # the second does not stop on the first
    folders = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.glob("runs/iql/merged/*/seed0-*"))
    assert [folder.split("/seed0-")[0] for folder in folders] == ["runs/iql/merged/source_a_to_target",
                                                                  "runs/iql/merged/source_b_to_target"]
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):  # the same flags: the same folder
        iql.main(["--source-dataset", source_a, *flags])
    run._JOB.clear()
