"""benchmarks/policy_zoo.py: from a SAC run's snapshots, the expert (of the 3 best logged evaluations, the best
re-measured, then measured again to report), the medium (measured in the
25-65% band, nearest 40%), the replay snapshots before it, the references, the table with its expert bar, and the
learning curves."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import envs.generate as generate
from envs import domain_info

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("policy_zoo", ROOT / "benchmarks" / "policy_zoo.py")
policy_zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(policy_zoo)

# training step -> (return logged during training, re-measured to choose the expert, measured to report)
SNAPSHOTS = {25_000: (300.0, 300.0, 310.0), 50_000: (900.0, 1250.0, 1300.0), 75_000: (1300.0, 650.0, 600.0),
             100_000: (2000.0, 1800.0, 1900.0), 125_000: (3100.0, 2500.0, 3000.0), 150_000: (2900.0, 2950.0, 2800.0)}
RANDOM = 10.0


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "hopper-morph" / "seed0"
    info = domain_info("hopper-morph")
    for step, (logged, _, _) in SNAPSHOTS.items():
        path = run / "snapshots" / f"actor_{step}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = [(info.obs_dim, 4), (4, 4), (4, 2 * info.act_dim)]
        arrays = {f"w{i}": np.full(s, step, np.float32) for i, s in enumerate(sizes)}
        np.savez(path, step=step, eval_return_mean=logged, **arrays,
                 **{f"b{i}": np.zeros(s[1], np.float32) for i, s in enumerate(sizes)})
    (run / "eval.csv").write_text("step,eval_return_mean,eval_return_std\n" + "".join(
        f"{step},{logged},{logged / 10}\n" for step, (logged, _, _) in SNAPSHOTS.items()))
    (run / "args.json").write_text(json.dumps({"env": "hopper-morph", "physics": "papers"}))

    def measured(domain, policy, episodes, seed=10_000, physics="papers"):  # looked up by the snapshot's weights
        assert domain == "hopper-morph" and episodes == 10 and physics == "papers"  # the run's own physics
        if policy.layers is None:
            return RANDOM, 1.0
        step = int(policy.layers[0][0][0, 0])
        if seed == policy_zoo.SELECTION_SEED:
            assert step in (100_000, 125_000, 150_000)  # only the 3 best logged are candidates for expert
            return SNAPSHOTS[step][1], 5.0
        return SNAPSHOTS[step][2], 5.0

    monkeypatch.setattr(policy_zoo, "policy_return", measured)
    monkeypatch.setattr(policy_zoo, "POLICY_DIR", tmp_path / "policies")
    monkeypatch.setattr(policy_zoo, "NOTES", {})  # the real zoo's notes left out
    monkeypatch.setattr(policy_zoo, "OLD_ZOO_NOTES", {})
    monkeypatch.setattr(policy_zoo, "REFERENCES", tmp_path / "references.json")
    results = tmp_path / "results"
    for name in ("RESULTS", "TABLE", "TABLE_JSON", "CURVES"):
        monkeypatch.setattr(policy_zoo, name, results / getattr(policy_zoo, name).name if name != "RESULTS" else results)
    return tmp_path


def test_zoo_picks_expert_medium_and_replay_and_writes_table_and_curves(zoo):
    stale = zoo / "policies" / "hopper-morph" / "replay" / "actor_999.npz"  # of an earlier zoo: removed
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    policy_zoo.main(["--runs", str(zoo / "runs"), "--domains", "hopper-morph"])
    folder = zoo / "policies" / "hopper-morph"
    # expert: of the 3 best logged (125k 3100, 150k 2900, 100k 2000), the best re-measured: 150k (2950 > 2500 >
    # 1800), reported as measured again: 2800. Medium: candidates by logged return nearest 40% of 2800: 75k (46%)
    # measures (600 - 10) / (2800 - 10) = 21%, out of the band; then 50k (32%): 1290 / 2790 = 46%, in it
    with np.load(folder / "expert.npz") as expert, np.load(folder / "medium.npz") as medium:
        assert int(expert["step"]) == 150_000 and int(medium["step"]) == 50_000
    assert sorted(p.name for p in (folder / "replay").iterdir()) == ["actor_25000.npz"]
    refs = json.loads((zoo / "references.json").read_text())["hopper-morph"]
    assert (refs["random"], refs["expert"]) == (RANDOM, 2800.0)
    table = json.loads((zoo / "results" / "policies.json").read_text())["hopper-morph"]
    assert table["curve"] == [[step, logged, logged / 10] for step, (logged, _, _) in SNAPSHOTS.items()]
    markdown = (zoo / "results" / "policies.md").read_text()
    # OTDF's hopper-morph expert 3153, 2800 / 3153 = 89%, the bar 85% of it; the run folder and its steps trained
    assert ("| hopper-morph | expert | 150000 | 2800.0 +- 5.0 | 100 | 3153 (OTDF) | 89% | 2680: reached | papers | "
            "seed0 (150k) |") in markdown
    assert "| hopper-morph | medium | 50000 | 1300.0 +- 5.0 | 46 | - | - | - | papers | - |" in markdown
    assert refs["source"].endswith("papers physics)")
    assert "Notes:" not in markdown
    assert (zoo / "results" / "policies.png").read_bytes()[:4] == b"\x89PNG"
    assert policy_zoo.expert_bar("hopper") == 2750 and policy_zoo.expert_bar("ant-morph") == 4860  # 85% of anchors
    assert policy_zoo.expert_bar("hopper-gravity-0.5") == pytest.approx(0.6 * 2750)  # no anchor: 60% of the task's
    assert generate.POLICY_DIR != policy_zoo.POLICY_DIR  # the real zoo untouched


def test_table_shows_a_domains_note_while_the_domain_is_in_it(zoo, monkeypatch):
    monkeypatch.setattr(policy_zoo, "NOTES", {"hopper-morph": "plateau, see the curve", "ant": "not in the table"})
    policy_zoo.main(["--runs", str(zoo / "runs"), "--domains", "hopper-morph"])
    markdown = (zoo / "results" / "policies.md").read_text()
    assert markdown.endswith("Notes:\n\n- **hopper-morph**: plateau, see the curve\n")


def test_replay_snapshots_are_evenly_spaced_and_capped():
    steps = list(range(25_000, 325_000, 25_000))  # 12 snapshots before a medium policy at 325k
    # linspace(0, 11, 5) = 0, 2.75, 5.5, 8.25, 11 -> indices 0, 3, 6, 8, 11
    assert policy_zoo.evenly_spaced(steps, 5) == [25_000, 100_000, 175_000, 225_000, 300_000]
    assert policy_zoo.evenly_spaced(steps[:4], 5) == steps[:4]
    assert policy_zoo.evenly_spaced(steps, 1) == [25_000]


def test_a_fine_tuned_run_is_named_and_its_replay_starts_with_the_loaded_actor(zoo):
    run = zoo / "runs" / "hopper-morph" / "seed0"
    prefix = "state.actor.params['params']"
    start = {f"{prefix}['fc{i}']['{param}']": np.full(shape, 7.0 + i, np.float32)
             for i, (rows, cols) in enumerate([(11, 4), (4, 4), (4, 6)])
             for param, shape in (("kernel", (rows, cols)), ("bias", (cols,)))}
    np.savez(zoo / "source.npz", **start)  # the checkpoint sac.py --init-from loaded (its actor only, here)
    (run / "args.json").write_text(json.dumps({"env": "hopper-morph", "init_from": str(zoo / "source.npz"),
                                               "physics": "papers"}))
    policy_zoo.main(["--runs", str(zoo / "runs"), "--domains", "hopper-morph"])
    replay = zoo / "policies" / "hopper-morph" / "replay"
    assert sorted(p.name for p in replay.iterdir()) == ["actor_0.npz", "actor_25000.npz"]
    with np.load(replay / "actor_0.npz") as actor:
        assert int(actor["step"]) == 0
        for i in range(3):
            np.testing.assert_array_equal(actor[f"w{i}"], start[f"{prefix}['fc{i}']['kernel']"])
            np.testing.assert_array_equal(actor[f"b{i}"], start[f"{prefix}['fc{i}']['bias']"])
    markdown = (zoo / "results" / "policies.md").read_text()
    assert f"| 2680: reached | papers | seed0 (150k), fine-tuned from {zoo.parent.name}/{zoo.name} |" in markdown
    assert json.loads((zoo / "results" / "policies.json").read_text())["hopper-morph"]["init_from"] == \
        str(zoo / "source.npz")

    (zoo / "source.npz").unlink()
    with pytest.raises(SystemExit, match="which is gone"):
        policy_zoo.main(["--runs", str(zoo / "runs"), "--domains", "hopper-morph"])


def test_progress_table_of_the_runs(zoo, tmp_path):
    """--progress: each run's steps, last and best logged evaluation, best snapshot and bar, for deciding harvests."""
    out = tmp_path / "progress.md"
    policy_zoo.main(["--runs", str(zoo / "runs"), "--progress", str(out)])
    assert "| hopper-morph | papers | 150,000 | 2900 | 3100 (125k) | 3100 (125k) | 2680 |" in out.read_text()


def test_zoo_carry_keeps_the_networks_of_unfinished_runs_only(tmp_path):
    """benchmarks/zoo_carry.py: an unfinished run's networks without its replay buffer; a harvested domain's file
    goes; a run from scratch does not replace a longer carried one, a run fine-tuned from it does."""
    spec_carry = importlib.util.spec_from_file_location("zoo_carry", ROOT / "benchmarks" / "zoo_carry.py")
    zoo_carry = importlib.util.module_from_spec(spec_carry)
    spec_carry.loader.exec_module(zoo_carry)
    runs, out = tmp_path / "runs", tmp_path / "carry"

    def checkpoint(domain, step, init_from=None):
        folder = runs / domain / "seed0"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "checkpoint.npz", **{"state.actor.params['w']": np.full((2, 2), step, np.float32),
                                               "buffer/observations": np.zeros((1000, 3), np.float32),
                                               "args": json.dumps({"env": domain, "init_from": init_from}),
                                               "step": np.array(step), "history": "[]"})

    checkpoint("hopper", 400_000)
    checkpoint("ant", 300_000)
    (out / "x").parent.mkdir(parents=True)
    np.savez(out / "walker2d.npz", step=np.array(1))  # carried earlier, harvested since
    (runs / "walker2d").mkdir()
    (runs / "walker2d" / "HARVESTED").touch()
    written = zoo_carry.carry(runs, out)
    assert [w.split()[0] for w in written] == ["ant", "hopper"] and not (out / "walker2d.npz").exists()
    with np.load(out / "hopper.npz") as kept:
        assert sorted(kept.files) == ["args", "history", "state.actor.params['w']", "step"]
        assert int(kept["step"]) == 400_000 and kept["state.actor.params['w']"][0, 0] == 400_000
    checkpoint("hopper", 20_000)  # a fresh run from scratch on another machine: the longer carry stays
    zoo_carry.carry(runs, out)
    with np.load(out / "hopper.npz") as kept:
        assert int(kept["step"]) == 400_000
    checkpoint("hopper", 20_000, init_from=str(out / "hopper.npz"))  # continued from the carry: replaces it
    zoo_carry.carry(runs, out)
    with np.load(out / "hopper.npz") as kept:
        assert int(kept["step"]) == 20_000


def test_zoo_carry_keeps_the_networks_other_domains_start_from(tmp_path):
    """zoo_carry.py --sources: a harvested domain's networks (no replay buffer) in <out>/from/, for zoo_retrain.sh's
    <domain>@<source> on a machine without its run folder; a domain with no run ends in one sentence."""
    spec_carry = importlib.util.spec_from_file_location("zoo_carry", ROOT / "benchmarks" / "zoo_carry.py")
    zoo_carry = importlib.util.module_from_spec(spec_carry)
    spec_carry.loader.exec_module(zoo_carry)
    runs, out = tmp_path / "runs", tmp_path / "carry"
    folder = runs / "ant-morph" / "seed0"
    folder.mkdir(parents=True)
    np.savez(folder / "checkpoint.npz", **{"state.actor.params['w']": np.full((2, 2), 7.0, np.float32),
                                           "buffer/observations": np.zeros((1000, 3), np.float32),
                                           "args": json.dumps({"env": "ant-morph"}), "step": np.array(625_000),
                                           "history": "[]"})
    (runs / "ant-morph" / "HARVESTED").touch()
    assert zoo_carry.carry(runs, out) == []  # harvested: not carried as an unfinished run
    assert zoo_carry.carry_sources(runs, ["ant-morph"], out)[0].startswith("from/ant-morph (625,000 steps")
    with np.load(out / "from" / "ant-morph.npz") as kept:
        assert sorted(kept.files) == ["args", "history", "state.actor.params['w']", "step"]
        assert kept["state.actor.params['w']"][0, 0] == 7.0
    zoo_carry.carry(runs, out)  # the harvested domain's own carry goes, its kept networks stay
    assert (out / "from" / "ant-morph.npz").exists()
    with pytest.raises(SystemExit, match="^--sources hopper: .* does not exist; name a domain trained under --runs.$"):
        zoo_carry.carry_sources(runs, ["hopper"], out)
