"""algos/igdf_scorer.py: the binary NCE loss against numbers worked out by hand, the score is the cosine
similarity of the two encoders, the held-out AUC by hand, and a tiny end-to-end run (2 seeds) writes the encoders
and a well-formed results.json, separates clearly shifted synthetic dynamics, and resumes bit for bit."""
import importlib.util
import json
import math
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from envs.diagnostics import HOLDOUT_MAX, holdout_split, separation_auc
from synthetic import assert_one_sentence_exit

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("igdf_scorer", ROOT / "algos" / "igdf_scorer.py")
scorer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scorer)

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- the loss and the score, by hand
def test_nce_loss_by_hand():
    sa = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # phi of 4 target (s, a)
    target_next = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0], [1.0, 1.0]])  # psi of their own s'
    source_next = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # psi of 3 = B - 1 shared source s'
    # row i: [phi_i . psi(s'_i), phi_i . psi(source_1), phi_i . psi(source_2), phi_i . psi(source_3)]
    logits = np.array([[2.0, 1.0, 0.0, -1.0],
                       [-1.0, 0.0, 1.0, -1.0],
                       [1.0, 1.0, 1.0, -2.0],
                       [0.0, 0.0, 0.0, 0.0]])
    # BCE with logits: softplus(-x) for label 1 (column 0), softplus(x) for label 0
    expected = np.mean([[softplus(-row[0])] + [softplus(x) for x in row[1:]] for row in logits])
    loss, got_logits = scorer.nce_loss(jnp.array(sa), jnp.array(target_next), jnp.array(source_next))
    np.testing.assert_allclose(got_logits, logits)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # row 3 alone (all logits 0): log 2 everywhere
    assert float(np.mean([softplus(0.0)] * 4)) == pytest.approx(math.log(2))


def test_nce_loss_needs_b_minus_1_negatives():
    with pytest.raises(AssertionError):
        scorer.nce_loss(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 2)))


def test_score_is_cosine_similarity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(32, 5)), rng.normal(size=(32, 5))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    h = scorer.dynamics_score(jnp.array(a), jnp.array(b))
    np.testing.assert_allclose(h, cosine, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(h) <= 1 + 1e-6)
    np.testing.assert_allclose(scorer.dynamics_score(jnp.array(3 * a), jnp.array(0.5 * b)), h, rtol=1e-5, atol=1e-6)
    by_hand = scorer.dynamics_score(jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
                                    jnp.array([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]]))
    np.testing.assert_allclose(by_hand, [0.0, 1.0, 0.0], atol=1e-6)  # orthogonal, parallel, zero vector -> 0


def test_score_fn_is_the_cosine_of_the_two_encoders():
    net = scorer.Scorer((8,), 4)
    obs, actions, next_obs = (jnp.array(np.random.default_rng(1).normal(size=(6, d)), jnp.float32)
                              for d in (3, 2, 3))
    params = net.init(jax.random.PRNGKey(0), obs, actions, next_obs)
    sa_repr, next_repr = net.apply(params, obs, actions, next_obs)
    assert sa_repr.shape == next_repr.shape == (6, 4)
    np.testing.assert_allclose(scorer.make_score_fn((8,), 4)(params, obs, actions, next_obs),
                               scorer.dynamics_score(sa_repr, next_repr), rtol=1e-6)


def test_separation_auc_by_hand():
    # target 0.9 beats both source scores (2), 0.5 beats 0.2 and ties 0.5 (1.5), 0.1 beats none: 3.5 of 6 pairs
    assert separation_auc([0.9, 0.5, 0.1], [0.2, 0.5]) == pytest.approx(3.5 / 6)
    assert separation_auc([1.0, 2.0], [0.0]) == 1.0 and separation_auc([0.0], [1.0, 2.0]) == 0.0


def test_holdout_split():
    train, held = holdout_split(1000, 0.1, seed=0)
    assert len(held) == 100 and len(train) == 900 and not set(train) & set(held)
    assert len(holdout_split(200_000, 0.1, seed=0)[1]) == HOLDOUT_MAX
    with pytest.raises(SystemExit, match="too small"):
        holdout_split(1, 0.1, seed=0)


# ---------------------------------------------------------------- end to end through main()
def _write_d4rl(path: Path, rng, n: int, shift: float):
    """Synthetic dynamics s' = s + 0.1 a W + shift: the source's shift makes it tell-apart from the target."""
    observations = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32)
    weights = np.random.default_rng(123).normal(size=(ACT_DIM, OBS_DIM)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file["observations"] = observations
        file["actions"] = actions
        file["rewards"] = rng.normal(size=n).astype(np.float32)
        file["next_observations"] = observations + 0.1 * actions @ weights + shift
        file["terminals"] = np.zeros(n, dtype=bool)
        file["timeouts"] = (np.arange(n) % 100 == 99)
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("scorer_data"), np.random.default_rng(0)
    return {"source": _write_d4rl(folder / "source.hdf5", rng, 2000, shift=1.0),
            "target": _write_d4rl(folder / "target.hdf5", rng, 2000, shift=0.0)}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--out", str(out),
            "--steps", "300", "--eval-every", "150", "--num-seeds", "2", "--seed", "3", "--hidden", "32", "32",
            "--repr-dim", "8", "--batch-size", "32", "--target-fraction", "0.5", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def finished_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer_run")
    return out, scorer.main(_flags(datasets, out))


def test_end_to_end_results_and_artifact(finished_run):
    out, returned = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "igdf_scorer" and results["finished"] and results["seeds"] == [3, 4]
    data = results["data"]
    assert data["target_size"] == 1000 and data["target_held_out"] == 100 and data["source_held_out"] == 200
    assert [e["step"] for e in results["evaluations"]] == [150, 300]
    for evaluation in results["evaluations"]:
        separation = evaluation["separation"]
        assert len(separation["auc"]) == 2 and all(0.0 <= auc <= 1.0 for auc in separation["auc"])
        assert all(-1.0 <= h <= 1.0 for h in separation["target_score_mean"] + separation["source_score_mean"])
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
    # the shift of 1.0 in every dimension is easy: held-out target transitions score above held-out source ones
    assert min(results["final"]["separation"]["auc"]) > 0.9
    assert results["final"]["auc_mean"] == pytest.approx(float(np.mean(results["final"]["separation"]["auc"])))

    artifact = serialization.msgpack_restore((out / "scorer.msgpack").read_bytes())
    info = json.loads((out / "scorer.json").read_text())
    assert set(artifact["scorer"]["params"]) == {"phi", "psi"}
    assert all(leaf.shape[0] == 2 and np.isfinite(leaf).all() for leaf in jax.tree.leaves(artifact))
    assert info["kind"] == "scorer" and info["finished"] and info["repr_dim"] == 8 and info["hidden"] == [32, 32]
    assert info["separation"] == results["final"]["separation"] and len(info["target_fingerprints"]) == 2
    assert not list(out.glob("*.tmp"))


def test_resume_gives_the_same_encoders(datasets, finished_run, tmp_path, monkeypatch):
    out, calls = tmp_path / "interrupted", []
    real = scorer.held_out_separation

    def killed_at_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer, "held_out_separation", killed_at_second_evaluation)
    with pytest.raises(SystemExit, match="^Stopped by Ctrl-C"):
        scorer.main(_flags(datasets, out))
    monkeypatch.setattr(scorer, "held_out_separation", real)
    resumed = scorer.main(_flags(datasets, out, "--resume"))
    saved = serialization.msgpack_restore((out / "scorer.msgpack").read_bytes())
    reference = serialization.msgpack_restore((finished_run[0] / "scorer.msgpack").read_bytes())
    for leaf, reference_leaf in zip(jax.tree.leaves(saved), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(leaf, reference_leaf)
    assert resumed["final"]["separation"] == finished_run[1]["final"]["separation"]


@pytest.mark.parametrize("flags, message", [
    (["--holdout-fraction", "0.9"], "--holdout-fraction must be in (0, 0.5]"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--repr-dim", "0"], "--repr-dim must be at least 1"),
    (["--target", "nowhere"], "Unknown --target 'nowhere'"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, tmp_path):
    assert_one_sentence_exit(scorer.main, ["--out", str(tmp_path), *flags], message)
