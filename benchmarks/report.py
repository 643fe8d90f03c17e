"""A results folder as a markdown table of normalised scores and PNG learning curves.

    python benchmarks/report.py runs/sweeps/dvdf_default --out benchmarks/results/dvdf_default

Reads every results.json under the folder (of algos/iql.py, dvdf.py, v2a.py, ...). A run's algorithm is its sweep
variant (benchmarks/sweep.py: the folder <sweep>/<variant>/<task>/ of a sweep.json) or else its "algo" with its
--data mode or (lam, xi) setting; a run of several (lam, xi) settings gives one algorithm per setting. Its task is
"<source> -> <target> (<quality>)" (a --source-dataset / --target-dataset file's name in place of the domain), with
the sweep's grid values (runs that would still share a cell are told apart by their folders). Per algorithm and
task, over seeds: the final normalised score (the last evaluation) and the mean of each seed's last 5
evaluations, each as mean +- std over seeds (ddof 0). Writes, atomically:
    NAME.md    two tables (final; mean of the last 5 evaluations), a row per task and a column per algorithm, the
               best finished mean of each row in bold, unfinished runs marked, and the command (and spec) behind it
    NAME.png   a panel per task: mean over seeds of the normalised score against gradient steps, +- 1 std shaded
    NAME.json  the numbers of both, per algorithm and task (with each seed's scores), and the aggregates below
    NAME_intervals.png  the aggregates' 95% intervals, a row per algorithm
Beside mean +- std, the aggregates the field now reports (Agarwal et al., "Deep Reinforcement Learning at the Edge
of the Statistical Precipice", NeurIPS 2021), computed by their rliable package from each algorithm's scores as one
[seeds, tasks] array of the final score (--aggregate-score last5: of the mean of the last 5): the interquartile mean
(IQM), mean, median and optimality gap with 95% stratified-bootstrap intervals, and the probability of improvement
P(X > Y) of each pair of algorithms (--baseline NAME: of each against NAME). Only finished runs count, over the tasks
that every algorithm has finished; an algorithm with more seeds on some tasks than on others gives its first k on
each, k its fewest. --bootstrap-reps resamples (default 2000) drawn from --bootstrap-seed (default 0).
--include NAME.json adds the runs of an earlier report whose folders are not here (made on another machine, or in
an earlier session whose runs/ is gone): a run found here replaces the recorded one of its cell, the recorded ones
count towards their sweep's progress and are marked (+) in the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: envs/, benchmarks/
from envs.run import write_atomic  # noqa: E402
from benchmarks.sweep import configurations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAST = 5  # evaluations averaged for the "last 5" table
METRICS = ("IQM", "mean", "median", "optimality gap")  # rliable's aggregates, the paper's headline one first


def sweep_configurations(folder: Path) -> dict:
    """{run folder: (configuration, sweep.json)} from every sweep.json in the folder, below it and above it."""
    found = {}
    for manifest_path in [*folder.rglob("sweep.json"), *(p / "sweep.json" for p in folder.parents)]:
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            for config in manifest["configurations"]:
                found[(manifest_path.parent / config["folder"]).resolve()] = (config, manifest)
    return found


def dataset_label(dataset: str | None, domain: str) -> str:
    return domain if dataset is None else Path(dataset).stem if dataset.endswith((".hdf5", ".h5")) else dataset


def runs(results: dict, config: dict | None) -> list[dict]:
    """The (algorithm, task) series of one results.json: steps, and scores [evaluations, seeds]."""
    args = results["args"]
    task = dataset_label(args.get("source_dataset"), args["source"])
    if args.get("target"):  # sql_pretrain.py has no target: it trains and evaluates in the source domain
        task += " -> " + dataset_label(args.get("target_dataset"), args["target"])
    task += f" ({args['quality']}" + "".join(
        f", {key}={value}" for key, value in (config or {}).get("grid", {}).items()) + ")"
    name = config["variant"] if config else results["algo"] + (f" ({args['data']})" if args.get("data") else "")
    steps = [e["step"] for e in results["evaluations"]]
    scores = np.array([e["scores"] for e in results["evaluations"]], dtype=np.float64).reshape(len(steps), -1)
    common = {"task": task, "steps": steps, "finished": results["finished"], "step": results["step"],
              "budget": args["steps"], "target": (args.get("target_dataset"), args.get("target") or args["source"],
                                                  args["quality"]),
              # runs from before --physics / --references ran in v5 with each domain's own references
              "physics": args.get("physics", "v5"), "references": args.get("references", "zoo")}
    settings = results.get("settings") or [None]
    series = []
    for setting in settings:
        if setting is None:
            series.append({**common, "algorithm": name, "scores": scores})
            continue
        columns = [i for i, run in enumerate(results["grid"]) if all(run[k] == v for k, v in setting.items())]
        label = ", ".join(f"{key}={value:g}" for key, value in setting.items())
        shown = name + (f" ({label})" if len(settings) > 1 or config is None else "")
        series.append({**common, "algorithm": shown, "scores": scores[:, columns]})
    return series


def collect(folder: Path, empty_ok: bool = False) -> tuple[list[dict], list[dict], list[str]]:
    """Every series under the folder in sweep order then path order, the sweeps they came from, and notes."""
    configs = sweep_configurations(folder)
    order = {path: index for index, path in enumerate(configs)}
    paths = sorted(folder.rglob("results.json"), key=lambda p: (order.get(p.parent.resolve(), len(order)), str(p)))
    series, sweeps, notes = [], [], []
    for path in paths:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:  # truncated by a crash: its run is unfinished (the sweep resumes it)
            notes.append(f"{path} cannot be read ({type(error).__name__}): it is truncated or corrupt and is left out "
                         f"(rerunning its sweep, or its command with --resume, writes it again).")
            continue
        if not results.get("evaluations") or "scores" not in results["evaluations"][0]:
            notes.append(f"{path.parent} has no evaluations with normalised scores (yet) and is left out.")
            continue
        config, manifest = configs.get(path.parent.resolve(), (None, None))
        if manifest is not None and manifest not in sweeps:
            sweeps.append(manifest)
        series += [run | {"folder": str(path.parent), "config": config and config["name"], "sweep": manifest}
                   for run in runs(results, config)]
    if not series and not empty_ok:
        raise SystemExit(f"No results.json with evaluations under {folder}.")
    # runs that would share a cell (the same algorithm and task outside a sweep) keep apart by their folders
    keys = [(run["algorithm"], run["task"]) for run in series]
    for run, key in zip(series, keys):
        if keys.count(key) > 1:
            run["algorithm"] += f" [{os.path.relpath(run['folder'], folder)}]"
    return series, sweeps, notes


def coverage(series: list[dict], sweeps: list[dict]) -> list[str]:
    """A sentence per sweep whose spec has runs not finished: how many finished, are under way, have not started."""
    lines = []
    for manifest in sweeps:
        planned = [c["name"] for c in configurations(manifest["spec"], ROOT)]
        ours = [run for run in series if run["sweep"] == manifest]
        finished = {run["config"] for run in ours if run["finished"]}
        started = {run["config"] for run in ours} - finished
        if len(finished) < len(planned):
            waiting = len(set(planned) - finished - started)
            lines.append(f"**Partial results: {len(finished)} of the {len(planned)} runs of `{manifest['spec_file']}` "
                         "have finished" + (f", {len(started)} {'is' if len(started) == 1 else 'are'} under way (\\*)"
                                            if started else "")
                         + (f", {waiting} not started (-)" if waiting else "") + "; `" + manifest["command"]
                         + "` runs the rest.**")
    return lines


def recorded(paths: list[Path], summaries: list[dict], sweeps: list[dict]) -> list[dict]:
    """The summaries of earlier reports' NAME.json files whose cells (algorithm, task) no run here fills, each
    attached to its sweep (one of `sweeps` with the same spec, or its own, appended to `sweeps`)."""
    have, found = {(s["algorithm"], s["task"]) for s in summaries}, []
    for path in paths:
        try:
            report = json.loads(path.read_text())
            entries, old_sweeps = report["results"], report.get("sweeps", [])
        except FileNotFoundError:
            raise SystemExit(f"No file at {path}: --include takes the NAME.json of an earlier report.py run.")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SystemExit(f"{path} is not the NAME.json of a report.py run (no 'results' list).")
        names = {}  # a recorded run's folder ends with its configuration's folder in its sweep
        for old in old_sweeps:
            manifest = next((m for m in sweeps if m["spec"] == old["spec"]), None)
            if manifest is None:
                sweeps.append(manifest := dict(old))
            for config in configurations(old["spec"], ROOT):
                names[Path(config["folder"]).as_posix()] = (config["name"], manifest)
        for entry in entries:
            if (entry["algorithm"], entry["task"]) in have:
                continue
            tail = "/".join(Path(entry["folder"]).parts[-2:])
            name, manifest = names.get(tail, (None, None))
            found.append(entry | {"config": name, "sweep": manifest, "recorded": str(path)})
            have.add((entry["algorithm"], entry["task"]))
    return found


def summarise(run: dict) -> dict:
    """Final score and mean of the last 5 evaluations, mean and std (ddof 0) over seeds; the curve's mean and std."""
    scores = run["scores"]
    final, last = scores[-1], scores[-LAST:].mean(axis=0)
    return {"algorithm": run["algorithm"], "task": run["task"], "folder": run["folder"], "seeds": scores.shape[1],
            "finished": run["finished"], "step": run["step"], "budget": run["budget"],
            "final_mean": float(final.mean()), "final_std": float(final.std()),
            "last5_mean": float(last.mean()), "last5_std": float(last.std()),
            "final_scores": final.tolist(), "last5_scores": last.tolist(),  # per seed, for the aggregates
            "curve": {"steps": run["steps"], "mean": scores.mean(axis=1).tolist(), "std": scores.std(axis=1).tolist()}}


def target_data_scores(series: list[dict]) -> dict:
    """{task: "mean ± std"} of the normalised episode returns of each task's full target dataset."""
    from envs import dataset_score, load_dataset

    found = {}
    for run in series:
        if run["task"] not in found:
            name, domain, quality = run["target"]
            dataset = load_dataset(name, domain=domain, quality=quality, physics=run["physics"])
            mean, std, _ = dataset_score(dataset, domain, run["physics"], run["references"])
            found[run["task"]] = f"{mean:.1f} ± {std:.1f}"
    return found


def table(cells: dict, tasks: list, algorithms: list, stat: str, data: dict | None = None) -> list[str]:
    extra = " | target data" if data else ""
    lines = ["| task | " + " | ".join(algorithms) + extra + " |", "|---" * (len(algorithms) + 1 + bool(data)) + "|"]
    for task in tasks:
        row = [cells.get((task, algorithm)) for algorithm in algorithms]
        # a run under way may still fall: only finished runs compete for the bold
        best = max((round(cell[f"{stat}_mean"], 1) for cell in row if cell and cell["finished"]), default=None)
        texts = []
        for cell in row:
            if cell is None:
                texts.append("-")
                continue
            text = f"{cell[f'{stat}_mean']:.1f} ± {cell[f'{stat}_std']:.1f}"
            text = f"**{text}**" if cell["finished"] and round(cell[f"{stat}_mean"], 1) == best else text
            texts.append(text + ("" if cell["finished"] else f" \\* (step {cell['step']} of {cell['budget']})")
                         + (" (+)" if cell.get("recorded") else ""))
        lines.append(f"| {task} | " + " | ".join(texts) + (f" | {data.get(task, '-')}" if data else "") + " |")
    return lines


def save_png(figure, path: Path) -> None:
    """The figure as a PNG at path, atomically (a reader never sees half a file), and closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)


def plot(cells: dict, tasks: list, algorithms: list, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colours = {algorithm: f"C{index % 10}" for index, algorithm in enumerate(algorithms)}
    for axis, task in zip(axes.flat, tasks):
        for algorithm in algorithms:
            if (cell := cells.get((task, algorithm))) is None:
                continue
            steps, mean, std = (np.array(cell["curve"][key]) for key in ("steps", "mean", "std"))
            axis.plot(steps, mean, color=colours[algorithm], label=algorithm)
            axis.fill_between(steps, mean - std, mean + std, color=colours[algorithm], alpha=0.2)
        axis.set_title(textwrap.fill(task, 48), fontsize=10)  # long dataset names wrap at their hyphens
        axis.set(xlabel="gradient steps", ylabel="normalised score")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(tasks):]:
        axis.set_visible(False)
    handles = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.suptitle(title)
    figure.tight_layout()
    figure.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    save_png(figure, path)


def seeded(seed: int, compute, *args, **kwargs):
    """compute(*args, **kwargs) with numpy's global generator seeded, then restored: rliable 1.2.0 draws its
    bootstrap indices from np.random (its random_state argument does not reach them), so this makes them repeat."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return compute(*args, **kwargs)
    finally:
        np.random.set_state(state)


def aggregates(summaries: list[dict], score: str, reps: int, seed: int, baseline: str | None) -> dict:
    """rliable's IQM, mean, median and optimality gap (at 100, the expert's level) with 95% stratified-bootstrap
    intervals per algorithm, and the probability of improvement per pair, from each algorithm's [seeds, tasks]
    array of `score` ("final" or "last5"): finished runs only, over the tasks every algorithm has finished; an
    algorithm's cells with more seeds than its fewest give their first ones. Every bootstrap starts from `seed`, so
    an algorithm's numbers do not depend on which others are in the report."""
    # rliable imports arch and pandas (seconds): only when the section is made
    from rliable import library, metrics
    from tqdm import tqdm

    notes = []
    usable = [s for s in summaries if s["finished"] and f"{score}_scores" in s]
    if recorded_only := [s for s in summaries if s["finished"] and f"{score}_scores" not in s]:
        notes.append(f"{len(recorded_only)} recorded run{'s' * (len(recorded_only) != 1)} without per-seed scores "
                     "(an earlier report.py's NAME.json) left out.")
    if unfinished := [s for s in summaries if not s["finished"]]:
        notes.append(f"{len(unfinished)} unfinished run{'s' * (len(unfinished) != 1)} left out (their last "
                     "evaluation is not at the end of their budget).")
    cells = {(s["algorithm"], s["task"]): s for s in usable}
    algorithms = list(dict.fromkeys(s["algorithm"] for s in usable))
    all_tasks = list(dict.fromkeys(s["task"] for s in summaries))
    tasks = [task for task in all_tasks if algorithms and all((a, task) in cells for a in algorithms)]
    if dropped := [task for task in all_tasks if task not in tasks]:
        notes.append(f"{len(dropped)} task{'s' * (len(dropped) != 1)} left out, not finished by every algorithm: "
                     + "; ".join(dropped) + ".")
    found = {"score": score, "reps": reps, "seed": seed, "confidence": 0.95, "method": "percentile",
             "tasks": tasks, "seeds": {}, "aggregates": {}, "improvement": [], "notes": notes}
    if not tasks:
        return found
    if baseline is not None and baseline not in algorithms:
        raise SystemExit(f"--baseline {baseline!r} is none of the finished algorithms: {', '.join(algorithms)}.")
    arrays = {}
    for algorithm in algorithms:
        counts = [len(cells[algorithm, task][f"{score}_scores"]) for task in tasks]
        arrays[algorithm] = np.array([cells[algorithm, task][f"{score}_scores"][:min(counts)] for task in tasks]).T
        found["seeds"][algorithm] = min(counts)
        if max(counts) > min(counts):
            notes.append(f"{algorithm}: {min(counts)} seeds on every task, its first ones where it has up to "
                         f"{max(counts)} (rliable takes one [seeds, tasks] array per algorithm).")
    pairs = ([(x, baseline) for x in algorithms if x != baseline] if baseline
             else [(x, y) for i, x in enumerate(algorithms) for y in algorithms[i + 1:]])

    def aggregate(scores):
        return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores),
                         metrics.aggregate_median(scores), metrics.aggregate_optimality_gap(scores, 100)])

    with tqdm(total=len(algorithms) + len(pairs), desc=f"bootstrap ({reps} resamples)", unit="estimate") as bar:
        for algorithm, scores in arrays.items():
            point, interval = seeded(seed, library.get_interval_estimates, {algorithm: scores}, aggregate, reps=reps)
            found["aggregates"][algorithm] = {
                name: [float(point[algorithm][i]), *map(float, interval[algorithm][:, i])]
                for i, name in enumerate(METRICS)}
            bar.update()
        for x, y in pairs:
            point, interval = seeded(seed, library.get_interval_estimates, {"pair": [arrays[x], arrays[y]]},
                                     metrics.probability_of_improvement, reps=reps)
            found["improvement"].append({"x": x, "y": y, "probability": float(point["pair"]),
                                         "low": float(interval["pair"][0, 0]), "high": float(interval["pair"][1, 0])})
            bar.update()
    return found


def statistics_lines(found: dict, intervals_png: str) -> list[str]:
    """The markdown section of aggregates(): how they were made, a table per algorithm, a table per pair."""
    which = "final score (last evaluation)" if found["score"] == "final" else f"mean of the last {LAST} evaluations"
    lines = ["## Aggregates over tasks and seeds (IQM, 95% stratified-bootstrap intervals)", ""]
    if not found["tasks"]:
        return lines + ["No task has finished runs of every algorithm yet: no aggregates.", "",
                        *(f"Note: {note}" for note in found["notes"]), ""]
    count = len(found["tasks"])
    lines += [(f"Of the {which}, over {count} task{'s' * (count != 1)} and each algorithm's seeds (Agarwal et al., "
              "[Deep RL at the Edge of the Statistical Precipice](https://arxiv.org/abs/2108.13264), NeurIPS 2021; "
              "computed by the rliable package): IQM, the mean of the middle 50% of all its runs' scores pooled over "
              "tasks; mean and median of the per-task means; optimality gap, the mean shortfall below 100 (the "
              "expert's level). Brackets: 95% percentile intervals from "
              f"{found['reps']} stratified-bootstrap resamples (seeds resampled within each task; numpy seed "
              f"{found['seed']})."), "",
              "| algorithm | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for algorithm, values in found["aggregates"].items():
        lines.append(f"| {algorithm} | {found['seeds'][algorithm]} | "
                     + " | ".join(f"{point:.1f} [{low:.1f}, {high:.1f}]" for point, low, high in values.values())
                     + " |")
    lines.append("")
    if found["improvement"]:
        lines += [("P(X > Y), the probability of improvement: the chance that a run of X scores above a run of Y on "
                  "the same task (ties count one half), averaged over the tasks; 95% interval from resampling each "
                  "algorithm's seeds independently within each task. Above 0.5 favours X; an interval that holds "
                  "0.5 does not tell them apart."), "",
                  "| X | Y | P(X > Y) [95% CI] |", "|---|---|---|",
                  *(f"| {p['x']} | {p['y']} | {p['probability']:.2f} [{p['low']:.2f}, {p['high']:.2f}] |"
                    for p in found["improvement"]), ""]
    notes = [f"Note: {note}" for note in found["notes"]]
    return lines + notes + [""] * bool(notes) + [f"![aggregate intervals]({intervals_png})", ""]


def plot_intervals(found: dict, algorithms: list, title: str, path: Path) -> None:
    """rliable's plot of the aggregates' intervals, a row per algorithm in the learning curves' colours."""
    import matplotlib
    matplotlib.use("Agg")
    from rliable import plot_utils

    shown = list(found["aggregates"])[::-1]  # rliable draws the first row at the bottom: the table's first on top
    height = 0.5 * len(shown) + 0.4  # inches; rliable places the x label and we the title in figure fractions
    figure, _ = plot_utils.plot_interval_estimates(
        {a: np.array([v[0] for v in found["aggregates"][a].values()]) for a in shown},
        {a: np.array([v[1:] for v in found["aggregates"][a].values()]).T for a in shown},
        metric_names=list(METRICS), algorithms=shown, xlabel="normalised score", xlabel_y_coordinate=-0.45 / height,
        colors={a: f"C{algorithms.index(a) % 10}" for a in shown}, subfigure_width=3.6, row_height=height / len(shown))
    figure.suptitle(f"{title}: aggregates over tasks and seeds, 95% intervals", x=0.4, y=1 + 0.6 / height,
                    fontsize="xx-large")
    save_png(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="folder searched recursively for results.json")
    parser.add_argument("--out", type=Path,
                        help="output path without suffix (default benchmarks/results/<folder name>)")
    parser.add_argument("--title", help="title of the table and the figure (default: the folder name)")
    parser.add_argument("--include", type=Path, nargs="+", default=[], metavar="NAME.json",
                        help="also the runs of an earlier report whose folders are not here (a run here wins)")
    parser.add_argument("--dataset-column", action="store_true",
                        help="add the mean ± std normalised episode return of each task's full target dataset")
    parser.add_argument("--aggregate-score", choices=("final", "last5"), default="final",
                        help="the score of each seed the aggregates (IQM, P(X > Y)) are made of (default final)")
    parser.add_argument("--baseline", metavar="ALGORITHM",
                        help="P(X > ALGORITHM) for every other algorithm (default: every pair of algorithms)")
    parser.add_argument("--bootstrap-reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="numpy seed of the bootstrap (default 0)")
    args = parser.parse_args(argv)
    if args.bootstrap_reps < 1:
        raise SystemExit(f"--bootstrap-reps must be at least 1, got {args.bootstrap_reps}.")
    if not args.results.is_dir():
        raise SystemExit(f"No folder at {args.results}.")
    out = args.out or ROOT / "benchmarks" / "results" / args.results.resolve().name
    title = args.title or args.results.resolve().name
    series, sweeps, notes = collect(args.results.resolve(), empty_ok=bool(args.include))
    summaries = [summarise(run) for run in series]
    data = target_data_scores(series) if args.dataset_column else None  # of the runs here: it loads their data
    if extra := recorded(args.include, summaries, sweeps):
        # series stands for every run below: coverage counts the recorded ones; sweep runs in the spec's order
        series = series + extra
        planned = {c["name"]: i for m in sweeps for i, c in enumerate(configurations(m["spec"], ROOT))}
        both = sorted(zip(series, summaries + extra), key=lambda pair: planned.get(pair[0]["config"], len(planned)))
        series, summaries = [pair[0] for pair in both], [pair[1] for pair in both]
    if not summaries:
        raise SystemExit(f"No results under {args.results} nor in {', '.join(map(str, args.include))}.")
    cells = {(s["task"], s["algorithm"]): s for s in summaries}
    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    algorithms = list(dict.fromkeys(s["algorithm"] for s in summaries))

    command = shlex.join(["python", "benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    seeds, budgets = sorted({s["seeds"] for s in summaries}), sorted({s["budget"] for s in summaries})
    lines = [f"# {title}", "", f"Made by `{command}`"
             + "".join(f" from the sweep `{m['command']}` (spec `{m['spec_file']}`)" for m in sweeps) + ".", "",
             *(line for line in coverage(series, sweeps) for line in (line, "")),
             f"Normalised score 100 (J - J_random) / (J_expert - J_random) in the target domain, mean ± std over "
             f"{' or '.join(map(str, seeds))} seeds (std with ddof 0), {' or '.join(map(str, budgets))} gradient "
             "steps; the best mean of the finished runs of each row in bold.", "",
             "## Final score (last evaluation)", "", *table(cells, tasks, algorithms, "final", data), "",
             f"## Mean of the last {LAST} evaluations (of each seed; all of them where a run has fewer)", "",
             *table(cells, tasks, algorithms, "last5", data), ""]
    if data:
        lines += ["target data: the normalised returns of the episodes of the task's whole target dataset (the "
                  "data's own level), mean ± std over episodes.", ""]
    if not all(s["finished"] for s in summaries):
        lines += ["\\* unfinished: the run's last evaluation so far (step reached of its budget).", ""]
    for path in args.include:
        count = sum(s.get("recorded") == str(path) for s in summaries)
        lines += [f"(+) {count} run{'s' * (count != 1)} recorded in `{path}` by an earlier report (their folders are "
                  "not on this machine; the numbers are those recorded there).", ""]
    statistics = aggregates(summaries, args.aggregate_score, args.bootstrap_reps, args.bootstrap_seed, args.baseline)
    intervals_png = out.with_name(out.name + "_intervals.png")
    lines += statistics_lines(statistics, intervals_png.name)
    lines += [f"![learning curves]({Path(out).name}.png)", ""] + [f"Note: {note}" for note in notes]

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_name(out.name + ".md"), "\n".join(lines).rstrip() + "\n")
    write_atomic(out.with_name(out.name + ".json"), json.dumps(
        {"command": command, "sweeps": [{k: m[k] for k in ("command", "spec_file", "spec")} for m in sweeps],
         "results": [{k: v for k, v in s.items() if k not in ("config", "sweep")} for s in summaries],
         "statistics": statistics}, indent=1))
    plot(cells, tasks, algorithms, title, out.with_name(out.name + ".png"))
    if statistics["aggregates"]:
        plot_intervals(statistics, algorithms, title, intervals_png)
    print("\n".join(lines[lines.index("## Final score (last evaluation)"):]))
    print(f"wrote {out}.md, {out}.png, {out}.json" + (f" and {intervals_png}" if statistics["aggregates"] else ""))


if __name__ == "__main__":
    main()
