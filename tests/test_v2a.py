"""algos/v2a.py: one z per trajectory, padding and masks that do not leak into the encoder's loss, the SQL-with-z
losses against numbers worked out in numpy, the target critics' update every 2 steps, the probe, the helpers shared
with dvdf.py, and a tiny end-to-end run on rollouts of two real shifted domains that writes a well-formed
results.json (probe accuracy, kept shares per domain and quality) and the PNG of z. Whether z separates domains
at scale, and whether V2A beats DVDF, are benchmarks."""
import importlib.util
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs.diagnostics
import envs.run
from envs import Dataset, make_env, save_hdf5
from synthetic import assert_one_sentence_exit

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"algos_{name}", ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds a class's file through sys.modules
    spec.loader.exec_module(module)
    return module


v2a, v2a_otdf, dvdf = _load("v2a"), _load("v2a_otdf"), _load("dvdf")

OBS_DIM, ACT_DIM = 3, 2  # the tiny synthetic datasets of the unit tests
STEP_DIM = 2 * OBS_DIM + ACT_DIM
REF_MIN, REF_MAX = -300.0, 3000.0


def _dataset(lengths, seed=0):
    """Random transitions in episodes of the given lengths (ids 0..E-1, in order), with domain metadata."""
    rng, n = np.random.default_rng(seed), sum(lengths)
    observations = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    return Dataset(observations=observations, actions=rng.uniform(-1, 1, (n, ACT_DIM)).astype(np.float32),
                   rewards=rng.normal(size=n).astype(np.float32),
                   next_observations=(observations + rng.normal(size=(n, OBS_DIM))).astype(np.float32),
                   terminals=np.zeros(n, np.float32), timeouts=np.zeros(n, np.float32),
                   episode_ids=np.repeat(np.arange(len(lengths)), lengths).astype(np.int32),
                   episode_metadata=tuple({"domain": "ab"[e % 2], "quality": "q"} for e in range(len(lengths))))


def _encoder_params(gru_hidden=8, z_dim=4, seed=0):
    return v2a.TrajectoryEncoder(gru_hidden, z_dim).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, STEP_DIM)),
                                                         jnp.ones((1, 1)))


def _encode_alone(params, steps, gru_hidden=8, z_dim=4):
    """The encoder mean of one unpadded window [T, F]."""
    return np.asarray(v2a.TrajectoryEncoder(gru_hidden, z_dim).apply(params, jnp.array(steps)[None],
                                                                     jnp.ones((1, len(steps))))[0][0])


def test_the_fused_encoder_is_flax_grucell_with_its_parameters():
    """TrajectoryEncoder's two forms, the fused GRU and flax's own GRUCell stepped by nn.scan (its form before the
    fusion, and the default on a CPU): the same parameter tree and, for the same key, the same values (so saved
    encoders load in either), and the same outputs on padded windows."""
    key, steps = jax.random.PRNGKey(3), jax.random.normal(jax.random.PRNGKey(4), (5, 9, STEP_DIM))
    mask = (jnp.arange(9)[None] < jnp.array([9, 1, 4, 7, 0])[:, None]).astype(jnp.float32)
    fused, reference = v2a.TrajectoryEncoder(8, 4, fused=True), v2a.TrajectoryEncoder(8, 4, fused=False)
    params = fused.init(key, steps, mask)
    reference_params = reference.init(key, steps, mask)
    assert "cell" in reference_params["params"]["gru"] and "ir" in reference_params["params"]["gru"]["cell"]
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in zip(fused.apply(params, steps, mask), reference.apply(params, steps, mask)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    default = reference if jax.default_backend() == "cpu" else fused  # flax's GRUCell on a CPU, else fused
    for ours, theirs in zip(v2a.TrajectoryEncoder(8, 4).apply(params, steps, mask), default.apply(params, steps, mask)):
        np.testing.assert_array_equal(ours, theirs)
    mean, _ = fused.apply(params, steps, mask)
    np.testing.assert_allclose(mean[4], fused.apply(params, jnp.zeros((1, 1, STEP_DIM)), jnp.zeros((1, 1)))[0][0],
                               atol=1e-7)  # a window of padding only: the zero state's heads


# ---------------------------------------------------------------- one z per trajectory
@pytest.mark.parametrize("window", [None, 4])
def test_z_is_identical_for_every_transition_of_a_trajectory(window, monkeypatch):
    monkeypatch.setattr(v2a, "RELABEL_CHUNK", 3)  # several chunks, the last one padded
    lengths = [5, 12, 3, 9, 1, 7, 11]
    dataset, params = _dataset(lengths), _encoder_params()
    trajectory, trajectory_z = v2a.relabel(params, dataset, 8, 4, window)
    assert trajectory.shape == (dataset.size,) and trajectory_z.shape == (len(lengths), 4)
    np.testing.assert_array_equal(trajectory, dataset.episode_ids)
    z = trajectory_z[trajectory]  # what stage 2 and stage 4 give each transition
    steps = v2a.encoder_steps(dataset)
    np.testing.assert_array_equal(steps[:, OBS_DIM + ACT_DIM:], dataset.next_observations - dataset.observations)
    start = 0
    for e, length in enumerate(lengths):
        chunk = slice(start, start + length)
        assert (z[chunk] == z[start]).all()  # every transition of the trajectory: the same z
        if window is None:  # the whole trajectory in one pass, padded among others = encoded alone, unpadded
            expected = _encode_alone(params, steps[chunk])
        else:  # the length-weighted mean of its consecutive windows, each encoded alone
            pieces = [steps[chunk][i:i + window] for i in range(0, length, window)]
            expected = sum(len(p) * _encode_alone(params, p) for p in pieces) / length
        np.testing.assert_allclose(trajectory_z[e], expected, rtol=1e-5, atol=1e-6)
        start += length
    assert len({tuple(np.round(row, 6)) for row in trajectory_z}) == len(lengths)  # trajectories differ


def test_relabel_rows_cut_trajectories_into_consecutive_windows():
    starts, lengths = np.array([0, 5, 17]), np.array([5, 12, 3])
    row_starts, row_lengths, owner = v2a.relabel_rows(starts, lengths, 4)
    np.testing.assert_array_equal(row_starts, [0, 4, 5, 9, 13, 17])
    np.testing.assert_array_equal(row_lengths, [4, 1, 4, 4, 4, 3])
    np.testing.assert_array_equal(owner, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(v2a.relabel_rows(starts, lengths, None)[1], lengths)


def test_sampled_windows_stay_inside_one_trajectory():
    lengths = np.array([5, 30, 3, 12], np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    steps = np.tile(np.arange(lengths.sum(), dtype=np.float32)[:, None] + 1, (1, STEP_DIM))  # step i holds i + 1
    windows, mask = jax.jit(v2a.sample_windows, static_argnums=(2, 3))(
        jax.random.PRNGKey(0), v2a.EncoderData(jnp.array(steps), starts, lengths), 64, 10)
    windows, mask = np.asarray(windows), np.asarray(mask)
    owner_of = np.repeat(np.arange(4), lengths)
    seen = set()
    for window, valid in zip(windows, mask):
        n = int(valid.sum())
        assert (valid[:n] == 1).all() and (valid[n:] == 0).all() and (window[n:] == 0).all()  # padding at the end
        index = window[:n, 0].astype(int) - 1
        owner = owner_of[index[0]]
        assert n == min(lengths[owner], 10)  # min(length, window) steps
        np.testing.assert_array_equal(index, np.arange(index[0], index[0] + n))  # consecutive
        assert (owner_of[index] == owner).all()  # never across a trajectory boundary
        seen.add((owner, index[0]))
    assert {owner for owner, _ in seen} == {0, 1, 2, 3} and len({s for o, s in seen if o == 1}) > 3


# ---------------------------------------------------------------- the encoder's loss
def test_encoder_decoder_loss_by_hand():
    prediction = np.array([[[[1.0], [5.0]]], [[[3.0], [-1.0]]]])  # K = 2 decoders, B = 1, T = 2, D = 1
    delta = np.array([[[2.0], [100.0]]])
    mask = np.array([[1.0, 0.0]])  # the second step is padding
    mean, log_std = np.array([[1.0, 0.0]]), np.array([[0.0, np.log(2.0)]])
    # valid step: ((1 - 2)^2 + (3 - 2)^2) / 2 = 1; KL = 0.5 (1 + 1 - 1 - 0) + 0.5 (4 + 0 - 1 - 2 log 2)
    kl = 0.5 + 0.5 * (3 - 2 * math.log(2.0))
    loss, (reconstruction, kl_value) = v2a.encoder_decoder_loss(*map(jnp.array, (prediction, delta, mask, mean,
                                                                                  log_std)), 1e-3)
    assert float(reconstruction) == pytest.approx(1.0) and float(kl_value) == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(1.0 + 1e-3 * kl, rel=1e-6)


def _window_setup():
    gru_hidden, z_dim, hidden = 8, 4, (16,)
    loss = v2a.make_window_loss(gru_hidden, z_dim, hidden, 3, 1e-3, OBS_DIM, ACT_DIM)
    encoder_params = _encoder_params(gru_hidden, z_dim, seed=1)
    decoder_params = v2a.DeltaDecoder(hidden, OBS_DIM, 3).init(jax.random.PRNGKey(2), jnp.zeros((1, OBS_DIM)),
                                                               jnp.zeros((1, ACT_DIM)), jnp.zeros((1, z_dim)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), encoder_params, decoder_params


def test_padding_and_masks_do_not_leak_into_the_loss():
    """A window padded with garbage and masked gives the loss (and gradients) of the unpadded window."""
    loss_and_grads, encoder_params, decoder_params = _window_setup()
    rng = np.random.default_rng(0)
    window = rng.normal(size=(1, 7, STEP_DIM)).astype(np.float32)
    padded = np.concatenate([window, 50.0 * rng.normal(size=(1, 5, STEP_DIM)).astype(np.float32)], axis=1)
    mask = np.concatenate([np.ones((1, 7)), np.zeros((1, 5))], axis=1).astype(np.float32)
    noise = jnp.array(rng.normal(size=(1, 4)).astype(np.float32))
    for z_noise in (noise, None):  # the encoder step (z sampled) and the decoder step (z = mean)
        (loss, aux), grads = loss_and_grads(encoder_params, decoder_params, jnp.array(window), jnp.ones((1, 7)),
                                            z_noise)
        (padded_loss, padded_aux), padded_grads = loss_and_grads(encoder_params, decoder_params, jnp.array(padded),
                                                                 jnp.array(mask), z_noise)
        assert float(padded_loss) == pytest.approx(float(loss), rel=1e-5)
        np.testing.assert_allclose(padded_aux, aux, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(padded_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # a batch of windows of lengths 7 and 12: the reconstruction is the mean over their 19 valid steps, the KL the
    # mean over the 2 windows, each as if alone
    longer = rng.normal(size=(1, 12, STEP_DIM)).astype(np.float32)
    batch = np.concatenate([padded, longer])
    batch_mask = np.concatenate([mask, np.ones((1, 12), np.float32)])
    (_, (reconstruction, kl)), _ = loss_and_grads(encoder_params, decoder_params, jnp.array(batch),
                                                  jnp.array(batch_mask), None)
    (_, (short_reconstruction, short_kl)), _ = loss_and_grads(encoder_params, decoder_params, jnp.array(window),
                                                              jnp.ones((1, 7)), None)
    (_, (long_reconstruction, long_kl)), _ = loss_and_grads(encoder_params, decoder_params, jnp.array(longer),
                                                            jnp.ones((1, 12)), None)
    assert float(reconstruction) == pytest.approx(float((7 * short_reconstruction + 12 * long_reconstruction) / 19),
                                                  rel=1e-5)
    assert float(kl) == pytest.approx(float((short_kl + long_kl) / 2), rel=1e-5)


def test_encoder_training_steps_alternate_and_stay_finite():
    init, train = v2a.make_encoder_train(8, 4, (16,), 3, 1e-3, 3e-4, 10.0, 4, 6, OBS_DIM, ACT_DIM)
    dataset = _dataset([5, 12, 3, 9])
    starts, lengths = v2a.trajectory_bounds(dataset)
    np.testing.assert_array_equal(starts, [0, 5, 17, 20])
    np.testing.assert_array_equal(lengths, [5, 12, 3, 9])
    data = jax.device_put(v2a.EncoderData(v2a.encoder_steps(dataset), starts, lengths))
    runner = jax.jit(init)(jax.random.PRNGKey(0))
    after, metrics = jax.jit(lambda r: train(r, data, 3))(runner)
    assert int(after.state.encoder.step) == int(after.state.decoder.step) == 3
    for name in ("encoder", "decoder"):  # both trained
        before_leaves = jax.tree.leaves(getattr(runner.state, name).params)
        assert not all(np.array_equal(a, b) for a, b in zip(before_leaves,
                                                             jax.tree.leaves(getattr(after.state, name).params)))
    assert all(np.isfinite(float(v)) for v in metrics.values()) and 3 <= float(metrics["window_length"]) <= 6


# ---------------------------------------------------------------- SQL with z, against numpy
def _dense_layers(tree):
    """The {"Dense_i": {"kernel", "bias"}} dict inside a flax parameter tree."""
    if "Dense_0" in tree:
        return tree
    (child,) = tree.values()
    return _dense_layers(child)


def _mlp(layers, x):
    """numpy forward of an MLP: ReLU between layers, none at the end."""
    for i in range(len(layers)):
        x = x @ np.asarray(layers[f"Dense_{i}"]["kernel"], np.float64) + np.asarray(layers[f"Dense_{i}"]["bias"])
        x = np.maximum(x, 0.0) if i < len(layers) - 1 else x
    return x


def _twin_q(params, obs_z, actions):
    layers = _dense_layers(params)
    return np.stack([_mlp(jax.tree.map(lambda p: np.asarray(p)[k], layers), np.concatenate([obs_z, actions], 1))[:, 0]
                     for k in range(2)])


def _v(params, obs_z):
    return _mlp(_dense_layers(params), obs_z)[:, 0]


def _sqlz_setup():
    hidden, z_dim = (5,), 2
    rng = np.random.default_rng(3)
    batch = v2a.Transitions(observations=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                            actions=rng.uniform(-1, 1, (4, ACT_DIM)).astype(np.float32),
                            rewards=np.array([1.0, -0.5, 2.0, 0.0], np.float32),
                            next_observations=rng.normal(size=(4, OBS_DIM)).astype(np.float32),
                            terminals=np.array([0.0, 1.0, 0.0, 0.0], np.float32))
    z = rng.normal(size=(4, z_dim)).astype(np.float32)
    obs_z = jnp.zeros((1, OBS_DIM + z_dim))
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    critic = v2a.TwinCritic(hidden).init(keys[0], obs_z, jnp.zeros((1, ACT_DIM)))
    critic_target = v2a.TwinCritic(hidden).init(keys[1], obs_z, jnp.zeros((1, ACT_DIM)))
    value = v2a.ValueNet(hidden).init(keys[2], obs_z)
    return hidden, batch, z, critic, critic_target, value


def test_sqlz_losses_by_hand():
    hidden, batch, z, critic, critic_target, value = _sqlz_setup()
    alpha, discount = 0.2, 0.99
    value_loss, critic_loss, advantage = v2a.make_sqlz_losses(hidden, discount)
    obs_z = np.concatenate([batch.observations, z], 1).astype(np.float64)
    next_obs_z = np.concatenate([batch.next_observations, z], 1).astype(np.float64)  # the same trajectory's z

    # V loss: u = min(Q1', Q2')(s, a, z) - V(s, z); mean(1[1 + u/(2 alpha) > 0] (1 + u/(2 alpha))^2 + V/alpha)
    v = _v(value, obs_z)
    u = _twin_q(critic_target, obs_z, batch.actions).min(0) - v
    hinge = 1.0 + u / (2 * alpha)
    expected = np.mean(np.where(hinge > 0, hinge**2, 0.0) + v / alpha)
    loss, u_returned = value_loss(value, critic_target, batch, jnp.array(z), alpha)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_allclose(u_returned, u, rtol=1e-5, atol=1e-6)

    # Q loss: y = r + discount (1 - d) V(s', z); sum over the two critics of the mean squared error
    y = batch.rewards + discount * (1.0 - batch.terminals) * _v(value, next_obs_z)
    expected = ((_twin_q(critic, obs_z, batch.actions) - y) ** 2).mean(1).sum()
    assert float(critic_loss(critic, value, batch, jnp.array(z))) == pytest.approx(float(expected), rel=1e-5)

    # A(s, a, z) with the online critics
    expected = _twin_q(critic, obs_z, batch.actions).min(0) - v
    np.testing.assert_allclose(advantage(critic, value, batch.observations, batch.actions, jnp.array(z)), expected,
                               rtol=1e-5, atol=1e-6)
    # z matters: another trajectory's z gives another loss and advantage
    other = jnp.array(z[::-1])
    assert float(critic_loss(critic, value, batch, other)) != pytest.approx(float(expected.sum()), rel=1e-3)
    assert not np.allclose(advantage(critic, value, batch.observations, batch.actions, other), expected)


def test_sqlz_target_critics_move_every_second_step():
    tau = 0.25
    init, train = v2a.make_sqlz_train((8,), 1e-3, 8, 0.99, tau, 2, OBS_DIM, ACT_DIM, 2)
    dataset = _dataset([10, 10, 10])
    data = jax.device_put(v2a.SQLZData(v2a.to_transitions(dataset), dataset.episode_ids,
                                       np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)))
    hparams = v2a.SQLHyperparams(alpha=jnp.float32(0.2))
    run = jax.jit(lambda r, n: train(r, data, hparams, n), static_argnums=1)
    runner = jax.jit(init)(jax.random.PRNGKey(0))
    one, _ = run(runner, 1)
    for a, b in zip(jax.tree.leaves(one.state.critic_target_params),
                    jax.tree.leaves(runner.state.critic_target_params)):
        np.testing.assert_array_equal(a, b)  # step 1: not yet
    two, metrics = run(runner, 2)
    for target, critic, initial in zip(jax.tree.leaves(two.state.critic_target_params),
                                       jax.tree.leaves(two.state.critic.params),
                                       jax.tree.leaves(runner.state.critic_target_params)):
        np.testing.assert_allclose(target, tau * critic + (1 - tau) * initial, rtol=1e-6, atol=1e-7)
    assert all(np.isfinite(float(v)) for v in metrics.values())


# ---------------------------------------------------------------- the filter's weights and the probe
def test_q_weights_are_clamped_at_100():
    h, score, keep = jnp.array([0.5, 5.0, 1.0]), jnp.array([0.3, 0.9, 200.0]), jnp.array([1.0, 1.0, 1.0])
    np.testing.assert_allclose(v2a.q_weights(h, score, keep, 1, "exp_h"), [math.exp(0.5), 100.0, math.e, 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose(v2a.q_weights(h, score, keep, 1, "g_indicator"), [0.3, 0.9, 100.0, 1.0], rtol=1e-6)
    # within [-1, 1] (a cosine) the clamp changes nothing: DVDF's weights
    h, keep = jnp.array([-1.0, 0.2, 1.0, 0.7]), jnp.array([1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(v2a.q_weights(h, h, keep, 2, "exp_h"), dvdf.q_weights(h, h, keep, 2, "exp_h"))


def test_probes_and_their_split_by_trajectory():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [10, 6, 1])
    held = envs.diagnostics.probe_split(labels, 0.3, seed=0)
    assert held[labels == 0].sum() == 3 and held[labels == 1].sum() == 2 and not held[labels == 2].any()
    np.testing.assert_array_equal(held, envs.diagnostics.probe_split(labels, 0.3, seed=0))  # reproducible
    separated = rng.normal(size=(17, 5)) * 0.1 + np.eye(5)[labels] * 3.0
    probe = envs.diagnostics.nearest_centroid_probe(separated, labels, held)
    assert probe["accuracy"] == 1.0 and probe["chance"] == pytest.approx(3 / 5)
    assert probe["train_trajectories"] == 12 and probe["test_trajectories"] == 5
    # the centroid is of training trajectories only: a held-out point nearest another class's centroid is wrong
    moved = separated.copy()
    moved[np.flatnonzero(held & (labels == 0))[0]] = np.eye(5)[1] * 3.0
    assert envs.diagnostics.nearest_centroid_probe(moved, labels, held)["accuracy"] == pytest.approx(4 / 5)

    # a class carried by one low-variance direction next to a high-variance irrelevant one: the standardised
    # linear probe finds it, Euclidean centroids drown in the irrelevant direction
    labels = np.repeat([0, 1], 40)
    mixed = np.stack([100.0 * rng.normal(size=80), labels + 0.1 * rng.normal(size=80)], axis=1)
    held = envs.diagnostics.probe_split(labels, 0.3, seed=0)
    assert envs.diagnostics.linear_probe_accuracy(mixed, labels, held) == 1.0
    assert envs.diagnostics.nearest_centroid_probe(mixed, labels, held)["accuracy"] < 0.9

    labels = np.repeat([0, 1, 2], [10, 6, 1])
    diagnostics = envs.diagnostics.representation_diagnostics(
        separated.astype(np.float32), {"domain": (["a", "b", "c"], labels), "quality": (["q"], labels * 0)}, 0.3,
        seed=0)
    probe = diagnostics["probe"]["domain"]
    assert set(diagnostics["probe"]) == {"domain"} and probe["classes"] == ["a", "b", "c"]
    assert probe["accuracy"] == probe["nearest_centroid_accuracy"] == 1.0 and probe["test_trajectories"] == 5
    assert diagnostics["projection"].shape == (17, 2) and sum(diagnostics["pca_explained_variance"]) <= 1.0 + 1e-9


def test_projection_png_with_and_without_metadata(tmp_path):
    z = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    without = envs.diagnostics.representation_diagnostics(z, {}, 0.3, seed=0)  # no episode metadata: no probe
    assert without["probe"] == {}
    labels = {"domain": (["a", "b"], np.arange(9) % 2), "quality": (["q", "r", "s"], np.arange(9) % 3)}
    for name, trajectory_labels in (("without.png", {}), ("with.png", labels)):
        envs.diagnostics.plot_projection(tmp_path / name, without["projection"], trajectory_labels,
                                         "title\nsecond line")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_shared_helpers_are_identical_copies_of_dvdf():
    names = ["MLP", "TwinCritic", "ValueNet", "Actor", "Scorer", "IQLState", "Runner", "Transitions", "Hyperparams",
             "SQLState", "SQLRunner", "SQLHyperparams", "ScorerRunner", "ScorerData", "sql_value_loss",
             "critic_loss", "nce_loss", "dynamics_score", "make_scorer_train", "make_score_fn", "normalise_advantage",
             "filter_score", "keep_mask", "masked_mean", "expectile_loss", "value_loss", "weighted_critic_loss",
             "advantage_weight", "deterministic_actor_loss", "gaussian_actor_loss", "make_policy", "keep_count",
             "to_transitions", "reward_scale_of", "make_grid"]
    for name in names:
        assert inspect.getsource(getattr(v2a, name)) == inspect.getsource(getattr(dvdf, name)), name
    for constant in ("LOG_STD_MIN", "LOG_STD_MAX", "CACHE_VERSION"):
        assert getattr(v2a, constant) == getattr(dvdf, constant), constant
    # the harness and the diagnostics are not copied: what v2a.py uses of them is envs/'s own
    harness = {envs.run: ["write_atomic", "package_versions", "cache_key", "read_artifact", "stage_chunk",
                          "run_stage", "cached_stage", "save_stage", "run_flags", "open_run", "evaluation_entry",
                          "grid_evaluation_entry", "run_shardings", "divergence", "fingerprint", "dataset_arrays",
                          "LOSS_LIMIT", "STAGE_CHUNKS", "STAGE_SAVE_SECONDS", "load_source_target", "datasets_line",
                          "grid_level", "make_grid_evaluate", "settings_line", "train_grid"],
               envs.diagnostics: ["separation_auc", "held_out_separation", "holdout_split", "held_out",
                                  "filter_diagnostics", "filter_sums", "episode_groups", "trajectory_groups",
                                  "probe_split", "nearest_centroid_probe", "linear_probe_accuracy",
                                  "representation_diagnostics", "plot_projection", "describe_representation",
                                  "HOLDOUT_MAX", "SOURCE_HOLDOUT_SEED", "GROUP_KEYS", "PROBE_STEPS", "PROBE_LR", "PROBE_L2"]}
    for module, names in harness.items():
        for name in names:
            assert getattr(v2a, name, getattr(module, name)) is getattr(module, name), f"v2a.py copies {name}"


def test_v2a_otdf_is_v2a_but_for_the_dynamics_score():
    """algos/v2a_otdf.py holds v2a.py's code unchanged but for the dynamics score and its stages (otdf.py's, whose
    copies test_otdf.py checks) and main()."""
    names = ["MLP", "TwinCritic", "ValueNet", "Actor", "GRUWeights", "GateWeights", "MaskedGRU", "MaskedGRUCellStep",
             "TrajectoryEncoder", "DeltaDecoder", "IQLState", "Runner", "Transitions", "Hyperparams",
             "normalise_advantage", "filter_score", "keep_count", "keep_mask", "q_weights", "masked_mean",
             "expectile_loss", "value_loss", "weighted_critic_loss", "advantage_weight", "deterministic_actor_loss",
             "gaussian_actor_loss", "make_policy", "EncoderState", "EncoderRunner", "EncoderData", "gaussian_kl",
             "encoder_decoder_loss", "make_window_loss", "sample_windows", "make_encoder_train", "trajectory_bounds",
             "encoder_steps", "encoder_stage", "relabel_rows", "make_encode_fn", "relabel", "SQLState", "SQLRunner",
             "SQLHyperparams", "SQLZData", "sql_value_loss", "critic_loss", "with_z", "make_sqlz_losses",
             "make_sqlz_train", "reward_scale_of", "sqlz_stage", "check_args", "to_transitions", "make_grid",
             "report"]
    for name in names:
        assert inspect.getsource(getattr(v2a_otdf, name)) == inspect.getsource(getattr(v2a, name)), name
    for constant in ("LOG_STD_MIN", "LOG_STD_MAX", "CACHE_VERSION", "FILTER_WEIGHT_MAX", "RELABEL_CHUNK"):
        assert getattr(v2a_otdf, constant) == getattr(v2a, constant), constant
    assert v2a_otdf.describe_representation is envs.diagnostics.describe_representation


# ---------------------------------------------------------------- end to end through main(), on real rollouts
def _rollouts(domain, lengths, rng, first_episode):
    """Episodes of the domain, alternately uniform random actions ("random") and a noisy sinusoid ("medium")."""
    env = make_env(domain)
    rows, metadata = [], []
    for e, length in enumerate(lengths):
        quality = ("random", "medium")[e % 2]
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        phase = rng.uniform(0, 2 * np.pi, env.action_space.shape)
        for t in range(length):
            if quality == "random":
                action = rng.uniform(-1, 1, env.action_space.shape)
            else:
                action = np.clip(np.sin(0.3 * t + phase) + 0.1 * rng.normal(size=phase.shape), -1, 1)
            next_obs, reward, terminated, _, _ = env.step(action)
            rows.append((obs, action, reward, next_obs, float(terminated), float(t == length - 1 and not terminated),
                         first_episode + e))
            obs = next_obs
            if terminated:
                break
        metadata.append({"domain": domain, "quality": quality, "policy": quality})
    env.close()
    return rows, metadata


def _save(rows, metadata, path, ref=(None, None)):
    columns = [np.array(column) for column in zip(*rows)]
    as_float = [c.astype(np.float32) for c in columns[:6]]
    save_hdf5(Dataset(*as_float, episode_ids=columns[6].astype(np.int32), ref_min_score=ref[0],
                      ref_max_score=ref[1], episode_metadata=tuple(metadata), name=path.stem), str(path))
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A heterogeneous source (two shifted HalfCheetah domains x two behaviours, 8 episodes each) and a target."""
    folder, rng = tmp_path_factory.mktemp("v2a_data"), np.random.default_rng(0)
    morph, morph_meta = _rollouts("halfcheetah-morph", rng.integers(25, 60, 8), rng, 0)
    gravity, gravity_meta = _rollouts("halfcheetah-gravity-0.5", rng.integers(25, 60, 8), rng, 8)
    target, target_meta = _rollouts("halfcheetah", rng.integers(30, 50, 5), rng, 0)
    return {"source": _save(morph + gravity, morph_meta + gravity_meta, folder / "source.hdf5"),
            "target": _save(target, target_meta, folder / "target.hdf5", (REF_MIN, REF_MAX)),
            "cache": str(folder / "cache")}


def _flags(datasets, out, *extra):
    return ["--source-dataset", datasets["source"], "--target-dataset", datasets["target"], "--references", "zoo",
            "--source", "halfcheetah-morph", "--out", str(out), "--cache-dir", datasets["cache"], "--seed", "3", "--num-seeds", "2",
            "--encoder-steps", "20", "--sqlz-steps", "20", "--scorer-steps", "20", "--steps", "100", "--eval-every",
            "50", "--eval-episodes", "1", "--hidden", "16", "16", "--gru-hidden", "8", "--z-dim", "4", "--window",
            "20", "--encoder-batch-size", "4", "--sqlz-batch-size", "32", "--scorer-batch-size", "16", "--repr-dim",
            "8", "--batch-size", "32", "--target-size", "100", *extra]


def test_end_to_end_results_json_probe_and_png(datasets, tmp_path):
    out = tmp_path / "run"
    returned = v2a.main(_flags(datasets, out))
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["algo"] == "v2a" and results["finished"] and results["step"] == 100
    assert results["args"]["lam"] == [0.6] and results["args"]["xi"] == [0.5]
    assert results["grid"] == [{"lam": 0.6, "xi": 0.5, "seed": seed, "keep_count": 8} for seed in (3, 4)]
    domains = ["halfcheetah-gravity-0.5", "halfcheetah-morph"]
    assert results["data"]["source_groups"] == {"quality": ["medium", "random"], "domain": domains}
    assert results["data"]["source_trajectories"] == 16

    stages = results["stages"]
    assert {stage["origin"] for stage in stages.values()} == {"trained"}
    assert stages["encoder"]["trajectories"] == 16 and stages["encoder"]["z_dim"] == 4
    assert stages["sqlz"]["encoder"] == Path(stages["encoder"]["path"]).stem and stages["sqlz"]["alpha"] == 0.2
    for stage in stages.values():
        assert Path(stage["path"]).parent == Path(datasets["cache"])
        assert all(math.isfinite(v) for v in stage["final_losses"].values())

    representation = results["representation"]
    assert representation["trajectories"] == 16 and representation["z_dim"] == 4
    for key in ("domain", "quality"):
        probe = representation["probe"][key]
        assert all(0.0 <= probe[name] <= 1.0 for name in ("accuracy", "chance", "nearest_centroid_accuracy"))
        assert probe["test_trajectories"] == 4 and probe["train_trajectories"] == 12  # 30% of each class of 8 (4 + 4)
    assert representation["probe"]["domain"]["classes"] == domains
    png = out / representation["projection_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000

    assert [e["step"] for e in results["evaluations"]] == [50, 100]
    for evaluation in results["evaluations"]:
        assert len(evaluation["scores"]) == 2 and all(map(math.isfinite, evaluation["scores"]))
        np.testing.assert_allclose(evaluation["scores"],
                                   100 * (np.array(evaluation["returns"]) - REF_MIN) / (REF_MAX - REF_MIN))
        assert all(math.isfinite(x) for values in evaluation["losses"].values() for x in values)
        diagnostics = evaluation["filter"]
        assert diagnostics["kept_fraction"] == [0.5, 0.5]
        for key in ("domain", "quality"):  # the share of each domain and quality among kept samples
            shares = diagnostics["kept_share"][key]
            for run in range(2):
                assert sum(share[run] for share in shares.values()) == pytest.approx(1.0)
        for name in ("dynamics_score", "advantage", "filter_score"):
            assert all(math.isfinite(x) for x in diagnostics[f"{name}_kept"] + diagnostics[f"{name}_dropped"])
        assert all(1.0 / math.e - 1e-6 <= w <= math.e + 1e-6 for w in diagnostics["q_weight_kept"])
    final = results["final"]
    assert final["scores"] == results["evaluations"][-1]["scores"] and final["score_mean"] is not None
    assert (out / "checkpoint.msgpack").exists() and not list(out.glob("*.tmp"))

    # again on the same data and stage flags: every stage from the cache, the finished run rewritten by --resume
    resumed = v2a.main(_flags(datasets, out, "--resume"))
    assert {stage["origin"] for stage in resumed["stages"].values()} == {"cache"}
    assert resumed["final"] == results["final"] and resumed["representation"] == results["representation"]


@pytest.mark.parametrize("flags, message", [
    (["--lam", "1.5"], "--lam must be one or more values in [0, 1]"),
    (["--encoder-steps", "-1"], "--encoder-steps must be 0 (an untrained encoder) or more"),
    (["--window", "0"], "--window must be at least 1"),
    (["--relabel-window", "0"], "--relabel-window must be at least 1 step"),
    (["--probe-fraction", "0.9"], "--probe-fraction must be in (0, 0.5]"),
    (["--kl-weight", "-1"], "--kl-weight must be 0 or more"),
    (["--source", "halfcheeta"], "Unknown --source 'halfcheeta'"),
])
def test_flags_out_of_range_end_with_one_sentence(flags, message, tmp_path):
    assert_one_sentence_exit(v2a.main, ["--out", str(tmp_path), *flags], message)


def test_representation_only_stops_after_the_encoder_and_its_probe(datasets, tmp_path):
    """--representation-only: the encoder (0 steps: untrained), the probes and the projection; no target data, no
    other stage, no checkpoint."""
    out = tmp_path / "representation"
    flags = ["--source-dataset", datasets["source"], "--source", "halfcheetah-morph", "--out", str(out),
             "--cache-dir", str(tmp_path / "cache"), "--gru-hidden", "8", "--z-dim", "4", "--hidden", "16", "16",
             "--window", "20", "--encoder-batch-size", "4", "--representation-only"]
    untrained = v2a.main([*flags, "--encoder-steps", "0", "--target", "hopper"])  # no target data is touched
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(untrained))
    assert results["finished"] and results["representation_only"] and list(results["stages"]) == ["encoder"]
    assert results["stages"]["encoder"]["step"] == 0 and results["data"]["source_trajectories"] == 16
    assert results["representation"]["probe"]["domain"]["classes"] == ["halfcheetah-gravity-0.5", "halfcheetah-morph"]
    assert (out / "z_projection.png").read_bytes()[:4] == b"\x89PNG" and not (out / "checkpoint.msgpack").exists()
    assert {path.name.split("-")[0] for path in (tmp_path / "cache").glob("*.msgpack")} == {"encoder"}
    trained = v2a.main([*flags, "--encoder-steps", "5"])
    assert trained["stages"]["encoder"]["step"] == 5
    assert trained["representation"]["z_norm_mean"] != untrained["representation"]["z_norm_mean"]


def test_probe_benchmark_tables_each_budget(datasets, tmp_path):
    """benchmarks/v2a_probe.py on a heterogeneous HDF5 dataset: one row per encoder budget, with the accuracies
    of the runs' results.json, and the projection of the largest budget."""
    results_dir = tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "v2a_probe.py"), "--mixtures", "--datasets",
               datasets["source"], "--encoder-steps", "2", "0", "--runs", str(tmp_path / "runs"), "--cache-dir",
               str(tmp_path / "cache"), "--results", str(results_dir), "--name", "probe"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    rows = json.loads((results_dir / "probe.json").read_text())["rows"]
    assert [(row["mixture"], row["encoder_steps"]) for row in rows] == [("source", 0), ("source", 2)]
    table = (results_dir / "probe.md").read_text()
    for row in rows:
        run = json.loads((Path(row["out"]) / "results.json").read_text())
        probe = run["representation"]["probe"]["domain"]
        assert run["args"]["encoder_steps"] == row["encoder_steps"] and run["representation_only"]
        assert row["domain"]["linear"] == probe["accuracy"] and row["domain"]["chance"] == probe["chance"] == 0.5
        assert (f"| source | {row['encoder_steps']} | 16 | {probe['accuracy']:.3f} | "
                f"{probe['nearest_centroid_accuracy']:.3f} | 0.500 |") in table
    assert (results_dir / "probe_source.png").read_bytes() == (Path(rows[1]["out"]) / "z_projection.png").read_bytes()
