"""Every domain compiles, differs from its task's original model in exactly the declared quantities, and the
declared numbers are those of shifts.md; kinematic shifts really stop the joint at the new limit."""
import subprocess
import sys

import mujoco
import numpy as np
import pytest

from envs import DOMAINS, TASKS, domain_info, make_env
from envs.domains import compile_model

# Arrays a shift may touch, per attribute of a declared change (a "fromto" edit moves a capsule's pos/size/quat).
TOUCHED = {
    ("joint", "range"): ["jnt_range"],
    ("geom", "pos"): ["geom_pos"],
    ("geom", "size"): ["geom_size"],
    ("geom", "quat"): ["geom_quat"],
    ("geom", "fromto"): ["geom_pos", "geom_size", "geom_quat"],
    ("geom", "friction"): ["geom_friction"],
    ("body", "pos"): ["body_pos"],
}
STRUCTURE = ["jnt_range", "jnt_pos", "jnt_axis", "jnt_stiffness", "geom_pos", "geom_size", "geom_quat",
             "geom_friction", "geom_type", "body_pos", "body_quat", "actuator_gear", "actuator_ctrlrange",
             "dof_damping", "dof_armature", "geom_solref", "geom_solimp", "jnt_solref", "jnt_solimp", "qpos0"]
# Mass properties are derived from geometry at compile time (HalfCheetah also rescales to 14 kg in total).
DERIVED = ["body_mass", "body_inertia", "body_ipos", "body_iquat", "geom_rbound", "geom_aabb"]
TOTAL = len(TASKS) * 24


def test_96_domains_and_cli():
    assert len(DOMAINS) == TOTAL == len(set(DOMAINS))
    out = subprocess.run([sys.executable, "-m", "envs", "list"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(DOMAINS)
    out = subprocess.run([sys.executable, "-m", "envs", "show", "hopper-kinematic"], capture_output=True, text=True)
    assert "thigh_joint" in out.stdout and "-150" in out.stdout and "-0.15" in out.stdout
    out = subprocess.run([sys.executable, "-m", "envs", "show", "hoper-kinematic"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "Unknown domain 'hoper-kinematic'" in out.stderr and "hopper-kinematic" in out.stderr


def _expected_diffs(info, model):
    expected = {}
    for change in info.changes:
        kind, name = (change.element.split(" ", 1) + [""])[:2]
        if kind == "option":
            continue
        obj = {"joint": model.joint, "geom": model.geom, "body": model.body}[kind](name)
        for array in TOUCHED[(kind, change.attribute)]:
            expected.setdefault(array, set()).add(obj.id)
    return expected


@pytest.mark.parametrize("name", DOMAINS)
def test_model_differs_exactly_in_declared_quantities(name):
    info = domain_info(name)
    original, shifted = compile_model(info.task), compile_model(name)
    expected = _expected_diffs(info, shifted)
    for array in STRUCTURE:
        a, b = getattr(original, array), getattr(shifted, array)
        assert a.shape == b.shape, array
        rows = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        differ = {i for i, (x, y) in enumerate(zip(rows, b.reshape(rows.shape))) if not np.allclose(x, y, atol=1e-9)}
        if array == "geom_quat":  # q and -q are one rotation
            differ = {i for i in differ if not np.allclose(a[i], -b[i], atol=1e-9)}
        assert differ <= expected.get(array, set()), f"{name}: undeclared change in {array} rows {differ}"
    declared_gravity = any(c.attribute == "gravity" for c in info.changes)
    assert np.allclose(original.opt.gravity, shifted.opt.gravity) != declared_gravity
    assert original.opt.timestep == shifted.opt.timestep
    assert (original.opt.cone != shifted.opt.cone) == any(c.attribute == "cone" for c in info.changes)
    geometry_changed = any(c.element.startswith(("geom", "body")) and c.attribute != "friction" for c in info.changes)
    if not geometry_changed:
        for array in DERIVED:
            np.testing.assert_array_equal(getattr(original, array), getattr(shifted, array), err_msg=array)
    # Every declared change shows up with its declared value in the compiled model.
    degree = "halfcheetah" not in name
    for change in info.changes:
        kind, elem = (change.element.split(" ", 1) + [""])[:2]
        value = np.asarray(change.shifted)
        if (kind, change.attribute) == ("joint", "range"):
            want = np.deg2rad(value) if degree else value
            np.testing.assert_allclose(shifted.joint(elem).range, want, atol=1e-9)
        elif change.attribute == "gravity":
            np.testing.assert_allclose(shifted.opt.gravity, value)
        elif change.attribute == "friction":
            np.testing.assert_allclose(shifted.geom(elem).friction, value)
        elif (kind, change.attribute) == ("geom", "pos"):
            np.testing.assert_allclose(shifted.geom(elem).pos, value, atol=1e-9)
        elif (kind, change.attribute) == ("geom", "size"):
            np.testing.assert_allclose(shifted.geom(elem).size[:2], value[:2], atol=1e-9)
        elif (kind, change.attribute) == ("body", "pos"):
            np.testing.assert_allclose(shifted.body(elem).pos, value, atol=1e-9)


def _world(model):
    data = mujoco.MjData(model)
    mujoco.mj_kinematics(model, data)
    return data


def _capsule_ends(model, data, geom):
    g = model.geom(geom).id
    axis = data.geom_xmat[g].reshape(3, 3)[:, 2] * model.geom_size[g, 1]
    return data.geom_xpos[g] + axis, data.geom_xpos[g] - axis


def test_world_geometry_matches_shifts_md():
    """The papers give morphology shifts in world coordinates; the v5 models nest local frames. Check the sums."""
    m = compile_model("walker2d-morph")
    d = _world(m)
    top, bottom = sorted(_capsule_ends(m, d, "thigh_geom"), key=lambda p: -p[2])
    assert np.isclose(top[2], 1.05) and np.isclose(bottom[2], 1.045)
    top, bottom = sorted(_capsule_ends(m, d, "leg_geom"), key=lambda p: -p[2])
    assert np.isclose(top[2], 1.045) and np.isclose(bottom[2], 0.3)
    assert np.isclose(d.xanchor[m.joint("leg_joint").id][2], 1.045)
    assert np.isclose(d.xanchor[m.joint("foot_joint").id][2], 0.3)
    assert np.isclose(d.geom_xpos[m.geom("foot_geom").id][2], 0.3)
    assert np.isclose(d.xanchor[m.joint("foot_left_joint").id][2], 0.1)  # the left leg is untouched
    for level, knee in zip(("easy", "medium", "hard"), (0.5, 0.35, 0.2)):
        m = compile_model(f"walker2d-morph-leg-{level}")
        d = _world(m)
        for side in ("", "_left"):
            assert np.isclose(min(p[2] for p in _capsule_ends(m, d, f"thigh{side}_geom")), knee)
            assert np.isclose(d.xanchor[m.joint(f"leg{side}_joint").id][2], knee)
            assert np.isclose(min(p[2] for p in _capsule_ends(m, d, f"leg{side}_geom")), 0.1)
            assert np.isclose(d.xanchor[m.joint(f"foot{side}_joint").id][2], 0.1)
    for task in ("hopper", "walker2d"):
        for level, top, radius in zip(("easy", "medium", "hard"), (1.53, 1.69, 1.85), (0.075, 0.1, 0.125)):
            m = compile_model(f"{task}-morph-torso-{level}")
            ends = _capsule_ends(m, _world(m), "torso_geom")
            assert np.isclose(max(p[2] for p in ends), top) and np.isclose(min(p[2] for p in ends), 1.05)
            assert np.isclose(m.geom("torso_geom").size[0], radius)
    for level, factor in zip(("easy", "medium", "hard"), (0.8, 0.6, 0.4)):
        m = compile_model(f"hopper-morph-foot-{level}")
        xs = sorted(p[0] for p in _capsule_ends(m, _world(m), "foot_geom"))
        np.testing.assert_allclose(xs, [-0.13 * factor, 0.26 * factor], atol=1e-9)
    m = compile_model("halfcheetah-morph")
    d = _world(m)
    torso_x = d.xpos[m.body("torso").id]
    np.testing.assert_allclose(d.xpos[m.body("bshin").id] - d.xpos[m.body("bthigh").id], [-1e-4, 0, -1e-4], atol=1e-9)
    np.testing.assert_allclose(d.xpos[m.body("bfoot").id] - d.xpos[m.body("bshin").id], [-0.13, 0, -0.15], atol=1e-9)
    np.testing.assert_allclose(m.geom("bfoot").size[1], 0.07)
    np.testing.assert_allclose(d.xpos[m.body("ffoot").id] - d.xpos[m.body("fshin").id], [0.01, 0, -0.16], atol=1e-9)
    assert np.isclose(m.body_mass.sum(), 14.0) and torso_x[2] == 0.7
    m = compile_model("ant-morph")
    d = _world(m)
    ends = _capsule_ends(m, d, "left_ankle_geom")
    start = d.xpos[m.geom("left_ankle_geom").bodyid[0]]
    np.testing.assert_allclose(sorted(np.linalg.norm(p - start) for p in ends)[1], np.hypot(0.1, 0.1), atol=1e-9)


def _lowest_point(model, data) -> float:
    """Lowest z of any capsule or sphere of the body (the floor plane is geom 0)."""
    lowest = np.inf
    for g in range(1, model.ngeom):
        radius, half = model.geom_size[g, 0], model.geom_size[g, 1]
        axis_z = data.geom_xmat[g].reshape(3, 3)[2, 2] if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_CAPSULE else 0
        lowest = min(lowest, data.geom_xpos[g, 2] - radius - abs(axis_z) * half)
    return lowest


@pytest.mark.parametrize("name", DOMAINS)
def test_random_rollout_is_finite_and_above_floor(name):
    env = make_env(name)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (domain_info(name).obs_dim,)
    env.action_space.seed(0)
    data = env.unwrapped.data
    for _ in range(100):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.all(np.isfinite(obs)) and np.isfinite(reward)
        # Soft contacts let a capsule sink a few cm (3 cm seen in the original HalfCheetah); falling through is metres.
        assert _lowest_point(env.unwrapped.model, data) > -0.1, "the body went through the floor"
        if terminated:
            obs, _ = env.reset()
    env.close()


KINEMATIC = [d for d in DOMAINS if "-kinematic" in d]


def _pushed_angle(model, joint: str, direction: float, reach: float) -> float:
    """Lift the body clear of the floor, switch gravity off and push one joint hard; the angle it settles at."""
    model.opt.gravity[:] = 0
    data = mujoco.MjData(model)
    j = model.joint(joint)
    root = model.jnt_qposadr[0]
    data.qpos[root + (2 if model.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE else 1)] += 3.0  # z up
    # Enough torque to hold the joint's spring (HalfCheetah has stiff ones) at angle `reach`, and 50 N m more.
    force = model.jnt_stiffness[j.id] * abs(reach) + 50.0
    for _ in range(2000):
        data.qfrc_applied[:] = 0
        data.qfrc_applied[model.jnt_dofadr[j.id]] = direction * force
        mujoco.mj_step(model, data)
    return float(data.qpos[model.jnt_qposadr[j.id]])


@pytest.mark.parametrize("name", KINEMATIC)
def test_kinematic_shift_stops_joint_at_new_limit(name):
    info = domain_info(name)
    original, shifted = compile_model(info.task), compile_model(name)
    for change in info.changes:
        joint = change.element.split(" ", 1)[1]
        old, new = original.joint(joint).range, shifted.joint(joint).range
        for side, direction in ((0, -1.0), (1, 1.0)):
            gap = abs(old[side] - new[side])
            if gap < 1e-9:
                continue
            reached_new = _pushed_angle(shifted, joint, direction, old[side])
            reached_old = _pushed_angle(original, joint, direction, old[side])
            # Limits are soft (HalfCheetah's very soft): each model must stop nearer its own limit than the other's.
            assert abs(reached_new - new[side]) < 0.5 * gap, (joint, side, reached_new, new[side])
            assert abs(reached_old - old[side]) < 0.5 * gap, (joint, side, reached_old, old[side])
