"""benchmarks/sweep.py and benchmarks/report.py end to end: a two-configuration sweep of tiny IQL runs, skipped when
run again, continued with --resume when interrupted, left alone (the sweep stops) when the spec's flags changed; a
failed run does not stop the others; the printed command lines run as they are; a sweep half done is reported as
such; the report's tables hold the numbers of the results.json files (and of (lam, xi) settings and unfinished runs
worked out by hand) and its figure is a PNG; a bad spec ends with one sentence."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from synthetic import write_d4rl

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep, report = load("sweep"), load("report")

# 240 steps, an evaluation every 40: six evaluations, so "the last 5" is not "all of them"
SPEC = """
num_seeds = 2
pairs = [["halfcheetah-kinematic", "halfcheetah"]]
qualities = ["medium"]
[flags]
source_dataset = "{source}"
target_dataset = "{target}"
hidden = [16, 16]
batch_size = 32
steps = 240
eval_every = 40
eval_episodes = 1
"""
VARIANTS = """
[algos.iql-target]
script = "iql"
flags = { data = "target" }
[algos.iql-merged]
script = "iql"
flags = { data = "merged" }
"""
TASK = "halfcheetah-kinematic_to_halfcheetah-medium"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Datasets, a spec, and an environment whose JAX compilation cache the runs share (the later runs are fast)."""
    folder = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    datasets = {"source": write_d4rl(folder / "source.hdf5", rng, 2000, 100),
                "target": write_d4rl(folder / "target.hdf5", rng, 1000, 100, ref=(-300.0, 3000.0))}
    (folder / "spec.toml").write_text(SPEC.format(**datasets) + VARIANTS)
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(folder / "jax_cache"),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python`
    return {"folder": folder, "datasets": datasets, "env": env}


def run_sweep(setup, *flags, spec=None):
    spec = spec or setup["folder"] / "spec.toml"
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), str(spec), *flags],
                          capture_output=True, text=True, env=setup["env"])


@pytest.fixture(scope="module")
def swept(setup):
    out = setup["folder"] / "out"
    done = run_sweep(setup, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_sweep_runs_every_configuration(swept):
    out, stdout = swept
    for index, variant in enumerate(["iql-target", "iql-merged"], 1):
        results = json.loads((out / variant / TASK / "results.json").read_text())
        assert results["finished"] and results["args"]["data"] == variant.split("-")[1]
        assert results["seeds"] == [0, 1] and len(results["evaluations"]) == 6
        assert f"[{index}/2] {variant}/{TASK}" in stdout
        assert (out / variant / TASK / "log.txt").read_text().startswith("$ ")
    assert "2 ran, 0 skipped (finished), 0 failed" in stdout
    assert "; 1 to go, about " in stdout.split("[2/2]")[0]  # the ETA after the first run
    manifest = json.loads((out / "sweep.json").read_text())
    assert [c["folder"] for c in manifest["configurations"]] == [f"iql-target/{TASK}", f"iql-merged/{TASK}"]
    assert manifest["spec"]["num_seeds"] == 2


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(setup, swept):
    out, _ = swept
    files = [out / variant / TASK / name for variant in ("iql-target", "iql-merged")
             for name in ("results.json", "checkpoint.msgpack", "log.txt")]
    before = [path.stat().st_mtime_ns for path in files]
    again = run_sweep(setup, "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skip ") == 2 and "0 ran, 2 skipped (finished), 0 failed" in again.stdout
    # finished runs made with other flags than the spec's now: the sweep stops before anything
    manifest = (out / "sweep.json").read_text()
    changed = setup["folder"] / "changed.toml"
    changed.write_text((setup["folder"] / "spec.toml").read_text().replace("steps = 240", "steps = 280"))
    conflict = run_sweep(setup, "--out", str(out), spec=changed)
    assert conflict.returncode == 1 and conflict.stderr.count("\n") == 1
    assert "finished run with --steps 240, the spec says 280" in conflict.stderr
    assert "(2 such runs; nothing ran)" in conflict.stderr
    assert [path.stat().st_mtime_ns for path in files] == before and (out / "sweep.json").read_text() == manifest

    # a copy of the sweep whose second run looks interrupted (a checkpoint, results.json not finished)
    copy = setup["folder"] / "interrupted"
    shutil.copytree(out, copy)
    results_path = copy / "iql-merged" / TASK / "results.json"
    results_path.write_text(json.dumps(json.loads(results_path.read_text()) | {"finished": False}))
    resumed = run_sweep(setup, "--out", str(copy))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 ran, 1 skipped (finished), 0 failed" in resumed.stdout
    commands = [line for line in (copy / "iql-merged" / TASK / "log.txt").read_text().splitlines()
                if line.startswith("$ ")]
    assert len(commands) == 2 and commands[-1].endswith(" --resume")  # the log keeps both runs' output
    assert json.loads(results_path.read_text())["finished"]


def test_a_failed_run_is_reported_and_the_others_go_on(setup):
    spec = setup["folder"] / "failing.toml"
    spec.write_text(SPEC.format(**setup["datasets"]) + '[algos.broken]\nscript = "iql"\nflags = { steps = -1 }\n'
                    + '[algos.iql-target]\nscript = "iql"\nflags = { data = "target" }\n')
    out = setup["folder"] / "failing"
    done = run_sweep(setup, "--out", str(out), spec=spec)
    assert done.returncode == 1
    assert json.loads((out / "iql-target" / TASK / "results.json").read_text())["finished"]
    summary = done.stdout.split("\n\n")[-1]
    assert "1 ran, 0 skipped (finished), 1 failed" in summary
    assert f"failed: broken/{TASK}" in summary and str(out / "broken" / TASK / "log.txt") in summary
    assert "--steps must be at least 1, got -1." in summary


def test_printed_commands_run_as_they_are(setup, swept):
    out = setup["folder"] / "printed"
    printed = run_sweep(setup, "--out", str(out), "--print-commands")
    lines = printed.stdout.splitlines()
    assert printed.returncode == 0 and len(lines) == 2
    assert [path.name for path in out.iterdir()] == ["sweep.json"]  # the manifest for the report; nothing ran
    assert all(line.startswith("python algos/iql.py --source halfcheetah-kinematic") for line in lines)
    subprocess.run(lines[0], shell=True, cwd=ROOT, env=setup["env"], check=True, capture_output=True)
    results = json.loads((out / "iql-target" / TASK / "results.json").read_text())
    swept_results = json.loads((swept[0] / "iql-target" / TASK / "results.json").read_text())
    assert results["finished"]
    np.testing.assert_allclose(results["final"]["scores"], swept_results["final"]["scores"])  # the same run

    # one of the two runs done: the report says so, and names the command of the whole sweep (no --only)
    run_sweep(setup, "--out", str(out), "--only", "iql-target/*", "--print-commands")
    whole = f"python benchmarks/sweep.py {setup['folder'] / 'spec.toml'} --out {out}"
    assert json.loads((out / "sweep.json").read_text())["command"] == whole
    report.main([str(out), "--out", str(out / "partial")])
    assert (f"**Partial results: 1 of the 2 runs of `{setup['folder'] / 'spec.toml'}` have finished, 1 not started "
            f"(-); `{whole}` runs the rest.**") in (out / "partial.md").read_text()
    report.main([str(swept[0]), "--out", str(out / "whole")])
    assert "Partial" not in (out / "whole.md").read_text()


def test_report_tables_and_curves(swept, tmp_path):
    out, _ = swept
    report.main([str(out), "--out", str(tmp_path / "tiny"), "--title", "tiny sweep"])
    markdown = (tmp_path / "tiny.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| task |"))
    assert header == "| task | iql-target | iql-merged |"
    assert "`python benchmarks/report.py" in markdown and "spec.toml" in markdown

    tables = markdown.split("## ")[1:3]
    for table, last in zip(tables, (1, 5)):
        row = next(line for line in table.splitlines() if line.startswith("| source -> target (medium) |"))
        means = {}
        for variant in ("iql-target", "iql-merged"):
            evaluations = json.loads((out / variant / TASK / "results.json").read_text())["evaluations"]
            per_seed = np.array([e["scores"] for e in evaluations[-last:]]).mean(axis=0)  # over evaluations
            means[variant] = per_seed.mean()
            assert f"{per_seed.mean():.1f} ± {per_seed.std():.1f}" in row
        best = max(means, key=means.get)
        assert row.count("**") == 2 and f"**{means[best]:.1f} ± " in row

    numbers = json.loads((tmp_path / "tiny.json").read_text())["results"]
    assert [(r["algorithm"], r["seeds"]) for r in numbers] == [("iql-target", 2), ("iql-merged", 2)]
    png = (tmp_path / "tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_report_include_completes_a_sweep_from_an_earlier_report(swept, tmp_path):
    """A sweep whose first run's folder is gone (another machine, an earlier session) and whose second run is
    here: --include the earlier report's JSON and the table is the whole sweep's again, the recorded cell marked
    (+), the sweep not partial; a run here wins over the recorded one of its cell."""
    out, _ = swept
    report.main([str(out), "--out", str(tmp_path / "earlier")])
    earlier = json.loads((tmp_path / "earlier.json").read_text())
    # the recorded iql-merged run reads 999 in the earlier report: the run here must replace it
    merged = next(r for r in earlier["results"] if r["algorithm"] == "iql-merged")
    merged_final = f"{merged['final_mean']:.1f} ± {merged['final_std']:.1f}"
    merged["final_mean"] = 999.0
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    here = tmp_path / "here"
    shutil.copytree(out, here)
    shutil.rmtree(here / "iql-target")
    report.main([str(here), "--out", str(tmp_path / "alone")])
    assert "**Partial results: 1 of the 2 runs" in (tmp_path / "alone.md").read_text()

    report.main([str(here), "--out", str(tmp_path / "joined"), "--include", str(tmp_path / "earlier.json")])
    markdown = (tmp_path / "joined.md").read_text()
    assert "Partial" not in markdown
    target = next(r for r in earlier["results"] if r["algorithm"] == "iql-target")
    row = next(line for line in markdown.split("## ")[1].splitlines()
               if line.startswith("| source -> target (medium) |"))
    assert f"{target['final_mean']:.1f} ± {target['final_std']:.1f}" in row and row.count("(+)") == 1
    assert merged_final in row and "999" not in markdown
    assert f"(+) 1 run recorded in `{tmp_path / 'earlier.json'}`" in markdown
    joined = json.loads((tmp_path / "joined.json").read_text())["results"]
    assert [(r["algorithm"], r.get("recorded") is not None) for r in joined] == [("iql-target", True),
                                                                                ("iql-merged", False)]
    with pytest.raises(SystemExit, match="No file at .*: --include takes the NAME.json"):
        report.main([str(here), "--include", str(tmp_path / "missing.json")])


def test_report_dataset_column_is_the_target_datas_own_level(setup, swept, tmp_path):
    out, _ = swept
    report.main([str(out), "--out", str(tmp_path / "data"), "--dataset-column"])
    markdown = (tmp_path / "data.md").read_text()
    assert "| task | iql-target | iql-merged | target data |" in markdown
    # by hand: the target file's 10 episodes of 100 steps, normalised with the references the runs used: D4RL's
    # halfcheetah (-280.178953, 12135.0), the default in the papers' physics
    with h5py.File(setup["datasets"]["target"]) as file:
        returns = np.asarray(file["rewards"], np.float64).reshape(10, 100).sum(axis=1)
    scores = 100 * (returns + 280.178953) / (12135.0 + 280.178953)
    row = next(line for line in markdown.splitlines() if line.startswith("| source -> target (medium) |"))
    assert row.endswith(f"| {scores.mean():.1f} ± {scores.std():.1f} |")


def test_report_by_hand_settings_and_unfinished_runs(tmp_path):
    """Outside a sweep: a dvdf run of two (lam, xi) settings gives two columns, its scores picked by the grid; an
    unfinished iql run is marked with the step it reached, and is not bold though its mean is the row's highest."""
    args = {"source": "halfcheetah-kinematic", "target": "halfcheetah", "quality": "expert", "steps": 30}
    grid = [{"lam": lam, "xi": 0.5, "seed": seed} for lam in (0.7, 1.0) for seed in (0, 1)]
    runs = {"dvdf": {"algo": "dvdf", "finished": True, "step": 30, "args": args, "grid": grid,
                     "settings": [{"lam": 0.7, "xi": 0.5}, {"lam": 1.0, "xi": 0.5}],
                     "evaluations": [{"step": 10, "scores": [10, 20, 30, 50]}, {"step": 20, "scores": [12, 22, 40, 60]},
                                     {"step": 30, "scores": [14, 26, 50, 70]}]},
            "iql": {"algo": "iql", "finished": False, "step": 20, "args": args | {"data": "target"},
                    "evaluations": [{"step": 10, "scores": [95, 97]}, {"step": 20, "scores": [99, 101]}]}}
    for name, results in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "hand")])
    markdown = (tmp_path / "hand.md").read_text()
    # final: lam 0.7 seeds [14, 26], lam 1 seeds [50, 70], iql [99, 101]; over all 3 (or 2) evaluations: lam 0.7
    # seeds [12, 22.67], lam 1 seeds [40, 60], iql seeds [97, 99]
    assert "| task | dvdf (lam=0.7, xi=0.5) | dvdf (lam=1, xi=0.5) | iql (target) |" in markdown
    assert ("| halfcheetah-kinematic -> halfcheetah (expert) | 20.0 ± 6.0 | **60.0 ± 10.0** | "
            "100.0 ± 1.0 \\* (step 20 of 30) |") in markdown
    assert ("| halfcheetah-kinematic -> halfcheetah (expert) | 17.3 ± 5.3 | **50.0 ± 10.0** | "
            "98.0 ± 1.0 \\* (step 20 of 30) |") in markdown
    assert "\\* unfinished" in markdown


@pytest.mark.parametrize("spec, message", [
    (None, "No spec file at"),
    ("pairs = [['a', 'b']]\nqualities = ['medium']\nsteps = 3\n", "unknown key 'steps'"),
    ("pairs = [['a', 'b']]\nqualities = ['medium']\n[algos.x]\nscript = 'iqll'\n", "algos.x needs script = one of"),
    ("qualities = ['medium']\n[algos.x]\nscript = 'iql'\n", "needs 'pairs'"),
    ("pairs = [['a', 'b']]\nqualities = ['medium']\n[algos.x]\nscript = 'iql'\nflags = { seed = 3 }\n", "sets seed"),
    ("pairs = [['a', 'b', 'c', 'd']]\nqualities = ['medium']\n[algos.x]\nscript = 'iql'\n",
     "must be [source, target] or [source, target, source dataset]"),
    ("pairs = [['a', 'b', 'x/m-v0']]\nqualities = ['medium']\n[algos.x]\nscript = 'iql'\n"
     "flags = { source_dataset = 'y' }\n", "algos.x.flags sets source_dataset, which the pairs set"),
    # flags are checked against the script's own when the spec loads, not when its run fails
    ("pairs = [['a', 'b']]\nqualities = ['medium']\n[flags]\neval_evry = 5\n[algos.x]\nscript = 'iql'\n",
     "flags.eval_evry is not a flag of algos/iql.py (variant x); the closest flag is eval_every."),
    ("pairs = [['a', 'b']]\nqualities = ['medium']\n[algos.x]\nscript = 'dvdf'\nflags = { lamda = 0.5 }\n",
     "algos.x.flags.lamda is not a flag of algos/dvdf.py (variant x); the closest flag is lam."),
    ("pairs = [['a', 'b']]\nqualities = ['medium']\n[grid]\ndata = ['target', 'targett']\n[algos.x]\n"
     "script = 'iql'\n", "grid.data = 'targett' is not one of 'merged', 'target', 'source' (--data of algos/iql.py)"),
    ("num_seeds = 0\npairs = [['a', 'b']]\nqualities = ['medium']\n[algos.x]\nscript = 'iql'\n",
     "num_seeds must be a whole number of at least 1, got 0"),
    ("pairs = [['a', 'b']]\nqualities = ['medium', 'mediun']\n[algos.x]\nscript = 'iql'\n",
     "qualities holds 'mediun'; each quality is one of random, medium, medium-replay, expert, medium-expert"),
])
def test_bad_spec_ends_with_one_sentence(spec, message, tmp_path):
    path = tmp_path / "spec.toml"
    if spec is not None:
        path.write_text(spec)
    with pytest.raises(SystemExit) as error:
        sweep.main([str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    text = str(error.value)
    assert message in text and "\n" not in text and text.endswith(".")


def test_pairs_with_a_source_dataset_name_their_folders_after_it(tmp_path):
    """[source, target, dataset]: --source-dataset per pair (a mixture per task), the folder named by the dataset."""
    spec = tmp_path / "spec.toml"
    spec.write_text("num_seeds = 3\npairs = [['halfcheetah-kinematic', 'halfcheetah', 'crossdomain/mix/hc-a-v0'],\n"
                    "         ['hopper-kinematic', 'hopper', 'data/hop-b.hdf5'], ['walker2d-morph', 'walker2d']]\n"
                    "qualities = ['medium', 'expert']\n[algos.v2a]\nscript = 'v2a'\nflags = { steps = 10 }\n")
    configs = sweep.configurations(sweep.load_spec(spec), tmp_path / "out")
    assert [config["folder"] for config in configs] == [
        f"v2a/{task}-{quality}" for task in ("hc-a_to_halfcheetah", "hop-b_to_hopper", "walker2d-morph_to_walker2d")
        for quality in ("medium", "expert")]
    assert [config["flags"].get("source_dataset") for config in configs] == [
        "crossdomain/mix/hc-a-v0"] * 2 + ["data/hop-b.hdf5"] * 2 + [None] * 2
    assert configs[2]["command"] == ("python algos/v2a.py --source hopper-kinematic --target hopper --quality medium "
                                     "--num-seeds 3 --seed 0 --source-dataset data/hop-b.hdf5 --steps 10 --out "
                                     f"{tmp_path / 'out' / 'v2a' / 'hop-b_to_hopper-medium'}")


@pytest.mark.parametrize("name", ["v2a_heterogeneous", "v2a_heterogeneous_100k", "v2a_heterogeneous_cpu"])
def test_v2a_specs_run_the_six_heterogeneous_combinations_per_task(name, tmp_path):
    """The V2A comparison specs cover exactly the README's combinations: every task's three mixtures (not the
    random probe one) x the target qualities, for eight methods (with DARA, BOSA, OTDF and V2A-OTDF) at one step
    budget."""
    from envs.generate import HETEROGENEOUS_TARGET_QUALITIES, HETEROGENEOUS_TASKS, heterogeneous_mixtures, mixture_id
    configs = sweep.configurations(sweep.load_spec(ROOT / "benchmarks" / "specs" / f"{name}.toml"), tmp_path)
    wanted = {(f"{task}-kinematic", task, mixture_id(mixture), quality) for task in HETEROGENEOUS_TASKS
              for mixture in heterogeneous_mixtures(task) if not mixture.endswith("-random")
              for quality in HETEROGENEOUS_TARGET_QUALITIES}
    assert len(wanted) == 12
    for variant in ("iql-merged", "dara", "bosa", "igdf", "dvdf", "v2a", "otdf", "v2a-otdf"):
        runs = [config for config in configs if config["variant"] == variant]
        assert {(c["source"], c["target"], c["flags"]["source_dataset"], c["quality"]) for c in runs} == wanted
        assert len(runs) == 12 and {c["flags"]["num_seeds"] for c in runs} == {3}
    assert len({config["flags"]["steps"] for config in configs}) == 1
    assert {(c["flags"].get("lam"), c["script"]) for c in configs} == {(None, "iql"), (1.0, "dvdf"), (0.7, "dvdf"),
                                                                       (0.6, "v2a"), (0.6, "v2a_otdf"), (None, "otdf"),
                                                                       (None, "dara"), (None, "bosa")}


def test_sweeps_started_at_once_keep_every_manifest_entry(tmp_path):
    """Eight --only parts of one spec writing sweep.json at the same moment: none loses another's entries."""
    spec = tmp_path / "spec.toml"
    spec.write_text("pairs = [['halfcheetah-kinematic', 'halfcheetah']]\nqualities = ['medium']\n"
                    "[grid]\neval_episodes = [1, 2, 3, 4, 5, 6, 7, 8]\n[algos.iql]\nscript = 'iql'\n")
    out = tmp_path / "out"
    processes = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), str(spec), "--out", str(out),
                                   "--print-commands", "--only", f"*eval_episodes{k}"], stdout=subprocess.DEVNULL)
                 for k in range(1, 9)]
    assert [process.wait() for process in processes] == [0] * 8
    manifest = json.loads((out / "sweep.json").read_text())
    assert sorted(c["grid"]["eval_episodes"] for c in manifest["configurations"]) == list(range(1, 9))


TYRO_BOX = """$ python algos/iql.py --eval-evry 3
\u256d\u2500 Unrecognized options \u2500\u2500\u2500\u2500\u2500\u256e
\u2502 Unrecognized options: --eval-evry, 3    \u2502
\u2502 \u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500 \u2502
\u2502 Perhaps you meant:                      \u2502
\u2502     --eval-every INT                    \u2502
\u2502 For full helptext, run algos/iql.py --help \u2502
\u2570\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u2500\u256f
"""


def test_the_failure_summary_names_a_bad_flag(tmp_path):
    """A flag the spec cannot check (a value of the wrong type) fails in the script: tyro's box names it on its
    first line, and that line, not the box's last, is what the summary shows."""
    log = tmp_path / "log.txt"
    log.write_text(TYRO_BOX)
    assert sweep.last_line(log) == "Unrecognized options: --eval-evry, 3"
    log.write_text("step 40: score 1.0\nFAKE diverged in the 0-10 chunk; nothing was saved.\n")
    assert sweep.last_line(log) == "FAKE diverged in the 0-10 chunk; nothing was saved."


def test_an_unreadable_or_non_finite_results_file_is_not_finished(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    finished = {"finished": True, "args": {"steps": 10}, "evaluations": [{"step": 10, "scores": [1.0, 2.0]}]}
    (folder / "results.json").write_text(json.dumps(finished)[:30])  # truncated, and no checkpoint: run it anew
    assert sweep.status(folder, {"steps": 10}) == ("run", "new")
    (folder / "checkpoint.msgpack").write_bytes(b"x")
    action, why = sweep.status(folder, {"steps": 10})
    assert action == "resume" and why.endswith("results.json cannot be read, continuing with --resume")
    (folder / "results.json").write_text(json.dumps(finished))
    assert sweep.status(folder, {"steps": 10}) == ("skip", "finished")
    finished["evaluations"][0]["scores"] = [1.0, None]  # a NaN score, as strict JSON writes it
    (folder / "results.json").write_text(json.dumps(finished))
    assert sweep.status(folder, {"steps": 10}) == ("resume", "finished with a non-finite evaluation, checked again "
                                                             "with --resume")


def test_report_names_an_unreadable_results_file(swept, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(swept[0], copy)
    broken = copy / "iql-merged" / TASK / "results.json"
    broken.write_text(broken.read_text()[:200])
    report.main([str(copy), "--out", str(tmp_path / "report")])
    markdown = (tmp_path / "report.md").read_text()
    assert f"{broken} cannot be read (JSONDecodeError): it is truncated or corrupt and is left out" in markdown
    assert "iql-target" in markdown


def test_a_run_whose_folder_another_process_holds_is_not_started(setup, tmp_path, capsys):
    """A run left going by a sweep killed with SIGKILL holds its folder's lock: a rerun reports that in one sentence
    and starts nothing beside it."""
    import fcntl
    out = tmp_path / "out"
    folder = out / "iql-target" / TASK
    folder.mkdir(parents=True)
    descriptor = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        with pytest.raises(SystemExit) as error:
            sweep.main([str(setup["folder"] / "spec.toml"), "--out", str(out), "--only", "iql-target/*"])
    finally:
        os.close(descriptor)
    assert error.value.code == 1 and not (folder / "log.txt").exists()
    held = (f"another process is writing the run in {folder} (its .lock is held): wait for it to finish or stop it, "
            f"then run the sweep again")
    assert f"    FAILED ({held})" in capsys.readouterr().out


def test_a_sweep_stopped_by_sigterm_stops_its_run_too(setup, tmp_path):
    import signal
    import time
    spec = tmp_path / "long.toml"
    spec.write_text(SPEC.format(**setup["datasets"]).replace("steps = 240", "steps = 10000000") + VARIANTS)
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), str(spec), "--out",
                                str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=setup["env"])

    def run_child():  # the sweep's run (not a helper process that an import starts and ends)
        for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            try:
                if b"algos/iql.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
            except FileNotFoundError:
                pass
        return None

    deadline = time.time() + 120
    while (child := run_child()) is None and time.time() < deadline:
        time.sleep(0.1)
    assert child is not None
    time.sleep(1.0)  # the run is under way (loading JAX)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stderr == (f"Stopped by SIGTERM during iql-target/{TASK}, whose run was stopped too (its last checkpoint "
                      f"is kept); the same command continues the sweep.\n")
    assert not Path(f"/proc/{child}").exists()  # ended and reaped: nothing left running beside a rerun


def test_the_claim_specs_and_the_kinematic_table_spec(tmp_path):
    """Issue 30's CPU-budget claims (the motivating example for two tasks, the low-data setting for four tasks: six
    configurations x IQL target, IQL merged and IGDF + DVDF in one program, 3 seeds, 100k steps) and DVDF's full
    kinematic-shift table (4 tasks x 5 qualities x the same three processes, 5 seeds, 1M steps)."""
    from envs.catalog import QUALITIES
    load = lambda name: sweep.configurations(sweep.load_spec(ROOT / "benchmarks" / "specs" / f"{name}.toml"), tmp_path)  # noqa: E731
    claims = load("dvdf_claims_motivating_cpu") + load("dvdf_claims_low_data_cpu")
    assert len(claims) == 6 * 3
    assert {c["flags"]["steps"] for c in claims} == {100_000} and {c["flags"]["num_seeds"] for c in claims} == {3}
    grids = [c for c in claims if c["script"] == "dvdf"]
    assert len(grids) == 6 and all(c["flags"]["lam"] == [1.0, 0.7] for c in grids)
    assert "--lam 1.0 0.7 --xi 0.5" in grids[0]["command"]
    assert {c["flags"].get("source_dataset") for c in claims} == {
        None, "crossdomain/mix/halfcheetah-kinematic-random-expert-v0", "crossdomain/mix/hopper-kinematic-random-expert-v0"}
    assert sum(c["flags"].get("target_size") == 5000 for c in claims) == 12
    table = load("dvdf_kinematic_table")
    assert len(table) == 4 * 5 * 3 and {c["flags"]["num_seeds"] for c in table} == {5}
    assert {c["flags"]["steps"] for c in table} == {1_000_000} and {c["quality"] for c in table} == set(QUALITIES)
    from envs.generate import MIXTURES
    assert MIXTURES["hopper-kinematic-random-expert"] == [("hopper-kinematic", "random", 500_000),
                                                          ("hopper-kinematic", "expert", 500_000)]
