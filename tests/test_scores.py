"""envs/scores.py: the normalised-score formula and where reference returns come from."""
import json
import math

import numpy as np
import pytest

import envs.scores as scores
from envs import Dataset, normalized_score, reference_scores


def tiny_dataset(name="test", ref_min=None, ref_max=None, episode_metadata=()):
    zeros = np.zeros((2, 3), np.float32)
    return Dataset(observations=zeros, actions=zeros, rewards=np.zeros(2, np.float32), next_observations=zeros,
                   terminals=np.zeros(2, np.float32), timeouts=np.array([0, 1], np.float32),
                   episode_ids=np.zeros(2, np.int32), ref_min_score=ref_min, ref_max_score=ref_max,
                   episode_metadata=episode_metadata, name=name)


def test_normalized_score_by_hand():
    assert normalized_score(-20.0, -20.0, 380.0) == 0.0
    assert normalized_score(380.0, -20.0, 380.0) == 100.0
    assert normalized_score(180.0, -20.0, 380.0) == pytest.approx(50.0)
    assert isinstance(normalized_score(np.float32(1.0), 0.0, 2.0), float)
    np.testing.assert_allclose(normalized_score(np.array([[0.0, 3.0], [-1.5, 6.0]]), 0.0, 3.0),
                               [[0.0, 100.0], [-50.0, 200.0]])
    with pytest.raises(SystemExit, match="must be finite and differ"):
        normalized_score(1.0, 5.0, 5.0)
    with pytest.raises(SystemExit, match="must be finite and differ"):
        normalized_score(1.0, None, 5.0)


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "references.json"
    path.write_text(json.dumps({"hopper": {"random": -10.0, "expert": 3000.0, "source": "test"}}))
    monkeypatch.setattr(scores, "REFERENCES_PATH", path)
    return path


def test_reference_scores_sources(table):
    """A domain's own references (--references zoo): the dataset's, then the table."""
    own = lambda domain, dataset=None: reference_scores(domain, dataset, references="zoo")
    assert own("hopper", tiny_dataset(ref_min=1.0, ref_max=2.0)) == (1.0, 2.0)  # dataset first
    assert own("hopper") == (-10.0, 3000.0)  # then the table
    assert own("hopper", tiny_dataset(ref_min=1.0)) == (-10.0, 3000.0)  # half a pair is not used
    # A dataset made in another domain does not give this domain's references.
    other = tiny_dataset("crossdomain/hopper-gravity/medium-v0", ref_min=1.0, ref_max=2.0)
    assert own("hopper", other) == (-10.0, 3000.0)
    assert own("hopper-gravity", other) == (1.0, 2.0)
    tagged = tiny_dataset(ref_min=1.0, ref_max=2.0, episode_metadata=({"domain": "hopper-morph"},))
    assert own("hopper", tagged) == (-10.0, 3000.0)


def test_d4rl_references_for_the_original_tasks_in_the_papers_physics(table):
    """The papers normalise the four original tasks by D4RL's references (measured in their simulator); every
    shifted domain, and every domain in v5 physics, by its own; results name the source."""
    from envs import reference_info
    own = tiny_dataset(ref_min=1.0, ref_max=2.0)
    assert reference_scores("hopper", own) == (-20.272305, 3234.3)  # the default: papers physics, d4rl
    assert reference_scores("halfcheetah") == (-280.178953, 12135.0)
    assert reference_scores("walker2d") == (1.629008, 4592.3) and reference_scores("ant") == (-325.6, 3879.7)
    assert reference_scores("hopper", own, physics="v5") == (1.0, 2.0)  # D4RL's do not belong to v5
    assert reference_scores("hopper", physics="v5") == (-10.0, 3000.0)
    assert reference_scores("hopper-gravity", tiny_dataset(ref_min=3.0, ref_max=4.0)) == (3.0, 4.0)  # shifted: own
    assert "D4RL" in reference_info("hopper")["source"]
    assert reference_info("hopper", physics="v5")["source"].startswith("envs/references.json (test)")
    assert reference_info("hopper", own, references="zoo")["source"] == "the dataset test"
    with pytest.raises(SystemExit, match="Unknown references 'd4r'"):
        reference_scores("hopper", references="d4r")
    with pytest.raises(SystemExit, match="Unknown physics 'v3'"):
        reference_scores("hopper", physics="v3")


def test_missing_reference_is_an_error(table):
    with pytest.raises(SystemExit, match="No reference returns are known for domain walker2d: generate a dataset"):
        reference_scores("walker2d", tiny_dataset(), references="zoo")
    with pytest.raises(SystemExit, match="Unknown domain 'walker'"):
        reference_scores("walker")


def test_malformed_table_entry(table):
    table.write_text(json.dumps({"hopper": {"random": -10.0}}))
    with pytest.raises(SystemExit, match="malformed entry for hopper"):
        reference_scores("hopper", references="zoo")


def test_shipped_reference_table_is_well_formed():
    from envs import DOMAINS
    for domain, entry in scores.load_references().items():
        assert domain in DOMAINS
        assert math.isfinite(entry["random"]) and entry["expert"] > entry["random"] and entry["source"]


def test_dataset_score_by_hand():
    from envs import dataset_score
    zeros = np.zeros((5, 3), np.float32)
    # episodes 3 and 7 (a subsample keeps the original ids): returns 1 + 2 = 3 and 4 + 0 + 5 = 9
    data = Dataset(observations=zeros, actions=zeros, rewards=np.array([1, 2, 4, 0, 5], np.float32),
                   next_observations=zeros, terminals=np.zeros(5, np.float32),
                   timeouts=np.array([0, 1, 0, 0, 1], np.float32), episode_ids=np.array([3, 3, 7, 7, 7], np.int32),
                   ref_min_score=-1.0, ref_max_score=11.0, name="hopper-test")
    mean, std, episodes = dataset_score(data, "hopper", references="zoo")  # the data's own references
    # normalised: 100 * (3 + 1) / 12 = 33.33 and 100 * (9 + 1) / 12 = 83.33
    assert episodes == 2
    assert mean == pytest.approx(58.3333, rel=1e-4) and std == pytest.approx(25.0, rel=1e-6)
