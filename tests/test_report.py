"""benchmarks/report.py's aggregates (rliable: IQM, mean, median, optimality gap with stratified-bootstrap
intervals, probability of improvement): the IQM and P(X > Y) of tiny score arrays against numbers worked out by
hand; unequal seed counts cut to an algorithm's fewest, unfinished runs and tasks not every algorithm finished left
out and said so; the same numbers for the same seed (and whatever other algorithms are in the report); and the
report, made from tiny results.json files, writing the section, its numbers in NAME.json and the intervals' PNG."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

REPS = 200  # resamples: enough to check the intervals' shape, fast enough for a unit test
# final scores [seeds] per (algorithm, task). a's 8 scores sorted: 1 2 3 4 10 20 30 40; its IQM drops the lowest
# and the highest quarter (two each): (3 + 4 + 10 + 20) / 4 = 9.25
FINAL = {("a", "medium"): [1, 2, 3, 4], ("a", "expert"): [10, 20, 30, 40],
         ("b", "medium"): [0, 0, 5, 5], ("b", "expert"): [15, 20, 25, 50]}
# P(a > b), a run against a run of the same task, ties one half, over the 4 x 4 pairs of each task:
#   medium: each of 1, 2, 3, 4 beats the two 0s and neither 5: 8 / 16 = 0.5
#   expert: 10 beats none; 20 beats 15 and ties 20 (1.5); 30 and 40 beat 15, 20, 25 (3 each): 7.5 / 16 = 0.46875
# averaged over the two tasks: 0.484375
P_A_OVER_B = (0.5 + 0.46875) / 2


def summary(algorithm: str, task: str, final: list, finished: bool = True) -> dict:
    """A cell of report.summarise's shape: what aggregates() reads."""
    return {"algorithm": algorithm, "task": task, "finished": finished, "final_scores": list(map(float, final)),
            "last5_scores": [score - 1.0 for score in final]}


def summaries(table: dict = FINAL) -> list[dict]:
    return [summary(algorithm, task, final) for (algorithm, task), final in table.items()]


def test_iqm_and_probability_of_improvement_by_hand():
    found = report.aggregates(summaries(), "final", REPS, 0, None)
    assert found["tasks"] == ["medium", "expert"] and found["seeds"] == {"a": 4, "b": 4} and not found["notes"]
    iqm, low, high = found["aggregates"]["a"]["IQM"]
    assert iqm == pytest.approx(9.25) and low <= iqm <= high and 1 <= low and high <= 40
    mean = np.mean(FINAL["a", "medium"] + FINAL["a", "expert"])  # 13.75
    assert found["aggregates"]["a"]["mean"][0] == pytest.approx(mean)
    assert found["aggregates"]["a"]["median"][0] == pytest.approx((2.5 + 25) / 2)  # the median of the task means
    assert found["aggregates"]["a"]["optimality gap"][0] == pytest.approx(100 - mean)  # every score below 100
    [pair] = found["improvement"]
    assert (pair["x"], pair["y"]) == ("a", "b") and pair["probability"] == pytest.approx(P_A_OVER_B)
    assert 0 <= pair["low"] <= pair["probability"] <= pair["high"] <= 1
    # the mean of the last 5 evaluations instead: every score 1 lower, the IQM too
    assert report.aggregates(summaries(), "last5", REPS, 0, None)["aggregates"]["a"]["IQM"][0] == pytest.approx(8.25)


def test_the_same_seed_gives_the_same_intervals():
    state = np.random.get_state()[1].copy()
    first, again = (report.aggregates(summaries(), "final", REPS, 3, None) for _ in range(2))
    assert first == again
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global generator is left as it was
    other = report.aggregates(summaries(), "final", REPS, 4, None)
    assert other["aggregates"]["a"]["IQM"][0] == first["aggregates"]["a"]["IQM"][0]  # the point estimate is fixed
    assert other["aggregates"] != first["aggregates"]  # the resamples are not
    # an algorithm's intervals do not depend on the others in the report
    alone = report.aggregates([s for s in summaries() if s["algorithm"] == "a"], "final", REPS, 3, None)
    assert alone["aggregates"]["a"] == first["aggregates"]["a"] and alone["improvement"] == []


def test_unequal_seeds_unfinished_runs_and_missing_tasks_are_left_out_and_said():
    # a has 4 seeds on medium, 3 on expert: its first 3 on both, [1, 2, 3] and [10, 20, 30]; sorted 1 2 3 10 20 30,
    # the IQM drops one each side: (2 + 3 + 10 + 20) / 4 = 8.75
    table = FINAL | {("a", "expert"): [10, 20, 30]}
    found = report.aggregates(summaries(table), "final", REPS, 0, None)
    assert found["seeds"] == {"a": 3, "b": 4} and found["aggregates"]["a"]["IQM"][0] == pytest.approx(8.75)
    assert any("a: 3 seeds on every task, its first ones where it has up to 4" in note for note in found["notes"])
    # b unfinished on expert: the expert task is left out for both, the aggregates are medium's alone
    cells = summaries()
    cells[3]["finished"] = False
    found = report.aggregates(cells, "final", REPS, 0, None)
    assert found["tasks"] == ["medium"] and found["aggregates"]["a"]["IQM"][0] == pytest.approx(2.5)
    assert found["improvement"][0]["probability"] == pytest.approx(0.5)
    assert any("1 unfinished run left out" in note for note in found["notes"])
    assert any("1 task left out, not finished by every algorithm: expert." in note for note in found["notes"])
    # a recorded run of an earlier report.py has no per-seed scores: left out, said so
    del cells[0]["final_scores"]
    found = report.aggregates(cells, "final", REPS, 0, None)
    assert found["tasks"] == [] and found["aggregates"] == {}
    assert any("1 recorded run without per-seed scores" in note for note in found["notes"])


def write_runs(folder: Path) -> None:
    """Two algorithms (iql on the target data, iql on the merged data) x two tasks (medium, expert), 4 seeds each,
    two evaluations: the final scores are FINAL's with a as iql (target) and b as iql (merged)."""
    for index, ((algorithm, quality), final) in enumerate(FINAL.items()):
        args = {"source": "halfcheetah-kinematic", "target": "halfcheetah", "quality": quality, "steps": 20,
                "data": {"a": "target", "b": "merged"}[algorithm]}
        results = {"algo": "iql", "finished": True, "step": 20, "args": args,
                   "evaluations": [{"step": 10, "scores": [0.0] * len(final)}, {"step": 20, "scores": final}]}
        (folder / f"{index}-{algorithm}-{quality}").mkdir(parents=True)  # the report reads them in path order
        (folder / f"{index}-{algorithm}-{quality}" / "results.json").write_text(json.dumps(results))


def test_report_writes_the_section_its_numbers_and_the_plot(tmp_path):
    write_runs(tmp_path / "runs")
    argv = [str(tmp_path / "runs"), "--out", str(tmp_path / "tiny"), "--bootstrap-reps", str(REPS)]
    report.main(argv)
    markdown = (tmp_path / "tiny.md").read_text()
    section = markdown.split("## Aggregates over tasks and seeds")[1]
    assert "Of the final score (last evaluation), over 2 tasks" in section and f"{REPS} stratified-bootstrap" in section
    assert "| algorithm | seeds | IQM | mean | median | optimality gap |" in section
    numbers = json.loads((tmp_path / "tiny.json").read_text())
    statistics = numbers["statistics"]
    low, high = statistics["aggregates"]["iql (target)"]["IQM"][1:]
    assert f"| iql (target) | 4 | 9.2 [{low:.1f}, {high:.1f}] | 13.8 [" in section  # 9.25 and 13.75 rounded
    [pair] = statistics["improvement"]
    assert pair["probability"] == pytest.approx(P_A_OVER_B)
    assert f"| iql (target) | iql (merged) | 0.48 [{pair['low']:.2f}, {pair['high']:.2f}] |" in section
    assert "![aggregate intervals](tiny_intervals.png)" in section
    assert [r["final_scores"] for r in numbers["results"]] == [FINAL[key] for key in
                                                               [("a", "medium"), ("a", "expert"), ("b", "medium"),
                                                                ("b", "expert")]]
    png = (tmp_path / "tiny_intervals.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000

    # the same command again: the same numbers; another seed: other intervals
    report.main(argv)
    assert json.loads((tmp_path / "tiny.json").read_text())["statistics"] == statistics
    report.main(argv + ["--bootstrap-seed", "1"])
    assert json.loads((tmp_path / "tiny.json").read_text())["statistics"]["aggregates"] != statistics["aggregates"]

    # against a baseline, and a baseline that is not there
    report.main(argv + ["--baseline", "iql (merged)", "--aggregate-score", "last5"])
    statistics = json.loads((tmp_path / "tiny.json").read_text())["statistics"]
    assert statistics["score"] == "last5" and [(p["x"], p["y"]) for p in statistics["improvement"]] == [
        ("iql (target)", "iql (merged)")]
    with pytest.raises(SystemExit) as error:
        report.main(argv + ["--baseline", "cql"])
    assert str(error.value) == ("--baseline 'cql' is none of the finished algorithms: iql (target), iql (merged).")


def test_report_of_runs_no_algorithm_finished_has_no_aggregates(tmp_path):
    write_runs(tmp_path / "runs")
    for path in (tmp_path / "runs").rglob("results.json"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"finished": False}))
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "early"), "--bootstrap-reps", str(REPS)])
    section = (tmp_path / "early.md").read_text().split("## Aggregates over tasks and seeds")[1]
    assert "No task has finished runs of every algorithm yet: no aggregates." in section
    assert "Note: 4 unfinished runs left out" in section and "intervals.png" not in section
    assert not (tmp_path / "early_intervals.png").exists()
