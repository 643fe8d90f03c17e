"""The two physics of envs/domains.py: the papers' (gym v3 on mujoco-py, reproduced in current MuJoCo; the default)
and v5 (Gymnasium's as it ships). The old capsule inertia rule against numbers worked out by hand, the old contact
margin rule on a real contact, Walker2d's old feet, v3's rewards, and every domain in both physics.
benchmarks/physics_check.py measures the one-step agreement with an independent construction under MuJoCo 3.4.0."""
import math
import subprocess
import sys

import mujoco
import numpy as np
import pytest

from envs import DEFAULT_PHYSICS, DOMAINS, compile_model, domain_info, make_env
from envs.domains import PapersRewards, legacy_geom_inertia


def _body(model, name):
    return model.body(name).id


def _tensor(model, body):
    """The body's inertia tensor in the body frame, from its principal inertia and axes."""
    rotation = np.zeros(9)
    mujoco.mju_quat2Mat(rotation, model.body_iquat[body])
    rotation = rotation.reshape(3, 3)
    return rotation @ np.diag(model.body_inertia[body]) @ rotation.T


def test_the_default_is_the_papers_physics():
    assert DEFAULT_PHYSICS == "papers" and domain_info("hopper").physics == "papers"
    with pytest.raises(SystemExit, match="Unknown physics 'v3': choose papers"):
        make_env("hopper", "v3")


def test_old_capsule_rule_by_hand():
    """MuJoCo <= 2.1.1: a capsule of radius r and half-length h counts as a cylinder of radius r and length
    2h + r. Hopper's torso: r 0.05, h 0.2, density 1000 -> length 0.45."""
    r, length = 0.05, 0.45
    mass = 1000 * math.pi * r * r * length
    assert mass == pytest.approx(3.53429, abs=1e-5)  # the 3.534 kg, against 3.665 kg exact
    transverse, axial = mass * (3 * r * r + length ** 2) / 12, mass * r * r / 2
    got_mass, got_inertia = legacy_geom_inertia(mujoco.mjtGeom.mjGEOM_CAPSULE, [r, 0.2, 0], 1000.0)
    assert got_mass == pytest.approx(mass, rel=1e-12)
    np.testing.assert_allclose(got_inertia, [transverse, transverse, axial], rtol=1e-12)

    papers, v5 = compile_model("hopper"), compile_model("hopper", "v5")
    torso = _body(papers, "torso")
    assert papers.body_mass[torso] == pytest.approx(mass, rel=1e-12)
    assert v5.body_mass[torso] == pytest.approx(1000 * (math.pi * r * r * 0.4 + 4 / 3 * math.pi * r ** 3), rel=1e-9)
    # the torso is one vertical capsule: its inertia about the body's centre of mass, axis along z
    np.testing.assert_allclose(_tensor(papers, torso), np.diag([transverse, transverse, axial]), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(papers.body_ipos[torso], v5.body_ipos[torso], atol=1e-12)
    # the foot: one capsule of r 0.06, h 0.195 -> mass 1000 pi 0.06^2 (0.39 + 0.06)
    assert papers.body_mass[_body(papers, "foot")] == pytest.approx(1000 * math.pi * 0.06 ** 2 * 0.45, rel=1e-12)


def test_old_rule_keeps_halfcheetah_at_14_kg_with_the_old_proportions():
    """settotalmass still rescales to 14 kg, after the old rule has set the proportions between the bodies."""
    papers = compile_model("halfcheetah")
    assert papers.body_mass.sum() == pytest.approx(14.0, rel=1e-12)
    # back foot: one capsule r 0.046, h 0.094; back thigh: r 0.046, h 0.145 (old lengths 2h + r)
    foot = math.pi * 0.046 ** 2 * (0.188 + 0.046)
    thigh = math.pi * 0.046 ** 2 * (0.29 + 0.046)
    ratio = papers.body_mass[_body(papers, "bfoot")] / papers.body_mass[_body(papers, "bthigh")]
    assert ratio == pytest.approx(foot / thigh, rel=1e-9)


def test_shifts_apply_before_the_old_inertia_rule():
    """hopper-morph's 0.125 m torso gets the old rule's mass, pi r^2 (2h + r) rho."""
    model = compile_model("hopper-morph")
    assert model.body_mass[_body(model, "torso")] == pytest.approx(1000 * math.pi * 0.125 ** 2 * (0.4 + 0.125),
                                                                   rel=1e-12)


def _foot_floor_contacts(model, height):
    """Contacts of Hopper with its foot capsule's lowest point `height` above the floor (torso upright)."""
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    foot = model.geom("foot_geom").id
    lowest = data.geom_xpos[foot][2] - model.geom_size[foot][0]  # the foot capsule lies horizontal
    data.qpos[1] += height - lowest  # rootz
    mujoco.mj_forward(model, data)
    return [data.contact[i] for i in range(data.ncon)]


def test_contact_margin_is_the_old_max_rule():
    """Hopper's geoms carry margin 0.001. The old rule: a contact starts at distance max(0.001, 0.001) = 0.001;
    since MuJoCo 3.5 at the sum, 0.002. The papers' physics halves every geom margin, so the sum is the old max."""
    papers, v5 = compile_model("hopper"), compile_model("hopper", "v5")
    np.testing.assert_allclose(papers.geom_margin, v5.geom_margin / 2)
    assert set(np.round(v5.geom_margin, 9)) == {0.001}
    near = _foot_floor_contacts(papers, 0.0008)
    assert near and all(c.includemargin == pytest.approx(0.001) for c in near)
    assert not _foot_floor_contacts(papers, 0.0015)  # beyond the old margin: no contact
    assert _foot_floor_contacts(v5, 0.0015)  # the sum rule still has one
    ant_papers, ant_v5 = compile_model("ant"), compile_model("ant", "v5")
    np.testing.assert_allclose(ant_papers.geom_margin, np.full(ant_v5.ngeom, 0.005))


def test_walker2d_feet():
    papers, v5 = compile_model("walker2d"), compile_model("walker2d", "v5")
    assert papers.geom_friction[papers.geom("foot_geom").id][0] == pytest.approx(0.9)
    assert papers.geom_friction[papers.geom("foot_left_geom").id][0] == pytest.approx(1.9)
    assert v5.geom_friction[v5.geom("foot_geom").id][0] == pytest.approx(1.9)
    # a friction shift scales the papers' feet: 0.9 and 1.9 times 0.5
    shifted = compile_model("walker2d-friction-0.5")
    assert shifted.geom_friction[shifted.geom("foot_geom").id][0] == pytest.approx(0.45)


def test_v3_rewards():
    """The alive bonus on the terminating step (v3), and Ant without contact cost."""
    import gymnasium as gym
    plain, wrapped = gym.make("Hopper-v5"), PapersRewards(gym.make("Hopper-v5"), 1.0)
    plain.reset(seed=0), wrapped.reset(seed=0)
    action = np.array([1.0, -1.0, 1.0])
    for _ in range(1000):
        _, reward, terminated, truncated, _ = plain.step(action)
        _, papers_reward, papers_terminated, _, _ = wrapped.step(action)
        assert papers_terminated == terminated
        assert papers_reward == pytest.approx(reward + (1.0 if terminated else 0.0), abs=1e-12)
        if terminated or truncated:
            break
    assert terminated  # the fixed action tips Hopper over: the terminating step was checked
    env = make_env("ant")
    env.reset(seed=0)
    for _ in range(50):
        _, _, _, _, info = env.step(env.action_space.sample())
        assert info["reward_contact"] == 0.0
    assert domain_info("ant").semantics and not domain_info("ant", "v5").semantics


@pytest.mark.parametrize("physics", ["papers", "v5"])
def test_every_domain_compiles_and_steps_in_both_physics(physics):
    for name in DOMAINS:
        env = make_env(name, physics)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (domain_info(name).obs_dim,)
        for _ in range(5):
            obs, reward, *_ = env.step(env.action_space.sample())
        assert np.all(np.isfinite(obs)) and math.isfinite(reward)
        env.close()


def test_show_names_the_physics_and_its_edits():
    out = subprocess.run([sys.executable, "-m", "envs", "show", "walker2d"], capture_output=True, text=True,
                         check=True).stdout
    assert "physics: papers" in out and "foot_geom" in out and "0.9" in out and "old capsule rule" in out
    out = subprocess.run([sys.executable, "-m", "envs", "show", "hopper-kinematic", "--physics", "v5"],
                         capture_output=True, text=True, check=True).stdout
    assert "physics: v5" in out and "thigh_joint" in out and "margin" not in out
