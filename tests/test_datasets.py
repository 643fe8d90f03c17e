"""envs/datasets.py: the Minari and D4RL-HDF5 loaders agree, episode boundaries, subsampling, errors."""
import json
import os

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

import envs.datasets as datasets
from envs import Dataset, generated_dataset_id, load_dataset, save_hdf5, subsample
from envs.datasets import reduce_ant_observations

OBS, ACT = 17, 6  # halfcheetah
TERMINATED_LENGTH, TRUNCATED_LENGTH = 4, 6  # episode 0 terminates early, episode 1 hits the time limit
N = TERMINATED_LENGTH + TRUNCATED_LENGTH


def make_episodes(obs_dim=OBS, act_dim=ACT, seed=0):
    """Two episodes as Minari stores them: T+1 observations, T actions/rewards/terminations/truncations."""
    rng = np.random.default_rng(seed)
    episodes = []
    for length, terminated in ((TERMINATED_LENGTH, True), (TRUNCATED_LENGTH, False)):
        terminations = [False] * length
        truncations = [False] * length
        (terminations if terminated else truncations)[-1] = True
        episodes.append(dict(
            observations=rng.normal(size=(length + 1, obs_dim)),
            actions=rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
            rewards=rng.normal(size=length).tolist(), terminations=terminations, truncations=truncations))
    return episodes


def write_minari(dataset_id, episodes, *, env_id="HalfCheetah-v5", infos=None, **kwargs):
    buffers = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                             terminations=e["terminations"], truncations=e["truncations"],
                             infos=None if infos is None else infos[i])
               for i, e in enumerate(episodes)]
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=gym.make(env_id), eval_env=env_id, algorithm_name="test", author="test", author_email="test",
        code_permalink="test", description="test", **kwargs)


def write_d4rl(path, episodes, *, timeouts=True, drop=(), **attrs):
    """The same episodes as flat D4RL arrays, written with h5py directly (not through save_hdf5)."""
    columns = dict(
        observations=np.concatenate([e["observations"][:-1] for e in episodes]),
        next_observations=np.concatenate([e["observations"][1:] for e in episodes]),
        actions=np.concatenate([e["actions"] for e in episodes]),
        rewards=np.concatenate([e["rewards"] for e in episodes]),
        terminals=np.concatenate([e["terminations"] for e in episodes]),
        timeouts=np.concatenate([e["truncations"] for e in episodes]))
    with h5py.File(path, "w") as file:
        for key, value in columns.items():
            if key not in drop and (timeouts or key != "timeouts"):
                file.create_dataset(key, data=value)
        file.attrs.update(attrs)
    return str(path)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty local Minari store; MuJoCo's log file lands in tmp_path too."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_same(a: Dataset, b: Dataset):
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
                "episode_ids"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert (a.ref_min_score, a.ref_max_score) == (b.ref_min_score, b.ref_max_score)
    assert a.episode_metadata == b.episode_metadata


def test_minari_and_d4rl_loaders_agree(store):
    episodes = make_episodes()
    write_minari("test/halfcheetah/tiny-v0", episodes, ref_min_score=-1.0, ref_max_score=5.0)
    from_minari = load_dataset("test/halfcheetah/tiny-v0", domain="halfcheetah")
    from_hdf5 = load_dataset(write_d4rl(store / "tiny.hdf5", episodes, ref_min_score=-1.0, ref_max_score=5.0),
                             domain="halfcheetah")
    from_hdf5_no_timeouts = load_dataset(
        write_d4rl(store / "tiny_no_timeouts.hdf5", episodes, timeouts=False, ref_min_score=-1.0,
                   ref_max_score=5.0))
    assert_same(from_minari, from_hdf5)
    assert_same(from_minari, from_hdf5_no_timeouts)

    data = from_minari
    assert (data.size, data.num_episodes, data.obs_dim, data.act_dim) == (N, 2, OBS, ACT)
    assert data.name == "test/halfcheetah/tiny-v0"
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        assert getattr(data, key).dtype == np.float32, key
    assert data.episode_ids.dtype == np.int32
    # 1 only at the true termination; the time-limit end is a timeout, never a terminal.
    np.testing.assert_array_equal(data.terminals, [0, 0, 0, 1] + [0] * 6)
    np.testing.assert_array_equal(data.timeouts, [0, 0, 0, 0] + [0] * 5 + [1])
    np.testing.assert_array_equal(data.episode_ids, [0] * 4 + [1] * 6)
    assert (data.ref_min_score, data.ref_max_score) == (-1.0, 5.0)
    # Transitions are obs[:-1] -> obs[1:] inside each episode, and never cross the boundary.
    for episode_id, episode in enumerate(episodes):
        rows = data.episode_ids == episode_id
        np.testing.assert_array_equal(data.observations[rows], episode["observations"][:-1].astype(np.float32))
        np.testing.assert_array_equal(data.next_observations[rows], episode["observations"][1:].astype(np.float32))
    last = TERMINATED_LENGTH - 1
    assert not np.array_equal(data.next_observations[last], data.observations[last + 1])
    np.testing.assert_array_equal(data.rewards, np.float32(np.concatenate([e["rewards"] for e in episodes])))


def test_d4rl_without_timeouts_splits_where_observations_jump(store):
    # Two time-limit episodes back to back, no terminals, no timeouts: only the jump marks the boundary.
    episodes = make_episodes()
    episodes[0]["terminations"] = [False] * TERMINATED_LENGTH
    data = load_dataset(write_d4rl(store / "jump.hdf5", episodes, timeouts=False))
    np.testing.assert_array_equal(data.episode_ids, [0] * 4 + [1] * 6)
    np.testing.assert_array_equal(data.terminals, np.zeros(N))
    np.testing.assert_array_equal(data.timeouts, [0, 0, 0, 1] + [0] * 5 + [1])


def test_episode_metadata_from_minari_metadata_and_infos(store):
    episodes = make_episodes()
    stored = [{"domain": "halfcheetah", "quality": "medium", "policy": "sac_a"},
              {"domain": "halfcheetah", "quality": "expert", "policy": "sac_b"}]
    dataset = write_minari("test/halfcheetah/meta-v0", episodes)
    dataset.storage.update_metadata({"episode_metadata": json.dumps(stored)})
    assert load_dataset("test/halfcheetah/meta-v0").episode_metadata == tuple(stored)

    infos = [{"domain": ["halfcheetah"] * len(e["rewards"]), "quality": ["random"] * len(e["rewards"])}
             for e in episodes]
    write_minari("test/halfcheetah/infos-v0", episodes, infos=infos)
    assert load_dataset("test/halfcheetah/infos-v0").episode_metadata == (
        {"domain": "halfcheetah", "quality": "random"},) * 2
    assert load_dataset("test/halfcheetah/meta-v0").ref_min_score is None  # no refs stored: None, never 0


def test_generated_dataset_by_domain_and_quality(store, monkeypatch):
    assert generated_dataset_id("hopper-gravity", "medium") == "crossdomain/hopper-gravity/medium-v0"
    assert generated_dataset_id("hopper-gravity", "medium", "v5") == "crossdomain-v5/hopper-gravity/medium-v0"
    calls = []

    class FakeGenerator:  # stands in for envs/generate.py
        @staticmethod
        def ensure_dataset(domain, quality, physics):  # the real one also remakes a dataset of an older zoo
            calls.append((domain, quality))
            if generated_dataset_id(domain, quality, physics) not in minari.list_local_datasets():
                write_minari(generated_dataset_id(domain, quality, physics), make_episodes())

    monkeypatch.setattr(datasets, "_find_generator", lambda: FakeGenerator)
    data = load_dataset(domain="halfcheetah", quality="medium")
    assert calls == [("halfcheetah", "medium")] and data.name == "crossdomain/halfcheetah/medium-v0"
    assert data.size == N
    again = load_dataset(domain="halfcheetah", quality="medium")  # the generator is asked, and keeps it
    assert calls == [("halfcheetah", "medium")] * 2
    np.testing.assert_array_equal(again.observations, data.observations)


def test_missing_datasets_end_in_one_sentence(store, monkeypatch):
    monkeypatch.setattr(datasets, "_find_generator", lambda: None)
    with pytest.raises(SystemExit, match=r"crossdomain/hopper/expert-v0 is not in the local Minari store.*; make it "
                                         r"with `python -m envs.generate --domain hopper --quality expert` or name a "
                                         r"Minari id or HDF5 path instead \(--source-dataset / --target-dataset\)\.$"):
        load_dataset(domain="hopper", quality="expert")
    with pytest.raises(SystemExit, match=r"mujoco/hopper/medium-v0 is not in the local store .*download=True") as error:
        load_dataset("mujoco/hopper/medium-v0")
    # what it suggests exists: minari's own command (no script has a --download flag)
    assert "`minari download mujoco/hopper/medium-v0`" in str(error.value) and "--download" not in str(error.value)
    with pytest.raises(SystemExit, match=r"nowhere\.hdf5 does not exist"):
        load_dataset(str(store / "nowhere.hdf5"))
    with pytest.raises(SystemExit, match="Unknown dataset quality 'meduim'"):
        load_dataset(domain="hopper", quality="meduim")
    with pytest.raises(SystemExit, match="give both domain and quality"):
        load_dataset(domain="hopper")
    with pytest.raises(SystemExit, match="Unknown domain 'hoper'"):
        load_dataset(domain="hoper", quality="medium")


def test_d4rl_missing_keys(store):
    episodes = make_episodes()
    with pytest.raises(SystemExit, match="no next_observations; it cannot be rebuilt"):
        load_dataset(write_d4rl(store / "no_next.hdf5", episodes, drop=("next_observations",)))
    with pytest.raises(SystemExit, match="lacks actions; a D4RL-format file needs"):
        load_dataset(write_d4rl(store / "no_actions.hdf5", episodes, drop=("actions",)))


def test_size_mismatch(store):
    path = write_d4rl(store / "cheetah.hdf5", make_episodes())
    with pytest.raises(SystemExit, match=r"observation size 17 and action size 6, but domain hopper has "
                                         r"observation size 11 and action size 3"):
        load_dataset(path, domain="hopper")


@pytest.mark.parametrize("obs_dim", [105, 111])
def test_ant_contact_forces_are_dropped(store, capsys, obs_dim):
    episodes = make_episodes(obs_dim=obs_dim, act_dim=8)
    data = load_dataset(write_d4rl(store / f"ant{obs_dim}.hdf5", episodes), domain="ant")
    assert data.obs_dim == 27 and data.next_observations.shape == (N, 27)
    np.testing.assert_array_equal(data.observations[:TERMINATED_LENGTH],
                                  episodes[0]["observations"][:-1, :27].astype(np.float32))
    assert f"first 27 of {obs_dim}" in capsys.readouterr().out
    assert reduce_ant_observations(np.ones((3, obs_dim))).shape == (3, 27)
    with pytest.raises(SystemExit, match="size 40 cannot be reduced"):
        reduce_ant_observations(np.ones((3, 40)))


def test_ant_minari_v5_default_observation(store):
    episodes = make_episodes(obs_dim=105, act_dim=8)
    write_minari("test/ant/tiny-v0", episodes, env_id="Ant-v5")
    assert load_dataset("test/ant/tiny-v0", domain="ant").obs_dim == 27
    assert load_dataset("test/ant/tiny-v0").obs_dim == 105  # no domain, no reduction


@pytest.fixture
def tiny(store):
    episodes = make_episodes(seed=1)
    data = load_dataset(write_d4rl(store / "tiny.hdf5", episodes, ref_min_score=0.0, ref_max_score=1.0))
    return Dataset(**{**data.__dict__, "episode_metadata": ({"policy": "a"}, {"policy": "b"})})


def test_subsample_count_fraction_seed(tiny):
    part = subsample(tiny, count=5, seed=3)
    assert part.size == 5 and part.ref_max_score == 1.0 and part.episode_metadata == tiny.episode_metadata
    rows = [int(np.flatnonzero((tiny.observations == row).all(axis=1))[0]) for row in part.observations]
    assert rows == sorted(set(rows))  # distinct, in dataset order
    for key in ("actions", "rewards", "next_observations", "terminals", "timeouts", "episode_ids"):
        np.testing.assert_array_equal(getattr(part, key), getattr(tiny, key)[rows], err_msg=key)
    np.testing.assert_array_equal(subsample(tiny, count=5, seed=3).observations, part.observations)
    assert not np.array_equal(subsample(tiny, count=5, seed=4).observations, part.observations)
    assert subsample(tiny, fraction=0.3).size == 3
    assert subsample(tiny, fraction=1.0).size == N
    assert subsample(tiny, fraction=0.01).size == 1


def test_subsample_with_replacement(tiny):
    part = subsample(tiny, count=3 * N, replace=True, seed=0)
    assert part.size == 3 * N
    assert len(np.unique(part.observations, axis=0)) < part.size  # duplicates are drawn
    assert np.all(np.diff(part.episode_ids) >= 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of fraction or count"),
    (dict(fraction=0.5, count=3), "exactly one of fraction or count"),
    (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
    (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
    (dict(count=0), "count must be a positive integer"),
    (dict(count=2.5), "count must be a positive integer"),
    (dict(count=N + 1), "without replacement"),
])
def test_subsample_argument_errors(tiny, kwargs, message):
    with pytest.raises(SystemExit, match=message):
        subsample(tiny, **kwargs)


def test_save_hdf5_round_trip(tiny, store):
    part = subsample(tiny, count=4, seed=2)  # episode ids may now have gaps; they must survive the file
    path = store / "out" / "part.hdf5"
    save_hdf5(part, str(path))
    assert os.listdir(store / "out") == ["part.hdf5"]  # no temporary file left behind
    back = load_dataset(str(path))
    assert_same(part, back)
    save_hdf5(tiny, str(path))  # overwrite in place
    assert_same(tiny, load_dataset(str(path)))


@pytest.mark.parametrize("field", ["observations", "actions", "rewards", "next_observations"])
def test_non_finite_values_are_refused_with_one_sentence(tmp_path, field):
    """NaN or inf anywhere in a dataset would end a run with NaN scores; it is refused at load instead."""
    path = tmp_path / "bad.hdf5"
    rng = np.random.default_rng(0)
    n = 50
    arrays = {"observations": rng.normal(size=(n, 17)), "actions": rng.uniform(-1, 1, (n, 6)),
              "rewards": rng.normal(size=n), "next_observations": rng.normal(size=(n, 17)),
              "terminals": np.zeros(n, bool), "timeouts": (np.arange(n) % 10 == 9)}
    arrays[field] = arrays[field].astype(np.float64)
    arrays[field][[3, 7]] = [np.nan, np.inf] if arrays[field].ndim == 1 else np.nan
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            file[key] = value
    with pytest.raises(SystemExit) as stop:
        load_dataset(str(path))
    assert str(stop.value) == (f"Dataset {path}: {field} holds NaN or infinite values in 2 of 50 rows (the first at "
                               f"row 3); fix or drop those transitions before training on it.")


def test_non_finite_values_in_a_minari_dataset_are_refused_with_one_sentence(store):
    episodes = make_episodes()
    episodes[1]["rewards"][2] = float("nan")
    write_minari("t/nan/medium-v0", episodes)
    with pytest.raises(SystemExit) as stop:
        load_dataset("t/nan/medium-v0")
    assert str(stop.value) == (f"Dataset t/nan/medium-v0: rewards holds NaN or infinite values in 1 of {N} rows (the "
                               f"first at row {TERMINATED_LENGTH + 2}); fix or drop those transitions before training "
                               f"on it.")
