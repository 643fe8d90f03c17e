"""algos/otdf.py: the OT deviation against exact OT by hand, the batch normalisation and kept count, the CVAE's loss
and log beta against numbers worked out by hand, which networks each weight and constraint reaches, the stages cached
and resumed, and a tiny end-to-end run whose filter keeps the source transitions of the target's dynamics. Whether
OTDF beats IQL is a benchmark."""
import importlib.util
import inspect
import itertools
import json
import math
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs.diagnostics
from envs import run
from synthetic import assert_one_sentence_exit

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"algos_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds a class's file through sys.modules
    spec.loader.exec_module(module)
    return module


otdf, dvdf, dvdf_otdf, v2a_otdf, iql = _load("otdf"), _load("dvdf"), _load("dvdf_otdf"), _load("v2a_otdf"), _load("iql")

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah
REF_MIN, REF_MAX = -300.0, 3000.0


# ---------------------------------------------------------------- stage 1: the deviation, by hand
def _cosine_cost(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))


def test_ot_deviation_is_exact_ot_on_three_points_when_epsilon_is_small():
    source = np.array([[1.0, 0.1, 0.0], [0.2, 1.0, 0.1], [0.1, 0.3, 1.0]], np.float32)
    target = np.array([[0.1, 0.2, 1.0], [1.0, 0.0, 0.2], [0.0, 1.0, 0.0]], np.float32)
    cost = _cosine_cost(source, target)
    # exact OT between uniform weights on 3 + 3 points is a permutation: the cheapest of the 6
    totals = {perm: sum(cost[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(3))}
    best = min(totals, key=totals.get)
    assert best == (1, 2, 0) and sorted(totals.values())[1] - totals[best] > 0.5  # unique, by a wide margin
    exact = -np.array([cost[i, best[i]] for i in range(3)]) / 3.0  # d_i = -sum_j P_ij C_ij, P_ij = 1/3 on the match
    deviation = jax.jit(lambda s, t: otdf.ot_deviation(s, t, 1e-3, 1e-9, 2000))(source, target)
    np.testing.assert_allclose(deviation, exact, atol=1e-4)


def test_ot_deviation_ranks_the_target_like_transitions_higher():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 5)).astype(np.float32) + 2.0
    source = np.concatenate([target[:10] + 0.01 * rng.normal(size=(10, 5)),  # beside target points
                             -target[:10]]).astype(np.float32)  # pointing the other way
    deviation = np.asarray(jax.jit(lambda s, t: otdf.ot_deviation(s, t, None, 1e-9, 100))(source, target))
    assert np.isfinite(deviation).all() and (deviation <= 0).all()
    assert deviation[:10].min() > deviation[10:].max()
    # each source row ships its whole mass 1/20: the deviation is at least -(max cost)/20 = -2/20
    assert deviation.min() >= -2.0 / 20 - 1e-6


# ---------------------------------------------------------------- the filter, by hand
def test_normalise_deviation_by_hand():
    d = jnp.array([-0.1, -0.3, -0.2, -0.5])  # max -0.1, min -0.5: (d + 0.1) / 0.4
    np.testing.assert_allclose(otdf.normalise_deviation(d), [0.0, -0.5, -0.25, -1.0], rtol=1e-6)
    np.testing.assert_array_equal(otdf.normalise_deviation(jnp.full(3, -0.2)), [0.0, 0.0, 0.0])  # not NaN


def test_keep_count_and_mask_keep_the_top_proportion_by_c():
    assert otdf.keep_count(128, 0.8) == 102 and otdf.keep_count(4, 0.5) == 2
    c = otdf.normalise_deviation(jnp.array([-0.1, -0.3, -0.2, -0.5]))
    np.testing.assert_array_equal(jax.jit(otdf.keep_mask)(c, 2), [1.0, 0.0, 1.0, 0.0])
    c = otdf.normalise_deviation(jnp.array(np.random.default_rng(1).normal(size=128), jnp.float32))
    keep = np.asarray(otdf.keep_mask(c, 102))
    assert keep.sum() == 102 and np.asarray(c)[keep == 1].min() >= np.asarray(c)[keep == 0].max()


def test_summed_bc_loss_by_hand():
    mean = jnp.array([[0.5, -0.5], [0.0, 1.0], [0.2, 0.2]])
    actions = jnp.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    weight, mask = jnp.array([2.0, 1.0, 5.0]), jnp.array([1.0, 1.0, 0.0])
    # per sample sum over dims: 0.5, 1.0, 0.08; masked mean of weight x that over the first two: (1 + 1) / 2
    assert float(otdf.summed_bc_loss(mean, actions, weight, mask)) == pytest.approx(1.0)


# ---------------------------------------------------------------- stage 2 and the constraint, by hand
def test_cvae_loss_by_hand():
    reconstruction, actions = jnp.array([[0.5, 0.0]]), jnp.array([[0.0, 1.0]])  # MSE (0.25 + 1) / 2 = 0.625
    mean, std = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, jnp.e]])
    # KL per dim -0.5 (1 + log std^2 - mean^2 - std^2): 0.5 and -0.5 (1 + 2 - e^2) = (e^2 - 3) / 2; mean of the two
    kl = (0.5 + (np.e**2 - 3) / 2) / 2
    assert float(otdf.cvae_loss(reconstruction, actions, mean, std, 0.5)) == pytest.approx(0.625 + 0.5 * kl, rel=1e-6)


def _fake_cvae(params, x, y, method):
    """An encoder q(z | s, a) = N(a, 0.5^2) and a decoder (s, z) -> z + s[..., :1], in CVAE.apply's form."""
    if method is otdf.CVAE.encode:
        return y, jnp.full_like(y, 0.5)
    return y + x[..., :1]


def test_log_beta_by_hand():
    obs, action = jnp.array([[0.1, 9.0]]), jnp.array([[0.3, -0.2]])  # one sample, latent = action dims = 2
    noise = jnp.array([[[0.0, 0.0], [1.0, -1.0]]])  # K = 2 latent samples
    beta = 0.4
    scale = np.sqrt(beta / 4)
    z = np.array([[0.3, -0.2], [0.8, -0.7]])  # mean + 0.5 noise
    decoded = z + 0.1
    log_normal = -0.5 * ((np.array([0.3, -0.2]) - decoded) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    log_likelihood = log_normal.sum(1)  # [K]
    released = np.log(np.exp(log_likelihood).sum())
    got = otdf.log_beta(_fake_cvae, None, obs, action, noise, beta)
    np.testing.assert_allclose(got, [released], rtol=1e-5)

    def log_n(x, loc, std):
        return (-0.5 * ((x - loc) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)

    weights = log_likelihood + log_n(z, 0.0, 1.0) - log_n(z, np.array([0.3, -0.2]), 0.5)
    iwae = np.log(np.exp(weights).sum()) - np.log(2)
    np.testing.assert_allclose(otdf.log_beta(_fake_cvae, None, obs, action, noise, beta, True), [iwae], rtol=1e-5)


def test_default_reg_weight_is_otdfs():
    assert otdf.default_reg_weight("halfcheetah", "halfcheetah-kinematic") == 0.1
    assert otdf.default_reg_weight("halfcheetah-kinematic", "halfcheetah") == 0.1
    assert otdf.default_reg_weight("hopper-morph", "hopper") == 0.5


# ---------------------------------------------------------------- which networks each part reaches
def _transitions(rng, shape):
    obs = rng.normal(size=shape + (3,)).astype(np.float32)
    return otdf.Transitions(obs, rng.uniform(-1, 1, shape + (2,)).astype(np.float32),
                            rng.normal(size=shape).astype(np.float32), obs + 0.1, np.zeros(shape, np.float32))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    data = jax.device_put(otdf.Data(_transitions(rng, (300,)), -rng.uniform(0, 1e-3, 300).astype(np.float32), (),
                                    _transitions(rng, (40,))))
    cvae = otdf.CVAE(2, 4, (8, 8)).init(jax.random.PRNGKey(1), jnp.zeros((1, 3)), jnp.zeros((1, 2)), jnp.zeros((1, 4)))
    return data, cvae


def _one_step(tiny, reg_weight=0.5, **flags):
    data, cvae = tiny
    args = otdf.Args(hidden=(8, 8), batch_size=16, steps=10, num_samples=3, **flags)
    init, train = otdf.make_train(args, 3, 2, (8, 8), 4)
    hparams = otdf.Hyperparams(jnp.float32(0.7), jnp.float32(3.0), jnp.int32(6), jnp.float32(reg_weight))
    runner = jax.jit(init)(jax.random.PRNGKey(0))
    after, (losses, sums) = jax.jit(lambda r: train(r, data, cvae, hparams, 1))(runner)
    return after.state, losses, sums


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_the_deviation_weight_reaches_the_critics_only(tiny):
    weighted, _, sums = _one_step(tiny)
    unweighted, _, _ = _one_step(tiny, deviation_weight=False)
    assert _same(weighted.value, unweighted.value) and _same(weighted.actor, unweighted.actor)
    assert not _same(weighted.critic, unweighted.critic)
    assert float(sums["kept"]) == 6  # int(8 x 0.8)
    assert 0 < float(sums["q_weight_kept"]) / 6 <= 1.0  # exp(c) with c in [-1, 0]


def test_the_dataset_constraint_reaches_the_actor_only(tiny):
    constrained, losses, _ = _one_step(tiny)
    off, off_losses, _ = _one_step(tiny, dataset_constraint=False)
    zero, _, _ = _one_step(tiny, reg_weight=0.0)
    assert _same(constrained.value, off.value) and _same(constrained.critic, off.critic)
    assert not _same(constrained.actor, off.actor)
    for a, b in zip(jax.tree.leaves(zero.actor.params), jax.tree.leaves(off.actor.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # a zero weight is no constraint
    assert float(off_losses["log_beta"]) == 0.0 and math.isfinite(float(losses["log_beta"]))
    assert float(losses["actor_loss"]) == pytest.approx(float(losses["bc_loss"]) - 0.5 * float(losses["log_beta"]),
                                                        rel=1e-5)


def test_shared_helpers_are_identical_copies():
    shared = {(otdf, dvdf, iql): ["MLP", "TwinCritic", "ValueNet", "IQLState", "Transitions", "expectile_loss",
                                  "advantage_weight"],
              (otdf, dvdf): ["masked_mean", "value_loss", "weighted_critic_loss", "keep_mask", "to_transitions"]}
    for modules, names in shared.items():
        for name in names:
            sources = {inspect.getsource(getattr(module, name)) for module in modules}
            assert len(sources) == 1, f"{name} differs between {[m.__name__ for m in modules]}"
    stages = ["transition_vectors", "ot_deviation", "ot_stage", "CVAE", "CVAERunner", "CVAEData", "cvae_loss",
              "make_cvae_train", "cvae_stage", "normalise_deviation", "log_beta", "default_reg_weight"]
    for name in stages:  # DVDF-OTDF and V2A-OTDF run otdf.py's stages and constraint
        sources = {inspect.getsource(getattr(module, name)) for module in (otdf, dvdf_otdf, v2a_otdf)}
        assert len(sources) == 1, f"{name} differs between otdf.py, dvdf_otdf.py and v2a_otdf.py"
    # DVDF-OTDF is DVDF with another dynamics score: everything but the score and its stages is dvdf.py's
    for name in ("MLP", "TwinCritic", "ValueNet", "Actor", "IQLState", "Runner", "Transitions", "Hyperparams",
                 "normalise_advantage", "filter_score", "keep_count", "keep_mask", "q_weights", "masked_mean",
                 "expectile_loss", "value_loss", "weighted_critic_loss", "advantage_weight", "deterministic_actor_loss",
                 "gaussian_actor_loss", "make_policy", "default_alpha", "SQLState", "SQLRunner", "SQLHyperparams",
                 "sql_value_loss", "critic_loss", "make_sql_train", "reward_scale_of", "sql_stage",
                 "to_transitions", "make_grid", "report"):
        assert inspect.getsource(getattr(dvdf_otdf, name)) == inspect.getsource(getattr(dvdf, name)), name
    for constant in ("LOG_STD_MIN", "LOG_STD_MAX", "CACHE_VERSION"):
        assert getattr(dvdf_otdf, constant) == getattr(dvdf, constant), constant
    for name in ("write_atomic", "open_run", "run_stage", "cached_stage", "save_stage", "train_loop", "fingerprint",
                 "load_source_target", "datasets_line"):
        assert getattr(otdf, name, getattr(run, name)) is getattr(run, name), f"otdf.py copies {name}"
    assert otdf.filter_sums is envs.diagnostics.filter_sums


# ---------------------------------------------------------------- end to end through main()
def _write(path: Path, rng, n: int, shifts: tuple, ref=None):
    """Episodes of 100 steps; episode e follows s' = s + 0.1 sum(a) + shifts[e % len(shifts)], and its "domain" is
    halfcheetah for shift 0 and halfcheetah-kinematic otherwise."""
    observations = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32)
    shift = np.repeat([shifts[e % len(shifts)] for e in range(n // 100)], 100)[:, None].astype(np.float32)
    with h5py.File(path, "w") as file:
        file["observations"] = observations
        file["actions"] = actions
        file["rewards"] = rng.normal(size=n).astype(np.float32)
        file["next_observations"] = observations + 0.1 * actions.sum(1, keepdims=True) + shift
        file["terminals"] = np.zeros(n, dtype=bool)
        file["timeouts"] = (np.arange(n) % 100 == 99)
        if ref is not None:
            file.attrs["ref_min_score"], file.attrs["ref_max_score"] = ref
        file.attrs["episode_metadata"] = json.dumps([{"domain": "halfcheetah" if shifts[e % len(shifts)] == 0 else
                                                      "halfcheetah-kinematic",
                                                      "quality": "medium"} for e in range(n // 100)])
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("otdf_data"), np.random.default_rng(0)
    return {"source": _write(folder / "source.hdf5", rng, 2000, (0.0, 3.0)),
            "target": _write(folder / "target.hdf5", rng, 1000, (0.0,), ref=(REF_MIN, REF_MAX)),
            "cache": str(folder / "cache")}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--cache-dir", datasets["cache"], "--steps", "200", "--eval-every", "100", "--eval-episodes", "1",
            "--num-seeds", "2", "--batch-size", "32", "--hidden", "16", "16", "--cvae-hidden", "16", "16",
            "--cvae-steps", "100", "--ot-chunk", "700", "--target-size", "300", "--references", "zoo", "--seed", "3",
            *extra]


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("otdf_run")
    return out, otdf.main(_flags(datasets, out))


def test_end_to_end_results_json(finished_run, datasets):
    out, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "otdf" and results["finished"] and results["step"] == 200 and results["seeds"] == [3, 4]
    assert results["keep_count"] == 12 and results["reg_weight"] == 0.1  # int(16 x 0.8); halfcheetah-kinematic
    stages = results["stages"]
    assert stages["ot"]["origin"] == stages["cvae"]["origin"] == "trained"
    assert stages["ot"]["target_transitions"] == 300 and stages["ot"]["deviation"]["max"] <= 0
    assert Path(stages["ot"]["path"]).parent == Path(datasets["cache"])
    assert [e["step"] for e in results["evaluations"]] == [100, 200]
    for evaluation in results["evaluations"]:
        assert len(evaluation["scores"]) == 2 and all(map(math.isfinite, evaluation["scores"]))
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
        diagnostics = evaluation["filter"]
        assert diagnostics["kept_fraction"] == [0.75, 0.75] and "advantage_kept" not in diagnostics
        assert all(k > d for k, d in zip(diagnostics["dynamics_score_kept"], diagnostics["dynamics_score_dropped"]))
        # the filter keeps the episodes of the target's own dynamics: all of them, and only the rest of its quota
        rates = diagnostics["keep_rate"]["domain"]
        assert all(rate > 0.95 for rate in rates["halfcheetah"])
        assert all(rate < 0.6 for rate in rates["halfcheetah-kinematic"])


def test_stages_are_cached_and_a_second_run_reuses_them(finished_run, datasets, tmp_path):
    results = otdf.main(_flags(datasets, tmp_path / "again", "--steps", "100", "--num-seeds", "1"))
    assert results["stages"]["ot"]["origin"] == results["stages"]["cvae"]["origin"] == "cache"
    first = json.loads((finished_run[0] / "results.json").read_text())
    assert results["stages"]["ot"]["deviation"] == first["stages"]["ot"]["deviation"]


def test_an_interrupted_ot_stage_resumes_where_it_stopped(datasets, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    flags = _flags(datasets | {"cache": str(cache)}, tmp_path / "run", "--steps", "100", "--num-seeds", "1",
                   "--ot-epsilon", "0.05")
    monkeypatch.setattr(otdf, "STAGE_SAVE_SECONDS", -1.0)  # save after every chunk
    real, saves = otdf.write_atomic, []

    def interrupted_after_two_chunks(path, content):
        real(path, content)
        saves.append(path)
        if len(saves) == 2:  # chunks 1 and 2 of 3 done and saved
            raise KeyboardInterrupt

    monkeypatch.setattr(otdf, "write_atomic", interrupted_after_two_chunks)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        otdf.main(flags)
    partial = list(cache.glob("ot-*.partial.msgpack"))
    assert len(partial) == 1 and not list(cache.glob("ot-*.json"))
    monkeypatch.setattr(otdf, "write_atomic", real)
    resumed = otdf.main(flags + ["--out", str(tmp_path / "run2")])
    assert not partial[0].exists() and results_said_resume(capsys)
    uninterrupted = otdf.main(flags + ["--out", str(tmp_path / "run3"), "--cache-dir", str(tmp_path / "fresh")])
    assert resumed["stages"]["ot"]["deviation"] == pytest.approx(uninterrupted["stages"]["ot"]["deviation"])


def results_said_resume(capsys) -> bool:
    return "stage 1/3: ot: resuming at transition 1400" in capsys.readouterr().out


# ---------------------------------------------------------------- DVDF-OTDF and V2A-OTDF
def _variant_flags(datasets, out, *extra):
    """The end-to-end run's data, stage and IQL flags, less otdf.py's own."""
    flags = _flags(datasets, out, *extra)
    return [f for f in flags if f != "--proportion"]


def test_dvdf_otdf_end_to_end_shares_otdfs_stages(finished_run, datasets, tmp_path):
    results = dvdf_otdf.main(_variant_flags(datasets, tmp_path / "dvdf-otdf", "--sql-steps", "50", "--lam", "0.5",
                                            "1", "--num-seeds", "1"))
    assert results["algo"] == "dvdf-otdf" and results["finished"] and results["reg_weight"] == 0.1
    assert list(results["stages"]) == ["sql", "ot", "cvae"]
    assert results["stages"]["ot"]["origin"] == results["stages"]["cvae"]["origin"] == "cache"  # otdf.py's
    for evaluation in results["evaluations"]:
        assert all(map(math.isfinite, evaluation["scores"])) and "log_beta" in evaluation["losses"]
        diagnostics = evaluation["filter"]
        assert diagnostics["kept_fraction"] == [0.5, 0.5]
        assert all(0 < w <= 1 for w in diagnostics["q_weight_kept"])  # exp(c), c in [-1, 0]
        assert all(-1 <= h <= 0 for h in diagnostics["dynamics_score_kept"])
        # lam = 1 (the second run) ranks by c alone: the episodes of the target's dynamics, half of each batch,
        # make most of the kept half
        assert diagnostics["batch_share"]["domain"]["halfcheetah"][1] == pytest.approx(0.5, abs=0.05)
        assert diagnostics["kept_share"]["domain"]["halfcheetah"][1] > 0.75
    # dvdf.py --dynamics-score ot runs dvdf_otdf.py with its other flags
    without = dvdf.main(_variant_flags(datasets, tmp_path / "dvdf-otdf-nc", "--sql-steps", "50", "--num-seeds", "1",
                                       "--steps", "100", "--no-dataset-constraint", "--dynamics-score", "ot"))
    assert without["algo"] == "dvdf-otdf" and without["args"]["dataset_constraint"] is False
    assert list(without["stages"]) == ["sql", "ot"] and "log_beta" not in without["evaluations"][0]["losses"]


def test_v2a_otdf_end_to_end(finished_run, datasets, tmp_path):
    results = v2a_otdf.main(_variant_flags(datasets, tmp_path / "v2a-otdf", "--num-seeds", "1", "--steps", "100",
                                           "--encoder-steps", "10", "--sqlz-steps", "20", "--gru-hidden", "8",
                                           "--z-dim", "4", "--window", "20", "--encoder-batch-size", "4",
                                           "--sqlz-batch-size", "32"))
    assert results["algo"] == "v2a-otdf" and results["finished"]
    assert list(results["stages"]) == ["encoder", "sqlz", "ot", "cvae"]
    assert results["stages"]["ot"]["origin"] == "cache"
    evaluation = results["evaluations"][-1]
    assert all(map(math.isfinite, evaluation["scores"])) and "log_beta" in evaluation["losses"]
    assert evaluation["filter"]["kept_fraction"] == [0.5]


@pytest.mark.parametrize("flag, value, message", [("--proportion", "0", "--proportion must be in (0, 1]"),
                                                  ("--ot-chunk", "0", "--ot-chunk must be at least 1"),
                                                  ("--reg-weight", "-1", "--reg-weight must be 0 or more")])
def test_bad_flags_end_in_one_sentence(datasets, tmp_path, flag, value, message):
    assert_one_sentence_exit(otdf.main, _flags(datasets, tmp_path / "bad", flag, value), message)
