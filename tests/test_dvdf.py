"""algos/dvdf.py: the filter and the weighted IQL losses against numbers worked out by hand, a (lam, xi, seed) grid in
one vmapped program equals separate runs, the stages equal what sql_pretrain.py and igdf_scorer.py make and their
artefacts are accepted, the stages are cached (a sweep trains them once) and resume, and a tiny end-to-end run
writes a well-formed results.json with the filter's diagnostics. Whether DVDF beats IGDF is a benchmark."""
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import envs.diagnostics
from envs import load_dataset, run
from synthetic import assert_one_sentence_exit

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"algos_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds a class's file through sys.modules
    spec.loader.exec_module(module)
    return module


dvdf, sql, igdf, iql = _load("dvdf"), _load("sql_pretrain"), _load("igdf_scorer"), _load("iql")

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah
REF_MIN, REF_MAX = -300.0, 3000.0


# ---------------------------------------------------------------- the filter, by hand
def test_normalise_advantage_is_the_batch_min_max():
    advantage = jnp.array([1.0, 3.0, -1.0, 0.0])  # min -1, max 3: (A + 1) / (4 + 1e-8)
    np.testing.assert_allclose(dvdf.normalise_advantage(advantage), [0.5, 1.0, 0.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(dvdf.normalise_advantage(jnp.full(4, 2.0)), 0.0)  # constant batch: 0, not NaN


def test_filter_score_by_hand():
    h = jnp.array([0.9, -0.2, 0.5, 0.1])
    advantage = jnp.array([1.0, 3.0, -1.0, 0.0])  # Norm(A) = [0.5, 1, 0, 0.25]
    # g = 0.7 h + 0.3 Norm(A) = [0.63 + 0.15, -0.14 + 0.3, 0.35 + 0, 0.07 + 0.075]
    np.testing.assert_allclose(dvdf.filter_score(h, advantage, 0.7), [0.78, 0.16, 0.35, 0.145], rtol=1e-5)


@pytest.mark.parametrize("xi", [0.1, 0.3, 0.5, 0.7, 1.0])
def test_filter_keeps_exactly_int_b_xi_samples_top_by_g(xi):
    score = np.random.default_rng(int(xi * 10)).normal(size=128).astype(np.float32)
    k = dvdf.keep_count(128, xi)
    assert k == int(128 * xi)
    keep = np.asarray(jax.jit(dvdf.keep_mask)(jnp.array(score), k))  # keep_count traced
    assert keep.shape == (128,) and keep.sum() == k
    assert set(np.flatnonzero(keep)) == set(np.argsort(-score)[:k])
    if 0 < k < 128:
        assert score[keep == 1].min() > score[keep == 0].max()


def test_keep_count_can_differ_per_vmapped_run_and_ties_go_to_the_lower_index():
    score = jnp.array([1.0, 0.0, 1.0, 1.0, 0.5])
    masks = jax.vmap(dvdf.keep_mask, in_axes=(None, 0))(score, jnp.array([1, 2, 4]))
    np.testing.assert_array_equal(masks, [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 1]])


def test_keep_count_is_pythons_int_of_b_times_xi():
    assert dvdf.keep_count(10, 0.7) == 7  # float32 10 * 0.7 is 6.9999995
    assert dvdf.keep_count(128, 0.5) == 64 and dvdf.keep_count(128, 0.3) == 38


def test_lam_1_ranks_by_h_alone_and_lam_0_by_the_advantage_alone():
    rng = np.random.default_rng(0)
    h, advantage = rng.uniform(-1, 1, 64).astype(np.float32), rng.normal(size=64).astype(np.float32) * 5
    by_h, by_advantage = set(np.argsort(-h)[:20]), set(np.argsort(-advantage)[:20])
    assert by_h != by_advantage
    for lam, expected in ((1.0, by_h), (0.0, by_advantage)):
        keep = dvdf.keep_mask(dvdf.filter_score(jnp.array(h), jnp.array(advantage), lam), 20)
        assert set(np.flatnonzero(keep)) == expected
    mixed = dvdf.keep_mask(dvdf.filter_score(jnp.array(h), jnp.array(advantage), 0.5), 20)
    assert set(np.flatnonzero(mixed)) not in (by_h, by_advantage)


def test_q_weights_by_hand():
    h = jnp.array([0.0, 1.0, -1.0, 0.5])
    score = jnp.array([0.3, 0.9, 0.2, -0.1])
    keep = jnp.array([1.0, 0.0, 1.0, 0.0])
    # exp(h) on kept source, 0 on dropped source, 1 on the 2 target samples
    np.testing.assert_allclose(dvdf.q_weights(h, score, keep, 2, "exp_h"), [1.0, 0.0, math.exp(-1), 0.0, 1.0, 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose(dvdf.q_weights(h, score, keep, 2, "g_indicator"), [0.3, 0.0, 0.2, 0.0, 1.0, 1.0],
                               rtol=1e-6)


# ---------------------------------------------------------------- weighted IQL losses over kept source + target
Q = np.array([[1.0, 2.0, 3.0, 4.0, 0.0, 1.0],
              [0.0, 2.5, 3.0, 5.0, 1.0, 1.0]])
Y = np.array([1.0, 2.0, 2.0, 2.0, 0.0, 3.0])
MASK = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # 4 source samples (the second dropped) + 2 target samples
WEIGHT = np.array([2.0, 0.0, 0.5, 1.0, 1.0, 1.0])


def test_weighted_critic_loss_by_hand():
    # per sample, summed over critics: [1, 0.25, 2, 13, 1, 8]; kept: weight * loss = [2, -, 1, 13, 1, 8]
    # mean over the 5 kept samples (not over all 6): 25 / 5
    loss = dvdf.weighted_critic_loss(jnp.array(Q), jnp.array(Y), jnp.array(WEIGHT), jnp.array(MASK))
    assert float(loss) == pytest.approx(25 / 5, rel=1e-6)
    with pytest.raises(AssertionError):  # [B, 1] weights against [B] losses: IGDF's scalar-weight bug
        dvdf.weighted_critic_loss(jnp.array(Q), jnp.array(Y), jnp.array(WEIGHT)[:, None], jnp.array(MASK))


def test_masked_losses_equal_the_authors_concatenate_and_mean():
    """Masking dropped samples out of a mean over the whole batch is exactly a mean over the gathered kept ones."""
    rng = np.random.default_rng(0)
    kept = MASK == 1
    v, target_q = rng.normal(size=6), rng.normal(size=6)
    loss, _ = dvdf.value_loss(jnp.array(v), jnp.array(target_q), 0.7, jnp.array(MASK))
    assert float(loss) == pytest.approx(float(iql.value_loss(jnp.array(v[kept]), jnp.array(target_q[kept]), 0.7)[0]),
                                        rel=1e-6)
    loss = dvdf.weighted_critic_loss(jnp.array(Q), jnp.array(Y), jnp.array(WEIGHT), jnp.array(MASK))
    assert float(loss) == pytest.approx(float(iql.critic_loss(jnp.array(Q[:, kept]), jnp.array(Y[kept]),
                                                              jnp.array(WEIGHT[kept]))), rel=1e-6)
    mean, actions, weight = rng.uniform(-1, 1, (6, 2)), rng.uniform(-1, 1, (6, 2)), rng.uniform(0, 3, 6)
    loss = dvdf.deterministic_actor_loss(jnp.array(mean), jnp.array(actions), jnp.array(weight), jnp.array(MASK))
    expected = iql.deterministic_actor_loss(jnp.array(mean[kept]), jnp.array(actions[kept]), jnp.array(weight[kept]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    log_std = jnp.array([0.0, -0.5])
    loss = dvdf.gaussian_actor_loss(jnp.array(mean), log_std, jnp.array(actions), jnp.array(weight), jnp.array(MASK))
    expected = iql.gaussian_actor_loss(jnp.array(mean[kept]), log_std, jnp.array(actions[kept]),
                                       jnp.array(weight[kept]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------- the training step, on tiny random data
def _transitions(rng, shape, obs_dim=3, act_dim=2):
    return dvdf.Transitions(
        observations=rng.normal(size=(*shape, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (*shape, act_dim)).astype(np.float32),
        rewards=rng.normal(size=shape).astype(np.float32),
        next_observations=rng.normal(size=(*shape, obs_dim)).astype(np.float32),
        terminals=(rng.uniform(size=shape) < 0.1).astype(np.float32))


def _frozen(hidden=(8,), repr_dim=4):
    obs, action = jnp.zeros((1, 3)), jnp.zeros((1, 2))
    keys = jax.random.split(jax.random.PRNGKey(42), 3)
    return dvdf.Frozen(dvdf.TwinCritic(hidden).init(keys[0], obs, action), dvdf.ValueNet(hidden).init(keys[1], obs),
                       dvdf.Scorer(hidden, repr_dim).init(keys[2], obs, action, obs))


def _hparams(lams, counts, seed_indices):
    n = len(lams)
    return dvdf.Hyperparams(jnp.full(n, 0.7), jnp.full(n, 3.0), jnp.array(lams, jnp.float32),
                            jnp.array(counts, jnp.int32), jnp.array(seed_indices, jnp.int32))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    source = _transitions(rng, (300,))
    labels = (rng.integers(0, 2, 300).astype(np.int32),)  # one metadata key with 2 values
    data = jax.device_put(dvdf.Data(source, labels, _transitions(rng, (2, 40))))
    return data, _frozen()


def test_weights_enter_the_q_loss_only(tiny):
    data, frozen = tiny
    after, runner = {}, None
    hparams = jax.tree.map(lambda x: x[0], _hparams([0.5], [4], [0]))
    for weighting in ("exp_h", "g_indicator"):
        args = dvdf.Args(hidden=(8, 8), batch_size=16, steps=10, weighting=weighting)
        init, train = dvdf.make_train(args, 3, 2, (8,), (8,), 4, (("quality", 2),))
        runner = runner or jax.jit(init)(jax.random.PRNGKey(0))  # the same start for both
        after[weighting], _ = jax.jit(lambda r: train(r, data, frozen, hparams, 1))(runner)
    exp_h, g_indicator = after["exp_h"].state, after["g_indicator"].state
    for same in ("value", "actor"):  # V and actor losses are unweighted: the same step whatever the Q weights
        for a, b in zip(jax.tree.leaves(getattr(exp_h, same).params),
                        jax.tree.leaves(getattr(g_indicator, same).params)):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exp_h.critic.params),
                                                       jax.tree.leaves(g_indicator.critic.params)))


def test_grid_runs_are_independent_of_their_place_and_diagnostics_follow_the_filter(tiny):
    """Each run of the vmapped grid depends on its own (lam, kept count, seed) only: reordering the runs reorders
    the results. (That a vmapped run equals a 1-run program is tested for the same structure in test_iql.py.)"""
    data, frozen = tiny
    args = dvdf.Args(hidden=(8, 8), batch_size=16, steps=30)
    init, train = dvdf.make_train(args, 3, 2, (8,), (8,), 4, (("quality", 2),))
    # four runs of a flat grid axis, each with its own lam, kept count and seed (5 + k)
    grid = [(0.0, 0.25, 0), (0.0, 0.5, 1), (1.0, 0.25, 1), (1.0, 0.5, 0)]
    hparams = _hparams([g[0] for g in grid], [dvdf.keep_count(8, g[1]) for g in grid], [g[2] for g in grid])
    start = jax.jit(jax.vmap(init))(jnp.stack([jax.random.PRNGKey(5 + g[2]) for g in grid]))
    many = jax.jit(jax.vmap(lambda r, h: train(r, data, frozen, h, 30)))
    runner, (losses, sums) = many(start, hparams)
    order = np.array([3, 0, 2, 1])
    shuffled, (shuffled_losses, _) = many(*jax.tree.map(lambda x: x[order], (start, hparams)))
    for a, b in zip(jax.tree.leaves(runner), jax.tree.leaves(shuffled), strict=True):
        np.testing.assert_allclose(a[order], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses["critic_loss"][order], shuffled_losses["critic_loss"], rtol=1e-5)
    assert not np.allclose(losses["critic_loss"][0], losses["critic_loss"][1:])  # and the runs differ

    diagnostics = envs.diagnostics.filter_diagnostics(sums, {"quality": ["expert", "random"]}, 30, 8)
    np.testing.assert_allclose(diagnostics["kept_fraction"], [0.25, 0.5, 0.25, 0.5])
    for i, (lam, _, _) in enumerate(grid):
        kept_better = "dynamics_score" if lam == 1.0 else "advantage"  # what the filter ranks by
        assert diagnostics[f"{kept_better}_kept"][i] > diagnostics[f"{kept_better}_dropped"][i]
        shares = diagnostics["kept_share"]["quality"]
        assert float(shares["expert"][i] + shares["random"][i]) == pytest.approx(1.0)
        batch = diagnostics["batch_share"]["quality"]
        rates = diagnostics["keep_rate"]["quality"]
        assert sum(batch[n][i] * rates[n][i] for n in ("expert", "random")) == pytest.approx(
            float(diagnostics["kept_fraction"][i]))
    assert np.isfinite(losses["critic_loss"]).all()


def test_episode_groups_label_each_transition_by_its_episode():
    class Fake:
        episode_metadata = ({"quality": "expert", "domain": "a"}, {"quality": "random"}, {"quality": "expert"})
        episode_ids = np.array([0, 0, 1, 2, 2])

    groups = envs.diagnostics.episode_groups(Fake)
    assert groups["quality"][0] == ["expert", "random"]
    np.testing.assert_array_equal(groups["quality"][1], [0, 0, 1, 0, 0])
    assert groups["domain"][0] == ["a", "unknown"]
    np.testing.assert_array_equal(groups["domain"][1], [0, 0, 1, 1, 1])


def test_shared_helpers_are_identical_copies():
    shared = {
        (dvdf, sql, iql): ["MLP", "TwinCritic", "ValueNet", "Actor", "critic_loss"],
        (dvdf, iql): ["expectile_loss", "advantage_weight"],
        (sql, iql): ["deterministic_actor_loss", "gaussian_actor_loss", "make_policy"],
        (dvdf, sql): ["sql_value_loss", "default_alpha", "reward_scale_of"],
        (dvdf, igdf): ["Scorer", "ScorerRunner", "ScorerData", "nce_loss", "dynamics_score", "make_scorer_train",
                       "make_score_fn"],
    }
    for modules, names in shared.items():
        for name in names:
            sources = {inspect.getsource(getattr(module, name)) for module in modules}
            assert len(sources) == 1, f"{name} differs between {[m.__name__ for m in modules]}"
    # the harness and the diagnostics are not copied: what dvdf.py uses of them is envs/'s own
    harness = {run: ["write_atomic", "package_versions", "run_flags", "open_run", "run_shardings", "fingerprint",
                     "dataset_arrays", "cache_key", "read_artifact", "stage_chunk", "run_stage", "cached_stage",
                     "save_stage", "divergence", "LOSS_LIMIT", "STAGE_CHUNKS", "STAGE_SAVE_SECONDS",
                     "evaluation_entry", "grid_evaluation_entry", "load_source_target", "datasets_line", "grid_level",
                     "make_grid_evaluate", "settings_line", "train_grid"],
               envs.diagnostics: ["holdout_split", "held_out", "separation_auc", "held_out_separation",
                                  "HOLDOUT_MAX", "SOURCE_HOLDOUT_SEED", "GROUP_KEYS", "episode_groups",
                                  "filter_diagnostics", "filter_sums"]}
    for module, names in harness.items():
        for name in names:
            assert getattr(dvdf, name, getattr(module, name)) is getattr(module, name), f"dvdf.py copies {name}"


# ---------------------------------------------------------------- end to end through main()
def _write_d4rl(path: Path, rng, n: int, shift: float, ref=None, qualities=None):
    observations = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file["observations"] = observations
        file["actions"] = actions
        file["rewards"] = rng.normal(size=n).astype(np.float32)
        file["next_observations"] = observations + 0.1 * actions.sum(1, keepdims=True) + shift
        file["terminals"] = np.zeros(n, dtype=bool)
        file["timeouts"] = (np.arange(n) % 100 == 99)
        if ref is not None:
            file.attrs["ref_min_score"], file.attrs["ref_max_score"] = ref
        if qualities is not None:
            file.attrs["episode_metadata"] = json.dumps(
                [{"domain": "halfcheetah-kinematic", "quality": qualities[i % len(qualities)], "policy": "p"}
                 for i in range(n // 100)])
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("dvdf_data"), np.random.default_rng(0)
    return {"source": _write_d4rl(folder / "source.hdf5", rng, 2000, 0.5, qualities=("random", "expert")),
            "target": _write_d4rl(folder / "target.hdf5", rng, 1000, 0.0, ref=(REF_MIN, REF_MAX)),
            "cache": str(folder / "cache")}


STAGE_FLAGS = ["--seed", "3", "--hidden", "16", "16", "--sql-steps", "100", "--scorer-steps", "50",
               "--scorer-batch-size", "16", "--repr-dim", "8", "--target-size", "200"]


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--cache-dir", datasets["cache"], "--steps", "200", "--eval-every", "100", "--eval-episodes", "1",
            "--num-seeds", "2", "--batch-size", "32", "--lam", "0.5", "1.0", "--references", "zoo", *STAGE_FLAGS,
            *extra]


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("dvdf_run")
    return out, dvdf.main(_flags(datasets, out))


def test_end_to_end_results_json(finished_run, datasets):
    out, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "dvdf" and results["finished"] and results["step"] == 200
    assert results["args"]["lam"] == [0.5, 1.0] and results["args"]["xi"] == [0.5]
    assert results["grid"] == [{"lam": lam, "xi": 0.5, "seed": seed, "keep_count": 8}
                               for lam in (0.5, 1.0) for seed in (3, 4)]
    assert results["data"]["source_groups"] == {"quality": ["expert", "random"], "domain": ["halfcheetah-kinematic"]}
    stages = results["stages"]
    assert stages["sql"]["origin"] == stages["scorer"]["origin"] == "trained"
    assert 0.0 <= stages["scorer"]["separation"]["auc"][0] <= 1.0
    assert Path(stages["sql"]["path"]).parent == Path(datasets["cache"])

    assert [e["step"] for e in results["evaluations"]] == [100, 200]
    for evaluation in results["evaluations"]:
        assert len(evaluation["scores"]) == 4 and all(map(math.isfinite, evaluation["scores"]))
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        assert [(s["lam"], s["xi"]) for s in evaluation["by_setting"]] == [(0.5, 0.5), (1.0, 0.5)]
        assert evaluation["by_setting"][1]["score_mean"] == pytest.approx(float(np.mean(evaluation["scores"][2:])))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
        diagnostics = evaluation["filter"]
        assert diagnostics["kept_fraction"] == [0.5] * 4
        for name in ("dynamics_score", "advantage", "filter_score"):
            assert all(math.isfinite(x) for x in diagnostics[f"{name}_kept"] + diagnostics[f"{name}_dropped"])
        for i in range(4):
            assert sum(share[i] for share in diagnostics["kept_share"]["quality"].values()) == pytest.approx(1.0)
            assert diagnostics["kept_share"]["domain"]["halfcheetah-kinematic"][i] == pytest.approx(1.0)
            if results["grid"][i]["lam"] == 1.0:  # IGDF keeps the top half by h
                assert diagnostics["dynamics_score_kept"][i] > diagnostics["dynamics_score_dropped"][i]
    final = results["final"]
    assert final["scores"] == results["evaluations"][-1]["scores"] and final["score_mean"] is None
    assert len(final["by_setting"]) == 2
    assert results["timing"]["updates_per_second"] == pytest.approx(4 * results["timing"]["steps_per_second"])
    assert (out / "checkpoint.msgpack").exists() and not list(out.glob("*.tmp"))
    # the two stages, their descriptions and their (released) locks; no partial left
    assert sorted(path.suffix for path in Path(datasets["cache"]).iterdir()) == [".json", ".json", ".lock", ".lock",
                                                                                ".msgpack", ".msgpack"]


def test_resume_uses_the_cached_stages_and_ends_bit_for_bit(datasets, finished_run, tmp_path, monkeypatch):
    out, calls = tmp_path / "interrupted", []
    real_evaluate = run.evaluate  # the grid's evaluation is envs/run.py's make_grid_evaluate

    def killed_during_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # one evaluate per (lam, xi) setting: the third is the second evaluation's first
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate", killed_during_second_evaluation)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        dvdf.main(_flags(datasets, out))
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["step"] == 100 and not interrupted["finished"]
    # a second run with the same stage inputs trains no stage: both come from the cache
    assert interrupted["stages"]["sql"]["origin"] == interrupted["stages"]["scorer"]["origin"] == "cache"
    monkeypatch.setattr(run, "evaluate", real_evaluate)
    with pytest.raises(SystemExit, match="--resume"):
        dvdf.main(_flags(datasets, out))
    with pytest.raises(SystemExit, match="--xi"):
        dvdf.main(_flags(datasets, out, "--resume", "--xi", "0.25"))
    resumed = dvdf.main(_flags(datasets, out, "--resume"))
    saved = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    reference = serialization.msgpack_restore((finished_run[0] / "checkpoint.msgpack").read_bytes())
    for leaf, reference_leaf in zip(jax.tree.leaves(saved["runner"]), jax.tree.leaves(reference["runner"]),
                                    strict=True):
        np.testing.assert_array_equal(leaf, reference_leaf)
    assert resumed["final"]["scores"] == finished_run[1]["final"]["scores"]
    assert resumed["evaluations"][-1]["filter"] == finished_run[1]["evaluations"][-1]["filter"]


@pytest.mark.parametrize("stage", ["sql", "scorer"])
def test_resume_continues_a_run_cut_off_in_a_pre_training_stage(stage, datasets, tmp_path, monkeypatch, capsys):
    """Issue 23 case 6: a run killed in its SQL or scorer stage (before any checkpoint) is continued by --resume,
    as the README tells job-array users: the stage resumes from its partial file, and the run finishes."""
    out, flags = tmp_path / "run", _flags(datasets, tmp_path / "run")
    flags[flags.index("--cache-dir") + 1] = str(tmp_path / "cache")  # stages not cached yet
    monkeypatch.setattr(run, "STAGE_CHUNKS", (25,))  # SQL runs 4 chunks, the scorer 2
    real_write = run.write_atomic

    def killed_after_the_stages_first_chunk(path, content):
        real_write(path, content)
        if path.name.startswith(f"{stage}-") and path.name.endswith(".partial.msgpack"):
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_atomic", killed_after_the_stages_first_chunk)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        dvdf.main(flags)
    assert not (out / "checkpoint.msgpack").exists()
    monkeypatch.setattr(run, "write_atomic", real_write)
    capsys.readouterr()
    resumed = dvdf.main([*flags, "--resume"])
    printed = capsys.readouterr().out
    assert "--resume found no checkpoint" in printed and "resuming from step 25" in printed
    assert resumed["finished"] and resumed["stages"][stage]["origin"] == "trained"
    assert resumed["stages"]["sql"]["step"] == 100 and resumed["stages"]["scorer"]["step"] == 50


def test_stages_equal_the_standalone_scripts_whose_artifacts_are_accepted(datasets, finished_run, tmp_path):
    sql.main(["--source-dataset", datasets["source"], "--out", str(tmp_path / "sql"), "--steps", "100",
              "--eval-every", "100", "--no-policy", "--seed", "3", "--hidden", "16", "16"])
    igdf.main(["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out",
               str(tmp_path / "scorer"), "--steps", "50", "--eval-every", "50", "--seed", "3", "--hidden", "16", "16",
               "--repr-dim", "8", "--batch-size", "16", "--target-size", "200"])
    stages = finished_run[1]["stages"]
    for name in ("sql", "scorer"):
        made = serialization.msgpack_restore((tmp_path / name / f"{name}.msgpack").read_bytes())
        cached = serialization.msgpack_restore(Path(stages[name]["path"]).read_bytes())
        for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(cached), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # the artefacts as dvdf.py's --sql-artifact (the file) and --scorer-artifact (its folder)
    source, target = load_dataset(datasets["source"]), load_dataset(datasets["target"])
    args = dvdf.Args(sql_artifact=str(tmp_path / "sql" / "sql.msgpack"), scorer_artifact=str(tmp_path / "scorer"))
    sql_params, sql_info = dvdf.sql_stage(args, source, OBS_DIM, ACT_DIM)
    scorer_params, scorer_info = dvdf.scorer_stage(args, source, target, OBS_DIM, ACT_DIM)
    assert sql_info["origin"] == scorer_info["origin"] == "artifact" and sql_info["hidden"] == [16, 16]
    made = serialization.msgpack_restore((tmp_path / "sql" / "sql.msgpack").read_bytes())
    for a, b in zip(jax.tree.leaves(sql_params), jax.tree.leaves(made), strict=True):
        np.testing.assert_array_equal(a, b[0])  # the first seed's
    assert jax.tree.leaves(scorer_params)[0].ndim == 1  # unstacked: the bias of the first layer
    with pytest.raises(SystemExit, match="--sql-artifact .* is not an artefact"):
        dvdf.sql_stage(dvdf.Args(sql_artifact=str(tmp_path / "missing.msgpack")), source, OBS_DIM, ACT_DIM)
    with pytest.raises(SystemExit, match="holds a 'scorer' artefact"):
        dvdf.sql_stage(dvdf.Args(sql_artifact=str(tmp_path / "scorer" / "scorer.msgpack")), source, OBS_DIM, ACT_DIM)
    with pytest.raises(SystemExit, match="observation/action sizes 17/6, but the datasets here have 11/3"):
        dvdf.sql_stage(args, source, 11, 3)


def test_lam_1_is_igdf():
    assert dvdf.algo_name(dvdf.Args(lam=(1.0,))) == "igdf" and dvdf.algo_name(dvdf.Args(lam=(0.7, 1.0))) == "dvdf"


class _Toy(NamedTuple):
    total: jax.Array
    rng: jax.Array


def _toy_train(runner: _Toy, scale, num_steps: int):
    """A stand-in for a stage's train: a random walk whose end depends on every step's rng."""
    def step(runner, _):
        rng, key = jax.random.split(runner.rng)
        return _Toy(runner.total + scale * jax.random.normal(key), rng), runner.total

    runner, totals = jax.lax.scan(step, runner, None, length=num_steps)
    return runner, {"total": totals.mean()}


@pytest.mark.parametrize("remaining, seconds_per_step, expected", [
    (50_000, None, 100),      # speed unknown: the smallest chunk first
    (50_000, 0.5, 100),       # 100 steps take 50 s, 1,000 would take 500 s
    (50_000, 2.0, 100),       # slower than a minute per 100 steps: still the smallest
    (50_000, 0.01, 1_000),    # 1,000 take 10 s, 10,000 would take 100 s
    (50_000, 0.006, 10_000),  # 10,000 take 60 s: at the limit
    (50_000, 1e-5, 10_000),   # never more than the largest size
    (2_500, 1e-5, 1_000),     # the largest size that fits what is left
    (900, 1e-5, 100),
    (40, 1e-5, 40),           # a remainder below the smallest size runs at once
    (40, None, 40),
])
def test_stage_chunks_follow_the_measured_speed(remaining, seconds_per_step, expected):
    assert run.STAGE_CHUNKS == (100, 1_000, 10_000) and run.STAGE_SAVE_SECONDS == 60.0
    assert run.stage_chunk(remaining, seconds_per_step) == expected


def test_a_slow_stage_saves_after_its_first_small_chunk(tmp_path, monkeypatch):
    start = _Toy(jnp.zeros(1), jax.random.PRNGKey(0)[None])
    saved_steps = []
    real_write = run.write_atomic

    def record(path, content):
        saved_steps.append(int(serialization.msgpack_restore(content)["step"]))
        real_write(path, content)

    monkeypatch.setattr(run, "write_atomic", record)
    monkeypatch.setattr(run, "STAGE_SAVE_SECONDS", 0.0)  # every chunk is "slow": all stay at the smallest size
    run.run_stage("toy", tmp_path / "slow.msgpack", start, _toy_train, (0, 0), (jnp.ones(1),), 250)
    assert saved_steps == [100, 200, 250]
    saved_steps.clear()
    monkeypatch.setattr(run, "STAGE_SAVE_SECONDS", 1e9)  # every size is fast enough: 100 first, then the largest
    run.run_stage("toy", tmp_path / "fast.msgpack", start, _toy_train, (0, 0), (jnp.ones(1),), 12_345)
    assert saved_steps == [100, 10_100, 11_100, 12_100, 12_200, 12_300, 12_345]


def test_an_interrupted_stage_resumes_where_it_stopped(tmp_path, monkeypatch):
    start = _Toy(jnp.zeros(1), jax.random.PRNGKey(0)[None])
    scale = jnp.ones(1)
    whole, _, _ = run.run_stage("toy", tmp_path / "whole.msgpack", start, _toy_train, (0, 0), (scale,), 100)

    monkeypatch.setattr(run, "STAGE_CHUNKS", (30,))
    real_write, writes = run.write_atomic, []

    def killed_after_second_chunk(path, content):
        real_write(path, content)
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_atomic", killed_after_second_chunk)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        run.run_stage("toy", tmp_path / "toy.msgpack", start, _toy_train, (0, 0), (scale,), 100)
    assert [path.name for path in writes] == ["toy.partial.msgpack"] * 2
    monkeypatch.setattr(run, "write_atomic", real_write)
    resumed, _, partial_path = run.run_stage("toy", tmp_path / "toy.msgpack", start, _toy_train, (0, 0), (scale,),
                                              100)
    assert partial_path == tmp_path / "toy.partial.msgpack"
    np.testing.assert_allclose(resumed.total, whole.total, rtol=1e-6)  # 30 + 30, then 30 + 10 == 100 at once
    np.testing.assert_array_equal(resumed.rng, whole.rng)


@pytest.mark.parametrize("flags, message", [
    (["--lam", "1.5"], "--lam must be one or more values in [0, 1]"),
    (["--xi", "0"], "--xi must be one or more values in (0, 1]"),
    (["--xi", "0.005"], "--xi 0.005 keeps no source sample"),
    (["--lam", "0.5", "0.5"], "--lam and --xi must not repeat"),
    (["--batch-size", "33"], "--batch-size must be even"),
    (["--sql-steps", "0"], "--sql-steps must be at least 1"),
    (["--holdout-fraction", "0.7"], "--holdout-fraction must be in (0, 0.5]"),
    (["--source", "halfcheeta"], "Unknown --source 'halfcheeta'"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, tmp_path):
    assert_one_sentence_exit(dvdf.main, ["--out", str(tmp_path), *flags], message)
