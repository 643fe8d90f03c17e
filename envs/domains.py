"""Shifted MuJoCo domains: 4 tasks x 24 dynamics = 96 named domains on Gymnasium's v5 environments.

A domain is a Gymnasium v5 task plus a list of edits of its MuJoCo model, applied with `mujoco.MjSpec` to the
XML file that Gymnasium ships (no XML is copied from elsewhere). Every edit is recorded as a `Change`
(element, attribute, original value, shifted value) so that `python -m envs show <name>` and the tests can see
exactly what a shift changes. The numbers are the papers' own: family 1 the one-level shifts of the VGDF, IGDF,
OTDF, DVDF and V2A papers' shifted models, family 2 ODRL's levels (both written out in this file, below).

Names:
    <task>                                   the original v5 task (halfcheetah, hopper, walker2d, ant)
    <task>-kinematic | -morph | -gravity     the one-level shifts of the DVDF / IGDF / OTDF papers
    <task>-gravity-<k>, <task>-friction-<k>  ODRL levels, k in 0.1, 0.5, 2.0, 5.0
    <task>-kinematic-<part>-<level>          ODRL joint-range levels, level in easy, medium, hard
    <task>-morph-<part>-<level>              ODRL morphology levels

Physics (`physics=`, every function here; algos/ scripts take `--physics`):
    papers  (the default) the simulator of the papers and of D4RL: gym v2/v3 environments on mujoco-py
            (MuJoCo 2.0-2.1), reproduced in current MuJoCo by undoing three model-wide changes and two reward
            changes made since, on top of which the shift applies:
            - capsule masses and inertias by the old compiler rule (MuJoCo <= 2.1.1: a cylinder of the capsule's
              radius, its length the cylindrical part extended by half the radius at each end), written into the
              model as explicit body inertials (MuJoCo 2.1.2 made capsule inertia exact);
            - contact margins by the old rule, the larger of the two geoms' margins: every geom margin is halved,
              since MuJoCo 3.5.0 adds the two (all geoms of a task carry one margin, so half + half = the max);
            - Walker2d's old feet, right foot friction 0.9 and left 1.9 (Gymnasium's walker2d.xml; walker2d_v5.xml
              gives both 1.9);
            - Hopper, Walker2d and Ant: the alive bonus is paid on the terminating step too (v3 paid it whenever
              termination was on; v5 pays it only while healthy);
            - Ant: no contact cost (under mujoco-py 2.x the contact forces read zero, so v3's cost was always 0,
              the reason D4RL's Ant observations carry 84 zero columns).
    v5      Gymnasium's v5 environments exactly as they ship (Minari's own mujoco/*-v0 datasets were made there).
`python -m envs show <name> [--physics v5]` lists the model-wide edits beside the shift's.

Conventions chosen here:
- Angles are in the model's own unit: radians for HalfCheetah, degrees for the others (as the XML declares).
- Capsules the papers give by end points are written as pos + half-length + orientation (current MuJoCo refuses a
  geom with both pos and fromto); the end points are kept in the `Change` description.
- HalfCheetah keeps `settotalmass="14"`, as the old gym XML the papers edited did: a morphology shift
  redistributes the 14 kg instead of adding or removing mass.
- Friction shifts scale every geom's friction (sliding, torsional, rolling), the floor included: MuJoCo takes the
  element-wise max of the two geoms in contact, so a floor left at its default would hide a lower friction.
- Ant observes 27 numbers (qpos without x, y and qvel; `include_cfrc_ext_in_observation=False`): the D4RL-era
  Ant datasets had 84 further contact-force columns that were always zero, the papers' agents saw exactly these
  27 informative numbers, and contact forces are a noisy 78-dim input that differs in scale across morphologies.
"""
from __future__ import annotations

import copy
import difflib
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

# current mujoco warns at every HalfCheetah load that settotalmass is deprecated (on stderr and as a Python warning);
# the behaviour is what the papers had. Silence that one message, pass every other MuJoCo warning on.
warnings.filterwarnings("ignore", message=".*settotalmass.*")
mujoco.set_mju_user_warning(lambda message: None if "settotalmass" in message else warnings.warn(message))

_ASSETS = Path(gym.__file__).parent / "envs" / "mujoco" / "assets"


@dataclass(frozen=True)
class Task:
    env_id: str
    xml: str
    obs_dim: int
    act_dim: int
    gym_kwargs: tuple = ()


TASKS: dict[str, Task] = {
    "halfcheetah": Task("HalfCheetah-v5", "half_cheetah.xml", 17, 6),
    "hopper": Task("Hopper-v5", "hopper.xml", 11, 3),
    "walker2d": Task("Walker2d-v5", "walker2d_v5.xml", 17, 6),
    "ant": Task("Ant-v5", "ant.xml", 27, 8, (("include_cfrc_ext_in_observation", False),)),
}

# The task's model file in each physics: Walker2d's v5 file changed the right foot's friction (0.9 -> 1.9).
_PAPERS_XML = {"walker2d": "walker2d.xml"}
PHYSICS = ("papers", "v5")
DEFAULT_PHYSICS = "papers"
_ALIVE_BONUS_TASKS = ("hopper", "walker2d", "ant")  # v3 paid healthy_reward (1.0) on the terminating step too

GRAVITY_LEVELS = ("0.1", "0.5", "2.0", "5.0")
LEVELS = ("easy", "medium", "hard")


@dataclass(frozen=True)
class Change:
    """One edited attribute of the model: `element` is e.g. "joint bthigh", "geom torso", "option"."""

    element: str
    attribute: str
    original: tuple
    shifted: tuple
    note: str = ""

    def __str__(self) -> str:
        fmt = lambda v: "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
        text = f"{self.element:<28} {self.attribute:<9} {fmt(self.original):>34} -> {fmt(self.shifted)}"
        return text + (f"   ({self.note})" if self.note else "")


@dataclass(frozen=True)
class DomainInfo:
    name: str
    task: str
    env_id: str
    obs_dim: int
    act_dim: int
    changes: tuple[Change, ...]  # the shift's, against the task in the same physics
    physics: str = DEFAULT_PHYSICS
    physics_changes: tuple[Change, ...] = ()  # the physics' model-wide edits, against the v5 model
    semantics: tuple[str, ...] = ()  # the physics' reward differences from v5, in words


# ---------------------------------------------------------------------------------------------------------
# Edits on an MjSpec; each returns the Change it made.
# ---------------------------------------------------------------------------------------------------------
class _Editor:
    def __init__(self, spec: mujoco.MjSpec):
        self.spec = spec
        self.changes: list[Change] = []

    def _set(self, obj, kind: str, name: str, attr: str, value, note: str = ""):
        old = tuple(float(x) for x in np.atleast_1d(getattr(obj, attr)))
        new = tuple(float(x) for x in np.atleast_1d(value))
        setattr(obj, attr, type(getattr(obj, attr))(value) if np.ndim(value) == 0 else list(new))
        if np.allclose(old, new, rtol=0, atol=1e-12):
            return
        self.changes.append(Change(f"{kind} {name}".strip(), attr, old, new, note))

    def joint_range(self, name: str, lo: float, hi: float):
        self._set(self.spec.joint(name), "joint", name, "range", (lo, hi))

    def scale_joint_range(self, name: str, factor: float):
        lo, hi = self.spec.joint(name).range
        self.joint_range(name, round(lo * factor, 10), round(hi * factor, 10))

    def body_pos(self, name: str, pos):
        self._set(self.spec.body(name), "body", name, "pos", pos)

    def geom_pos(self, name: str, pos):
        self._set(self.spec.geom(name), "geom", name, "pos", pos)

    def geom_size(self, name: str, size):
        size = list(size) + list(self.spec.geom(name).size[len(size):])
        self._set(self.spec.geom(name), "geom", name, "size", size)

    def capsule(self, name: str, start, end):
        """Make capsule `name` run from `start` to `end` (body frame), keeping its radius."""
        geom = self.spec.geom(name)
        self._resolve_fromto(geom)
        start, end = np.asarray(start, float), np.asarray(end, float)
        axis = end - start
        quat = np.zeros(4)
        mujoco.mju_quatZ2Vec(quat, axis)
        note = f"end points {tuple(start.tolist())} -> {tuple(end.tolist())}"
        self._set(geom, "geom", name, "pos", (start + end) / 2, note)
        self.geom_size(name, [geom.size[0], np.linalg.norm(axis) / 2])
        self._set(geom, "geom", name, "quat", quat)

    def _resolve_fromto(self, geom):
        """Rewrite the geom's orientation as pos + half-length + quat, the form `capsule` edits."""
        quat = self._orientation_quat(geom)
        if not np.isnan(geom.fromto[0]):
            start, end = np.asarray(geom.fromto[:3]), np.asarray(geom.fromto[3:])
            geom.pos = list((start + end) / 2)
            geom.size = [geom.size[0], np.linalg.norm(end - start) / 2, 0]
            geom.fromto = [np.nan] * 6
        geom.alt.type = mujoco.mjtOrientation.mjORIENTATION_QUAT
        geom.quat = quat

    def _orientation_quat(self, geom) -> list[float]:
        """The geom's orientation as a quaternion, whether the XML gave axisangle, fromto or quat."""
        if not np.isnan(geom.fromto[0]):
            quat = np.zeros(4)
            mujoco.mju_quatZ2Vec(quat, np.asarray(geom.fromto[3:]) - np.asarray(geom.fromto[:3]))
            return list(quat)
        if geom.alt.type == mujoco.mjtOrientation.mjORIENTATION_AXISANGLE:
            axis, angle = np.asarray(geom.alt.axisangle[:3], float), geom.alt.axisangle[3]
            if self.spec.compiler.degree:
                angle = np.deg2rad(angle)
            quat = np.zeros(4)
            mujoco.mju_axisAngle2Quat(quat, axis / np.linalg.norm(axis), angle)
            return list(quat)
        return list(geom.quat)

    def fromto(self, name: str, start, end):
        """Move the end points of a capsule that the XML gives by fromto (Ant's legs, HalfCheetah's torso)."""
        geom = self.spec.geom(name)
        old = tuple(float(x) for x in geom.fromto)
        new = tuple(float(x) for x in start) + tuple(float(x) for x in end)
        geom.fromto = list(new)
        self.changes.append(Change(f"geom {name}", "fromto", old, new))

    def gravity(self, factor: float):
        self._set(self.spec.option, "option", "", "gravity", np.asarray(self.spec.option.gravity) * factor)

    def friction(self, factor: float):
        for geom in self.spec.geoms:
            self._set(geom, "geom", geom.name, "friction", np.asarray(geom.friction) * factor)
        # Pyramidal friction cones soften the contact's normal direction as friction grows: at x5 the feet of
        # Hopper, Walker2d and Ant sank 0.25-0.5 m into the floor. Elliptic cones keep the floor hard at every k.
        cone = self.spec.option
        self._set(cone, "option", "", "cone", int(mujoco.mjtCone.mjCONE_ELLIPTIC), "0 pyramidal, 1 elliptic")


# A vertical capsule of Hopper / Walker2d from world height z_top down to z_bottom, in its body's frame.
def _vertical_capsule(ed: _Editor, geom: str, body_world_z: float, z_top: float, z_bottom: float, radius=None):
    g = ed.spec.geom(geom)
    ed.geom_pos(geom, (g.pos[0], g.pos[1], round((z_top + z_bottom) / 2 - body_world_z, 10)))
    size = [g.size[0] if radius is None else radius, round((z_top - z_bottom) / 2, 10)]
    ed.geom_size(geom, size)


# World heights at qpos0 of the bodies of Hopper / Walker2d (their XML nests local offsets; checked in tests).
_WALKER_Z = {"torso": 1.25, "thigh": 1.05, "leg": 0.35, "foot": 0.0}


# ---------------------------------------------------------------------------------------------------------
# Family 1: the paper shifts
# ---------------------------------------------------------------------------------------------------------
def _paper_kinematic(task: str, ed: _Editor):
    if task == "halfcheetah":
        ed.joint_range("bthigh", -0.0052, 0.0105)
    elif task == "hopper":
        ed.joint_range("thigh_joint", -0.15, 0.0)
        ed.joint_range("foot_joint", -18.0, 18.0)
    elif task == "walker2d":
        ed.joint_range("foot_joint", -0.45, 0.45)
    elif task == "ant":
        ed.joint_range("hip_1", -0.3, 0.3)
        ed.joint_range("hip_2", -0.3, 0.3)


def _paper_morph(task: str, ed: _Editor):
    if task == "halfcheetah":  # "no thighs"
        ed.capsule("bthigh", (0, 0, 0), (-1e-4, 0, -1e-4))
        ed.body_pos("bshin", (-1e-4, 0, -1e-4))
        ed.capsule("bshin", (0, 0, 0), (-0.13, 0, -0.15))
        ed.body_pos("bfoot", (-0.13, 0, -0.15))
        ed.geom_size("bfoot", [0.046, 0.07])
        ed.capsule("fthigh", (0, 0, 0), (1e-4, 0, 1e-4))
        ed.body_pos("fshin", (1e-4, 0, 1e-4))
        ed.capsule("fshin", (0, 0, 0), (0.01, 0, -0.16))
        ed.body_pos("ffoot", (0.01, 0, -0.16))
    elif task == "hopper":
        ed.geom_size("torso_geom", [0.125])
        ed.geom_size("thigh_geom", [0.04])
    elif task == "walker2d":  # right leg 0.2 shorter: thigh 1.05 -> 1.045, shin 1.045 -> 0.3, foot at 0.3
        _vertical_capsule(ed, "thigh_geom", _WALKER_Z["thigh"], 1.05, 1.045)
        leg_z = 1.045 - 0.25  # the knee joint sits 0.25 above the leg body's origin
        ed.body_pos("leg", (0, 0, round(leg_z - _WALKER_Z["thigh"], 10)))
        _vertical_capsule(ed, "leg_geom", leg_z, 1.045, 0.3)
        foot_z = 0.3 - 0.1  # the foot joint and geom sit 0.1 above the foot body's origin
        ed.body_pos("foot", (0.2, 0, round(foot_z - leg_z, 10)))
    elif task == "ant":
        ed.fromto("left_ankle_geom", (0, 0, 0), (0.1, 0.1, 0))
        ed.fromto("right_ankle_geom", (0, 0, 0), (-0.1, 0.1, 0))


# ---------------------------------------------------------------------------------------------------------
# Family 2: ODRL levels
# ---------------------------------------------------------------------------------------------------------
_RANGE_FACTOR = {"easy": 0.8, "medium": 0.5, "hard": 0.2}
_KINEMATIC_PARTS = {
    "halfcheetah": {"thighjnt": ("bthigh", "fthigh"), "footjnt": ("bfoot", "ffoot")},
    "hopper": {"legjnt": ("leg_joint",), "footjnt": ("foot_joint",)},
    "walker2d": {"thighjnt": ("thigh_joint", "thigh_left_joint"), "footjnt": ("foot_joint", "foot_left_joint")},
    "ant": {"hipjnt": ("hip_1", "hip_2", "hip_3", "hip_4"), "anklejnt": ("ankle_1", "ankle_2", "ankle_3", "ankle_4")},
}
_MORPH_PARTS = {
    "halfcheetah": ("torso", "thigh"),
    "hopper": ("torso", "foot"),
    "walker2d": ("torso", "leg"),
    "ant": ("alllegs", "halflegs"),
}


def _odrl_kinematic(task: str, part: str, level: str, ed: _Editor):
    factor = _RANGE_FACTOR[level]
    for joint in _KINEMATIC_PARTS[task][part]:
        if part == "anklejnt":  # [30, 70] -> [30, 62 | 50 | 38]: the end far from 0 moves toward the near end
            lo, hi = ed.spec.joint(joint).range
            near, far = (lo, hi) if abs(lo) < abs(hi) else (hi, lo)
            far = near + (far - near) * factor
            ed.joint_range(joint, min(near, far), max(near, far))
        else:
            ed.scale_joint_range(joint, factor)


def _odrl_morph(task: str, part: str, level: str, ed: _Editor):
    i = LEVELS.index(level)
    if task == "ant":
        end = (0.32, 0.2, 0.08)[i]
        legs = {"left_ankle_geom": (1, 1), "right_ankle_geom": (-1, 1), "third_ankle_geom": (-1, -1),
                "fourth_ankle_geom": (1, -1)}
        for geom, (sx, sy) in list(legs.items())[: 4 if part == "alllegs" else 2]:
            ed.fromto(geom, (0, 0, 0), (sx * end, sy * end, 0))
    elif task == "halfcheetah" and part == "torso":
        half = (0.4, 0.25, 0.1)[i]
        ed.fromto("torso", (-half, 0, 0), (half, 0, 0))
        ed.geom_pos("head", ((0.5, 0.35, 0.2)[i], 0, 0.1))
        ed.body_pos("bthigh", (-half, 0, 0))
        ed.body_pos("fthigh", (half, 0, 0))
    elif task == "halfcheetah" and part == "thigh":
        back = ((0.11, 0, -0.11), (0.08, 0, -0.08), (0.02, 0, -0.02))[i]
        front = ((-0.09, 0, -0.1), (-0.07, 0, -0.08), (-0.04, 0, -0.05))[i]
        ed.capsule("bthigh", (0, 0, 0), back)
        ed.body_pos("bshin", back)
        ed.capsule("bshin", (0, 0, 0), (-0.13, 0, -0.15))
        ed.body_pos("bfoot", (-0.13, 0, -0.15))
        ed.capsule("fthigh", (0, 0, 0), front)
        ed.body_pos("fshin", front)
        ed.capsule("fshin", (0, 0, 0), (0.11, 0, -0.13))
        ed.body_pos("ffoot", (0.11, 0, -0.13))
    elif part == "torso":  # hopper and walker2d: torso top 1.45 -> 1.53 | 1.69 | 1.85, thicker
        top, radius = (1.53, 1.69, 1.85)[i], (0.075, 0.1, 0.125)[i]
        _vertical_capsule(ed, "torso_geom", _WALKER_Z["torso"], top, 1.05, radius)
    elif task == "hopper" and part == "foot":  # x-extent (-0.13 .. 0.26) scaled about x = 0, thinner
        factor, radius = (0.8, 0.6, 0.4)[i], (0.048, 0.036, 0.024)[i]
        x0, x1 = -0.13 * factor, 0.26 * factor
        body_x = 0.13  # the foot body's world x
        g = ed.spec.geom("foot_geom")
        ed.geom_pos("foot_geom", (round((x0 + x1) / 2 - body_x, 10), g.pos[1], g.pos[2]))
        ed.geom_size("foot_geom", [radius, round((x1 - x0) / 2, 10)])
    elif task == "walker2d" and part == "leg":  # both knees move down: thigh end 0.6 -> 0.5 | 0.35 | 0.2
        knee = (0.5, 0.35, 0.2)[i]
        leg_z = knee - 0.25
        for side in ("", "_left"):
            _vertical_capsule(ed, f"thigh{side}_geom", _WALKER_Z["thigh"], 1.05, knee)
            ed.body_pos(f"leg{side}", (0, 0, round(leg_z - _WALKER_Z["thigh"], 10)))
            _vertical_capsule(ed, f"leg{side}_geom", leg_z, knee, 0.1)
            ed.body_pos(f"foot{side}", (0.2, 0, round(_WALKER_Z["foot"] - leg_z, 10)))


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------
def _build_registry() -> dict[str, tuple[str, callable]]:
    registry = {}
    for task in TASKS:
        registry[task] = (task, lambda ed: None)
        registry[f"{task}-kinematic"] = (task, functools.partial(_paper_kinematic, task))
        registry[f"{task}-morph"] = (task, functools.partial(_paper_morph, task))
        registry[f"{task}-gravity"] = (task, lambda ed: ed.gravity(0.5))
        for k in GRAVITY_LEVELS:
            registry[f"{task}-gravity-{k}"] = (task, lambda ed, k=float(k): ed.gravity(k))
        for k in GRAVITY_LEVELS:
            registry[f"{task}-friction-{k}"] = (task, lambda ed, k=float(k): ed.friction(k))
        for part in _KINEMATIC_PARTS[task]:
            for level in LEVELS:
                registry[f"{task}-kinematic-{part}-{level}"] = (
                    task, functools.partial(_odrl_kinematic, task, part, level))
        for part in _MORPH_PARTS[task]:
            for level in LEVELS:
                registry[f"{task}-morph-{part}-{level}"] = (task, functools.partial(_odrl_morph, task, part, level))
    return registry


_REGISTRY = _build_registry()
DOMAINS: tuple[str, ...] = tuple(_REGISTRY)


class UnknownDomain(SystemExit):
    pass


def check_domain(name: str, flag: str = "domain") -> str:
    """Return `name` if it is a domain; otherwise exit with one sentence naming the closest valid names."""
    if name in _REGISTRY:
        return name
    close = difflib.get_close_matches(name, DOMAINS, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `python -m envs list` for all 96 names."
    raise UnknownDomain(f"Unknown {flag} '{name}': {hint}")


def check_physics(physics: str) -> str:
    """Return `physics` if it is one of PHYSICS; otherwise exit with one sentence naming the choices."""
    if physics in PHYSICS:
        return physics
    raise SystemExit(f"Unknown physics '{physics}': choose papers (the simulator of the papers and D4RL, the "
                     f"default) or v5 (Gymnasium's v5 environments as they ship).")


def task_spec(task: str, physics: str = DEFAULT_PHYSICS) -> mujoco.MjSpec:
    xml = _PAPERS_XML.get(task, TASKS[task].xml) if check_physics(physics) == "papers" else TASKS[task].xml
    return mujoco.MjSpec.from_file(str(_ASSETS / xml))


# ---------------------------------------------------------------------------------------------------------
# The papers' physics: the model-wide edits that undo what MuJoCo and Gymnasium changed since mujoco-py
# ---------------------------------------------------------------------------------------------------------
def legacy_geom_inertia(geom_type: int, size, mass_or_density: float, *, is_mass: bool = False):
    """(mass, principal inertia in the geom frame) of a primitive geom under MuJoCo <= 2.1.1's compiler.

    Only the capsule differs from today's rule: it counted as a cylinder of radius r and length 2 h + r (its
    cylindrical part, half-length h, extended by half the radius at each end); spheres, boxes, cylinders and
    ellipsoids are the same in both. `mass_or_density` is the geom's density, or its mass with is_mass=True.
    """
    r = size[0]
    if geom_type == mujoco.mjtGeom.mjGEOM_CAPSULE:
        length = 2 * size[1] + r
        volume = np.pi * r * r * length
        inertia = lambda m: (m * (3 * r * r + length ** 2) / 12, m * (3 * r * r + length ** 2) / 12, m * r * r / 2)
    elif geom_type == mujoco.mjtGeom.mjGEOM_CYLINDER:
        volume = np.pi * r * r * 2 * size[1]
        inertia = lambda m: (m * (3 * r * r + 4 * size[1] ** 2) / 12,) * 2 + (m * r * r / 2,)
    elif geom_type == mujoco.mjtGeom.mjGEOM_SPHERE:
        volume = 4 / 3 * np.pi * r ** 3
        inertia = lambda m: (2 / 5 * m * r * r,) * 3
    elif geom_type == mujoco.mjtGeom.mjGEOM_BOX:
        a, b, c = size[:3]
        volume = 8 * a * b * c
        inertia = lambda m: (m / 3 * (b * b + c * c), m / 3 * (a * a + c * c), m / 3 * (a * a + b * b))
    elif geom_type == mujoco.mjtGeom.mjGEOM_ELLIPSOID:
        a, b, c = size[:3]
        volume = 4 / 3 * np.pi * a * b * c
        inertia = lambda m: (m / 5 * (b * b + c * c), m / 5 * (a * a + c * c), m / 5 * (a * a + b * b))
    else:
        raise ValueError(f"no legacy inertia rule for geom type {geom_type}")
    mass = mass_or_density if is_mass else mass_or_density * volume
    return mass, np.asarray(inertia(mass))


def _legacy_inertials(ed: _Editor) -> None:
    """Give every body the explicit inertial that MuJoCo <= 2.1.1 computed from its geoms.

    The geoms' frames and sizes come from compiling the (shifted) spec; the masses from their densities (or
    explicit masses) by the old rule; the body's mass, centre of mass and principal axes combine them as the
    compiler does (parallel-axis theorem, eigen-decomposition). settotalmass, where the model has it, still
    rescales afterwards, as it did then."""
    spec = ed.spec
    compiled = spec.compile()
    geoms, bodies = list(spec.geoms), list(spec.bodies)  # in the compiled order (depth first), world first
    assert len(geoms) == compiled.ngeom and len(bodies) == compiled.nbody
    for body_id in range(1, compiled.nbody):
        ids = [g for g in range(compiled.ngeom) if compiled.geom_bodyid[g] == body_id]
        if not ids:
            continue
        masses, centres, tensors = [], [], []
        for g in ids:
            given = geoms[g].mass
            mass, principal = legacy_geom_inertia(
                compiled.geom_type[g], compiled.geom_size[g], given if np.isfinite(given) else geoms[g].density,
                is_mass=bool(np.isfinite(given)))
            rotation = np.zeros(9)
            mujoco.mju_quat2Mat(rotation, compiled.geom_quat[g])
            rotation = rotation.reshape(3, 3)
            masses.append(mass), centres.append(compiled.geom_pos[g]), tensors.append(
                rotation @ np.diag(principal) @ rotation.T)
        total = float(np.sum(masses))
        centre = np.sum([m * c for m, c in zip(masses, centres)], axis=0) / total
        tensor = sum(i + m * (np.dot(c - centre, c - centre) * np.eye(3) - np.outer(c - centre, c - centre))
                     for m, c, i in zip(masses, centres, tensors))
        principal, axes = np.linalg.eigh(tensor)
        if np.linalg.det(axes) < 0:
            axes[:, 0] *= -1
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, axes.ravel())
        body = bodies[body_id]
        body.mass, body.ipos, body.iquat, body.inertia = total, list(centre), list(quat), list(principal)
        body.explicitinertial = True
    spec.compiler.inertiafromgeom = mujoco.mjtInertiaFromGeom.mjINERTIAFROMGEOM_AUTO


def _legacy_margins(ed: _Editor) -> None:
    """Halve every geom margin: MuJoCo >= 3.5.0 adds the two geoms' margins where the old rule took the larger;
    with one margin m on every geom (true of all four tasks, checked here) m/2 + m/2 = max(m, m)."""
    margins = {round(float(geom.margin), 12) for geom in ed.spec.geoms}
    if len(margins) != 1:
        raise ValueError(f"geom margins differ ({sorted(margins)}): halving them would not give the old max rule")
    margin = margins.pop()
    if margin == 0:
        return
    for geom in ed.spec.geoms:
        geom.margin = geom.margin / 2
    ed.changes.append(Change(f"geom (all {len(ed.spec.geoms)})", "margin", (margin,), (margin / 2,),
                             "contact margin: the old max rule"))


def _papers_edits(task: str, ed: _Editor) -> None:
    """The papers' physics, applied after the shift (the shift's edits set the geometry the inertia comes from)."""
    _legacy_margins(ed)
    _legacy_inertials(ed)


def _papers_base_changes(task: str) -> list[Change]:
    """What the papers' model file itself differs in from the v5 one (Walker2d's right foot)."""
    if task not in _PAPERS_XML:
        return []
    old, new = task_spec(task, "v5"), task_spec(task, "papers")
    changes = []
    for geom in new.geoms:
        before = old.geom(geom.name)
        if not np.allclose(before.friction, geom.friction):
            changes.append(Change(f"geom {geom.name}", "friction", tuple(before.friction), tuple(geom.friction),
                                  f"Gymnasium's {_PAPERS_XML[task]}, the v3 model"))
    return changes


def _semantics(task: str, physics: str) -> tuple[str, ...]:
    if physics != "papers":
        return ()
    notes = []
    if task in _ALIVE_BONUS_TASKS:
        notes.append("reward: the alive bonus (1.0) is paid on the terminating step too, as in v3")
    if task == "ant":
        notes.append("reward: no contact cost (contact_cost_weight 0), as under mujoco-py 2.x")
    return tuple(notes)


def build_spec(name: str, physics: str = DEFAULT_PHYSICS) -> tuple[mujoco.MjSpec, tuple[Change, ...]]:
    """The edited MjSpec of a domain and the changes the shift made to the task's model in that physics."""
    spec, changes, _ = _build(name, physics)
    return spec, changes


def _build(name: str, physics: str):
    task, edit = _REGISTRY[check_domain(name)]
    editor = _Editor(task_spec(task, physics))
    edit(editor)
    shift_changes = tuple(editor.changes)
    physics_changes = ()
    if physics == "papers":
        editor.changes = []
        _papers_edits(task, editor)
        physics_changes = tuple(_papers_base_changes(task)) + tuple(editor.changes)
    return editor.spec, shift_changes, physics_changes


@functools.lru_cache(maxsize=None)
def domain_info(name: str, physics: str = DEFAULT_PHYSICS) -> DomainInfo:
    task, _ = _REGISTRY[check_domain(name)]
    t = TASKS[task]
    _, changes, physics_changes = _build(name, check_physics(physics))
    if physics == "papers":  # the old inertia rule, body by body, as compiled (after settotalmass) against v5
        v5, papers = compile_model(name, "v5"), compile_model(name, "papers")
        for body in range(1, papers.nbody):
            if not np.isclose(v5.body_mass[body], papers.body_mass[body], rtol=1e-9, atol=0):
                label = mujoco.mj_id2name(papers, mujoco.mjtObj.mjOBJ_BODY, body) or f"#{body}"
                physics_changes += (Change(f"body {label}", "mass", (float(v5.body_mass[body]),),
                                           (float(papers.body_mass[body]),), "old capsule rule, inertia too"),)
    return DomainInfo(name, task, t.env_id, t.obs_dim, t.act_dim, changes, physics, physics_changes,
                      _semantics(task, physics))


def compile_model(name: str, physics: str = DEFAULT_PHYSICS) -> mujoco.MjModel:
    """The domain's compiled model, built in memory (a fresh copy each call; built once per domain and physics).

    Not through `MjSpec.to_xml()`: that writes the compiled masses with 6 significant digits, which would make
    every shifted model differ from the original in its masses by ~1e-6."""
    return copy.copy(_compiled(check_domain(name), check_physics(physics)))


@functools.lru_cache(maxsize=None)
def _compiled(name: str, physics: str) -> mujoco.MjModel:
    task, _ = _REGISTRY[name]
    if name == task and physics == "v5":
        return mujoco.MjModel.from_xml_path(str(_ASSETS / TASKS[task].xml))
    spec, _, _ = _build(name, physics)
    return spec.compile()


def _install_model(env: gym.Env, model: mujoco.MjModel) -> None:
    """Swap the model of a Gymnasium MuJoCo env for a shifted one of the same structure (same nq, nv, nu)."""
    base = env.unwrapped
    assert (model.nq, model.nv, model.nu) == (base.model.nq, base.model.nv, base.model.nu)
    base.model, base.data = model, mujoco.MjData(model)
    base.init_qpos, base.init_qvel = model.qpos0.ravel().copy(), np.zeros(model.nv)
    renderer = getattr(base, "mujoco_renderer", None)
    if renderer is not None:
        renderer.model, renderer.data = base.model, base.data


class PapersRewards(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """v3's reward on a v5 env: the alive bonus is paid on the terminating step too (v3 paid it whenever
    termination was on, v5 only while healthy). Ant's contact cost is switched off by its own flag instead."""

    def __init__(self, env: gym.Env, alive_bonus: float):
        gym.utils.RecordConstructorArgs.__init__(self, alive_bonus=alive_bonus)
        gym.Wrapper.__init__(self, env)
        self.alive_bonus = alive_bonus

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward + self.alive_bonus * float(terminated), terminated, truncated, info


def make_env(name: str, physics: str = DEFAULT_PHYSICS, **gym_kwargs) -> gym.Env:
    """A Gymnasium environment of the domain in `physics` (1000-step time limit, the task's v5 defaults)."""
    info = domain_info(name, check_physics(physics))
    kwargs = dict(TASKS[info.task].gym_kwargs)
    if physics == "papers" and info.task == "ant":
        kwargs["contact_cost_weight"] = 0.0
    kwargs.update(gym_kwargs)
    env = gym.make(info.env_id, **kwargs)
    if name != info.task or physics != "v5":
        _install_model(env, compile_model(name, physics))
    if physics == "papers" and info.task in _ALIVE_BONUS_TASKS:
        env = PapersRewards(env, float(env.unwrapped._healthy_reward))
    return env


def make_vec_env(name: str, num_envs: int, physics: str = DEFAULT_PHYSICS, **gym_kwargs) -> gym.vector.VectorEnv:
    """`num_envs` copies of the domain in one synchronous vector env (auto-reset on the step after an end)."""
    return gym.vector.SyncVectorEnv([functools.partial(make_env, name, physics, **gym_kwargs)
                                     for _ in range(num_envs)])
