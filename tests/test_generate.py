"""The generator: deterministic for a seed, right size, metadata and references, and transitions that the
domain's physics reproduces from the stored MuJoCo state."""
import json
import shutil

import minari
import numpy as np
import pytest

import envs.datasets as datasets_module
import envs.generate as generate
from envs import QUALITIES, domain_info, load_dataset, make_env
from synthetic import fake_actor as _fake_actor  # the zoo fixture is conftest.py's


def _arrays(dataset_id):
    ds = minari.load_dataset(dataset_id)
    return [np.concatenate([getattr(e, k) for e in ds.iterate_episodes()]) for k in
            ("observations", "actions", "rewards", "terminations", "truncations")]


def test_same_seed_same_dataset_and_metadata(zoo):
    generate.generate("hopper-kinematic", "medium-expert", size=1500, seed=3, dataset_id="t/a/me-v0")
    generate.generate("hopper-kinematic", "medium-expert", size=1500, seed=3, dataset_id="t/b/me-v0")
    generate.generate("hopper-kinematic", "medium-expert", size=1500, seed=4, dataset_id="t/c/me-v0")
    a, b, c = _arrays("t/a/me-v0"), _arrays("t/b/me-v0"), _arrays("t/c/me-v0")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    data = load_dataset("t/a/me-v0", domain="hopper-kinematic")
    assert data.size == 1500
    assert (data.ref_min_score, data.ref_max_score) == (-5.0, 3000.0)
    qualities = [m["quality"] for m in data.episode_metadata]
    assert len(qualities) == data.num_episodes and qualities == sorted(qualities, key=["medium", "expert"].index)
    per_episode = np.bincount(data.episode_ids)
    kept = {q: per_episode[[i for i, m in enumerate(data.episode_metadata) if m["quality"] == q]].sum()
            for q in ("medium", "expert")}
    assert kept == {"medium": 750, "expert": 750}
    assert all(m["domain"] == "hopper-kinematic" and m["policy"].endswith(f"{m['quality']}.npz")
               for m in data.episode_metadata)


def test_medium_replay_follows_the_snapshots(zoo):
    generate.generate("hopper-kinematic", "medium-replay", seed=0)  # default size: the medium step, 3000
    data = load_dataset(domain="hopper-kinematic", quality="medium-replay")
    assert data.size == 3000
    policies = [m["policy"] for m in data.episode_metadata]
    # 0-1000 random actions, 1000-2000 snapshot 1000, 2000-3000 snapshot 2000, in order
    order = [p for i, p in enumerate(policies) if i == 0 or p != policies[i - 1]]
    assert order == ["uniform-random", "hopper-kinematic/replay/actor_1000.npz", "hopper-kinematic/replay/actor_2000.npz"]


def test_medium_replay_of_a_fine_tuned_run_starts_with_the_loaded_actor(zoo):
    info = domain_info("hopper-kinematic")  # policy_zoo writes a fine-tuned run's starting actor as actor_0
    _fake_actor(zoo / "replay" / "actor_0.npz", info.obs_dim, info.act_dim, 5, 0)
    pieces = generate.plan("hopper-kinematic", "medium-replay", 3000)
    assert [(p.name, n) for p, n, _ in pieces] == [("hopper-kinematic/replay/actor_0.npz", 1000),
                                                  ("hopper-kinematic/replay/actor_1000.npz", 1000),
                                                  ("hopper-kinematic/replay/actor_2000.npz", 1000)]


def test_stored_state_reproduces_transitions(zoo):
    generate.generate("hopper-kinematic", "medium", size=400, seed=1)
    ds = minari.load_dataset("crossdomain/hopper-kinematic/medium-v0")
    env = make_env("hopper-kinematic")
    env.reset(seed=0)
    checked = 0
    for episode in ds.iterate_episodes():
        for t in range(0, len(episode.actions), 37):
            env.unwrapped.set_state(episode.infos["qpos"][t], episode.infos["qvel"][t])
            obs, reward, *_ = env.step(episode.actions[t])
            np.testing.assert_allclose(obs, episode.observations[t + 1], rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(reward, episode.rewards[t], rtol=1e-6)
            checked += 1
    assert checked >= 10
    # ... and the unshifted domain does not: the shift is in the data
    plain = make_env("hopper")
    plain.reset(seed=0)
    episode = next(ds.iterate_episodes())
    errors = []
    for t in range(len(episode.actions)):
        plain.unwrapped.set_state(episode.infos["qpos"][t], episode.infos["qvel"][t])
        obs, *_ = plain.step(episode.actions[t])
        errors.append(np.abs(obs - episode.observations[t + 1]).max())
    assert max(errors) > 1e-3


def test_bad_input_is_one_sentence(zoo):
    with pytest.raises(SystemExit, match="Unknown quality 'good'"):
        generate.generate("hopper-kinematic", "good")
    with pytest.raises(SystemExit, match="No expert policy for hopper-morph"):
        generate.generate("hopper-morph", "expert", size=10)


def test_cached_dataset_is_remade_when_the_zoo_changes(zoo, capsys):
    info = domain_info("hopper-kinematic")
    first = load_dataset(domain="hopper-kinematic", quality="medium-replay")
    again = load_dataset(domain="hopper-kinematic", quality="medium-replay")
    np.testing.assert_array_equal(first.actions, again.actions)
    assert capsys.readouterr().out.count("Generating") == 1  # cached the second time
    _fake_actor(zoo / "replay" / "actor_2000.npz", info.obs_dim, info.act_dim, 99, 2000)  # retrained snapshot
    remade = load_dataset(domain="hopper-kinematic", quality="medium-replay")
    assert "Generating" in capsys.readouterr().out
    assert not np.array_equal(first.actions, remade.actions)


def test_datasets_record_their_physics_and_a_mismatch_is_announced(zoo, capsys):
    """Each physics has its own ids; the metadata says which; loading data of the other physics says so once;
    the transitions are those of the dataset's own physics."""
    for physics in ("papers", "v5"):
        generate.generate("hopper-kinematic", "random", size=300, physics=physics)
    papers = load_dataset("crossdomain/hopper-kinematic/random-v0")  # the default physics' id
    v5 = load_dataset("crossdomain-v5/hopper-kinematic/random-v0", physics="v5")
    assert papers.name == "crossdomain/hopper-kinematic/random-v0" and papers.physics == "papers"
    assert v5.name == "crossdomain-v5/hopper-kinematic/random-v0" and v5.physics == "v5"
    assert minari.load_dataset(v5.name).storage.metadata["physics"] == "v5"
    assert "note:" not in capsys.readouterr().out
    load_dataset(v5.name, domain="hopper-kinematic")  # v5 data in a papers-physics run
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert printed == [f"note: {v5.name} was made in the v5 physics and this run uses the papers physics "
                       f"(--physics v5 runs in the data's own)."]
    for dataset, physics in ((papers, "papers"), (v5, "v5")):  # re-simulate a transition in each physics
        episode = next(minari.load_dataset(dataset.name).iterate_episodes())
        errors = {}
        for other in ("papers", "v5"):
            env = make_env("hopper-kinematic", other)
            env.reset(seed=0)
            env.unwrapped.set_state(episode.infos["qpos"][5], episode.infos["qvel"][5])
            errors[other] = float(np.abs(env.step(episode.actions[5])[0] - episode.observations[6]).max())
        assert errors[physics] < 1e-6 < 1e-5 < errors["v5" if physics == "papers" else "papers"]


def test_mixture_is_made_on_demand_with_each_episodes_domain_and_quality(zoo, monkeypatch, tmp_path):
    refs = json.loads(generate.REFERENCES.read_text()) | {"hopper-morph": {"random": -10.0, "expert": 2000.0}}
    generate.REFERENCES.write_text(json.dumps(refs))
    info = domain_info("hopper-morph")
    _fake_actor(tmp_path / "policies" / "hopper-morph" / "expert.npz", info.obs_dim, info.act_dim, 5, 9000)
    components = [("hopper-kinematic", "random", 300), ("hopper-morph", "expert", 500), ("hopper-kinematic",
                                                                                           "medium", 200)]
    monkeypatch.setitem(generate.MIXTURES, "tiny", components)
    data = load_dataset("crossdomain/mix/tiny-v0")  # not in the store: generated first
    assert data.size == 1000
    assert (data.ref_min_score, data.ref_max_score) == (-5.0, 3000.0)  # the first component's domain
    per_episode = np.bincount(data.episode_ids)
    counts = {}
    for episode, meta in enumerate(data.episode_metadata):
        key = (meta["domain"], meta["quality"])
        counts[key] = counts.get(key, 0) + per_episode[episode]
        assert meta["policy"] == ("uniform-random" if meta["quality"] == "random"
                                  else f"{meta['domain']}/{meta['quality']}.npz")
    assert counts == {(d, q): n for d, q, n in components}
    # the hopper-morph episodes follow hopper-morph's physics: re-simulated from the stored state, the first
    # transition of each reproduces its next observation there and not in hopper-kinematic
    episodes = list(minari.load_dataset("crossdomain/mix/tiny-v0").iterate_episodes())
    morph = [e for e, meta in zip(episodes, data.episode_metadata) if meta["domain"] == "hopper-morph"][0]
    errors = {}
    for domain in ("hopper-morph", "hopper-kinematic"):
        env = make_env(domain)
        env.reset(seed=0)
        env.unwrapped.set_state(morph.infos["qpos"][0], morph.infos["qvel"][0])
        obs = env.step(morph.actions[0])[0]
        errors[domain] = float(np.abs(obs - morph.observations[1]).max())
    assert errors["hopper-morph"] < 1e-6 < errors["hopper-kinematic"]
    # a second load uses the stored mixture: the same arrays, not made again
    monkeypatch.setattr(generate, "generate_mixture", lambda *args, **kwargs: pytest.fail("made again"))
    again = load_dataset("crossdomain/mix/tiny-v0")
    np.testing.assert_array_equal(again.observations, data.observations)
    with pytest.raises(SystemExit, match="Unknown mixture 'nope': choose one of"):
        generate.check_mixture("nope")


def test_heterogeneous_sources_mix_two_shifted_domains_at_several_qualities():
    """V2A's sources (README "Heterogeneous sources"): per task three mixtures of its kinematic and morph domains,
    each with two or more qualities, ~1M transitions, x two target qualities = six source-target combinations;
    and a random-only probe mixture of the same two domains."""
    for task in generate.HETEROGENEOUS_TASKS:
        mixtures = generate.heterogeneous_mixtures(task)
        probe = mixtures.pop(f"{task}-kinematic-morph-random")
        assert probe == [(f"{task}-kinematic", "random", 500_000), (f"{task}-morph", "random", 500_000)]
        assert len(mixtures) * len(generate.HETEROGENEOUS_TARGET_QUALITIES) == 6
        for name, components in mixtures.items():
            assert generate.MIXTURES[name] == components and generate.check_mixture(name) == components
            assert {domain for domain, _, _ in components} == {f"{task}-kinematic", f"{task}-morph"}
            assert len({quality for _, quality, _ in components}) >= 2
            assert 1_000_000 <= sum(size for _, _, size in components) <= 1_020_000
            for domain, quality, _ in components:
                assert domain_info(domain).task == domain_info(task).task and quality in QUALITIES
        assert mixtures[f"{task}-kinematic-morph-medium-expert"] == [(f"{task}-kinematic", "medium", 500_000),
                                                                     (f"{task}-morph", "expert", 500_000)]
    assert set(generate.HETEROGENEOUS_TARGET_QUALITIES) == {"medium", "expert"}


def test_a_dataset_a_user_made_is_never_deleted(zoo, monkeypatch):
    """Issue 23 case 2: a 500-transition dataset made by hand under the default id is kept when a script asks for
    the default one (one sentence says how to use or replace it), is replaced only with --force, and an interrupted
    replacement leaves it in place."""
    dataset_id = "crossdomain/hopper-kinematic/medium-v0"
    generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "500"])
    with pytest.raises(SystemExit) as error:
        load_dataset(domain="hopper-kinematic", quality="medium")
    assert str(error.value).startswith(f"{dataset_id} in the local Minari store holds 500 transitions of seed 0, not "
                                       f"the 1,000,000 of seed 0") and "--force" in str(error.value)
    with pytest.raises(SystemExit, match="already holds a dataset of 500 transitions .* pass --force to replace it"):
        generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "600"])
    assert minari.load_dataset(dataset_id).total_steps == 500

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(generate, "rollout", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "600", "--force"])
    assert minari.load_dataset(dataset_id).total_steps == 500  # still whole
    generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "600", "--force"])
    assert minari.load_dataset(dataset_id).total_steps == 600


def test_a_bad_id_is_refused_before_any_rollout(zoo, monkeypatch):
    def rollout(*args, **kwargs):
        raise AssertionError("rolled out before the id was checked")

    monkeypatch.setattr(generate, "rollout", rollout)
    with pytest.raises(SystemExit) as error:
        generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "100", "--id", "bad id"])
    assert str(error.value) == ("--id 'bad id' is not a Minari dataset id: give (namespace/)name-v<version> of "
                                "letters, digits, - and _, such as crossdomain/hopper/medium-mine-v0.")


def test_a_truncated_store_file_ends_in_one_sentence_that_remakes_it(zoo):
    """A truncated main_data.hdf5 names the file and the command that makes the dataset again (here one a user made:
    its seed, size and id), and that command does; a truncated metadata.json says to delete the folder first."""
    dataset_id = "mine/hopper-kinematic/medium-v0"
    generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "300", "--seed", "3",
                   "--id", dataset_id])
    folder = datasets_module._minari_path(dataset_id)
    main_data = f"{folder}/data/main_data.hdf5"
    whole = open(main_data, "rb").read()
    open(main_data, "wb").write(whole[:len(whole) // 2])
    with pytest.raises(SystemExit) as error:
        load_dataset(dataset_id, domain="hopper-kinematic")
    command = (f"python -m envs.generate --domain hopper-kinematic --quality medium --seed 3 --size 300 --id "
               f"{dataset_id} --force")
    assert str(error.value) == (f"{main_data} cannot be read (OSError): the Minari dataset {dataset_id} is truncated "
                                f"or corrupt; make it again with `{command}` (or delete its folder {folder}).")
    generate.main(command.split()[3:])
    assert load_dataset(dataset_id, domain="hopper-kinematic").size == 300

    metadata = f"{folder}/data/metadata.json"
    open(metadata, "w").write(open(metadata).read()[:50])
    with pytest.raises(SystemExit) as error:
        load_dataset(dataset_id)
    assert str(error.value) == (f"{metadata} cannot be read (JSONDecodeError): the Minari dataset {dataset_id} is "
                                f"truncated or corrupt; delete its folder {folder}, then fetch it again with "
                                f"`minari download --force {dataset_id}`.")
    shutil.rmtree(folder)  # a generated id says how to make it: its domain, quality and physics are in the id
    generate.main(["--domain", "hopper-kinematic", "--quality", "medium", "--size", "300"])
    metadata = f"{datasets_module._minari_path('crossdomain/hopper-kinematic/medium-v0')}/data/metadata.json"
    open(metadata, "w").write("{")
    with pytest.raises(SystemExit, match=r"then make it again with `python -m envs.generate --domain hopper-kinematic "
                                         r"--quality medium`\.$"):
        load_dataset("crossdomain/hopper-kinematic/medium-v0")
