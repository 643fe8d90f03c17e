"""One-step agreement of our two physics with an independent construction of the papers' simulator.

    python -m venv /tmp/mujoco340 && /tmp/mujoco340/bin/pip install mujoco==3.4.0 numpy
    python benchmarks/physics_check.py --reference-python /tmp/mujoco340/bin/python

The reference is built without any code of envs/: the old model file of each task as Gymnasium ships it (for
Walker2d the v3-era walker2d.xml, right foot friction 0.9), compiled by MuJoCo 3.4.0, the last release whose
contact margin is the larger of the two geoms' margins, with the old capsule inertia rule expressed in MuJoCo's
own terms: every capsule gets density 0 and a non-colliding cylinder twin of its radius whose half-length is the
capsule's plus half its radius (the cylinder MuJoCo <= 2.1.1 put in its place), so MuJoCo's own compiler works out
the masses and inertias. Our `papers` and `v5` models (envs.compile_model, MuJoCo of requirements.txt) and the
reference then take one environment step (frame_skip MuJoCo steps) from the same states and actions: states
visited by uniform random actions in the papers' physics, uniform random actions. Reported per task: the median
and the maximum over the samples of the mean absolute difference of the next observation (observation units).

Writes benchmarks/results/physics_check.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TASKS = {"halfcheetah": ("half_cheetah.xml", 5), "hopper": ("hopper.xml", 4), "walker2d": ("walker2d.xml", 4),
         "ant": ("ant.xml", 5)}


def observation(task: str, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """The task's v5 observation (Ant without contact forces), batched over the first axis."""
    if task == "ant":
        return np.concatenate([qpos[:, 2:], qvel], 1)
    if task == "halfcheetah":
        return np.concatenate([qpos[:, 1:], qvel], 1)
    return np.concatenate([qpos[:, 1:], np.clip(qvel, -10, 10)], 1)


def step_all(model, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray, frame_skip: int):
    """Next (qpos, qvel) of one environment step from each (qpos, qvel, action), each from a fresh MjData."""
    import mujoco
    data = mujoco.MjData(model)
    next_qpos, next_qvel = np.empty_like(qpos), np.empty_like(qvel)
    for i in range(len(qpos)):
        mujoco.mj_resetData(model, data)
        data.qpos[:], data.qvel[:], data.ctrl[:] = qpos[i], qvel[i], actions[i]
        for _ in range(frame_skip):
            mujoco.mj_step(model, data)
        next_qpos[i], next_qvel[i] = data.qpos, data.qvel
    return next_qpos, next_qvel


def reference_model(xml_path: str):
    """The independent construction of the old simulator's model (see the module docstring). Under MuJoCo 3.5 or
    newer (--compare-python) every geom margin is halved, so that the sum rule gives the old max."""
    import mujoco
    spec = mujoco.MjSpec.from_file(xml_path)
    if tuple(int(part) for part in mujoco.__version__.split(".")[:2]) >= (3, 5):
        for geom in spec.geoms:
            geom.margin = geom.margin / 2
    compiled = spec.compile()
    geoms = list(spec.geoms)
    for g, geom in enumerate(geoms):
        if geom.type != mujoco.mjtGeom.mjGEOM_CAPSULE:
            continue
        radius, half = compiled.geom_size[g][:2]
        body = geom.parent
        twin = body.add_geom()
        twin.type = mujoco.mjtGeom.mjGEOM_CYLINDER
        twin.size = [radius, half + radius / 2, 0]
        twin.pos, twin.quat = list(compiled.geom_pos[g]), list(compiled.geom_quat[g])
        twin.density = geom.density
        twin.contype, twin.conaffinity, twin.group = 0, 0, 5
        geom.density = 0.0
    return spec.compile()


def reference_main(path: str) -> None:
    """Run under MuJoCo 3.4.0: read the states and model files from `path` (npz), add the reference's steps."""
    import mujoco
    with np.load(path, allow_pickle=False) as arrays:
        data = dict(arrays)
    for task, (_, frame_skip) in TASKS.items():
        model = reference_model(str(data[f"{task}/xml"]))
        qpos, qvel = step_all(model, data[f"{task}/qpos"], data[f"{task}/qvel"], data[f"{task}/actions"], frame_skip)
        data[f"{task}/reference_obs"] = observation(task, qpos, qvel)
        data[f"{task}/reference_mass"] = model.body_mass.copy()
    data["reference_mujoco"] = np.asarray(mujoco.__version__)
    np.savez(path, **data)


def sample_states(task: str, samples: int, seed: int):
    """States visited by uniform random actions in the papers' physics, and fresh uniform actions."""
    from envs import make_env
    env = make_env(task)
    rng = np.random.default_rng(seed)
    qpos, qvel, episode = [], [], 0
    while len(qpos) < 4 * samples:
        env.reset(seed=seed + episode)
        episode += 1
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            qpos.append(env.unwrapped.data.qpos.copy()), qvel.append(env.unwrapped.data.qvel.copy())
            done = terminated or truncated
    pick = rng.choice(len(qpos), samples, replace=False)
    actions = rng.uniform(-1, 1, (samples, env.action_space.shape[0]))
    return np.asarray(qpos)[pick], np.asarray(qvel)[pick], actions


def summary(errors: np.ndarray) -> dict:
    return {"median": float(np.median(errors)), "p99": float(np.quantile(errors, 0.99)), "max": float(np.max(errors)),
            "mean": float(np.mean(errors))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", help="a Python with mujoco==3.4.0 and numpy (see the docstring)")
    parser.add_argument("--compare-python", nargs="*", default=[],
                        help="Pythons with other MuJoCo releases: the same construction stepped there, against 3.4.0")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "physics_check"))
    parser.add_argument("--reference-step", help=argparse.SUPPRESS)  # the part that runs under MuJoCo 3.4.0
    args = parser.parse_args(argv)
    if args.reference_step:
        return reference_main(args.reference_step)
    if not args.reference_python:
        raise SystemExit("Give --reference-python: a Python with mujoco==3.4.0 and numpy installed (see "
                         "`python benchmarks/physics_check.py --help`).")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import gymnasium as gym
    import mujoco
    from envs import compile_model

    assets = Path(gym.__file__).parent / "envs" / "mujoco" / "assets"
    data, ours = {}, {}
    for task, (xml, frame_skip) in TASKS.items():
        qpos, qvel, actions = sample_states(task, args.samples, args.seed)
        data.update({f"{task}/qpos": qpos, f"{task}/qvel": qvel, f"{task}/actions": actions,
                     f"{task}/xml": np.asarray(str(assets / xml))})
        for physics in ("papers", "v5"):
            model = compile_model(task, physics)
            ours[task, physics] = (observation(task, *step_all(model, qpos, qvel, actions, frame_skip)),
                                   model.body_mass.copy())
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "states.npz")
        np.savez(path, **data)
        subprocess.run([args.reference_python, __file__, "--reference-step", path], check=True)
        with np.load(path, allow_pickle=False) as arrays:
            reference = dict(arrays)
        others = {}
        for python in args.compare_python:
            other_path = str(Path(tmp) / "other.npz")
            np.savez(other_path, **data)
            subprocess.run([python, __file__, "--reference-step", other_path], check=True)
            with np.load(other_path, allow_pickle=False) as arrays:
                other = dict(arrays)
            others[str(other["reference_mujoco"])] = {
                task: summary(np.abs(other[f"{task}/reference_obs"] - reference[f"{task}/reference_obs"]).mean(1))
                for task in TASKS}
    rows = {}
    for task in TASKS:
        rows[task] = {"samples": args.samples}
        for physics in ("papers", "v5"):
            obs, masses = ours[task, physics]
            rows[task][physics] = summary(np.abs(obs - reference[f"{task}/reference_obs"]).mean(1))
            rows[task][physics]["max_body_mass_difference"] = float(
                np.abs(masses - reference[f"{task}/reference_mass"]).max())
    command = "python benchmarks/physics_check.py --reference-python <python with mujoco==3.4.0>" + (
        f" --samples {args.samples}" if args.samples != 2000 else "")
    if args.compare_python:
        command += " --compare-python " + " ".join(f"<python with mujoco=={v}>" for v in others)
    record = {"command": command, "ours_mujoco": mujoco.__version__,
              "reference_mujoco": str(reference["reference_mujoco"]), "seed": args.seed, "tasks": rows,
              "same_construction_in_other_releases": others}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    tmp.replace(out.with_suffix(".json"))
    lines = [
        "# One-step agreement with an independent construction of the papers' simulator", "",
        f"`{command}` (seed {args.seed}). Ours: MuJoCo {mujoco.__version__}; reference: the old model files "
        f"compiled by MuJoCo {record['reference_mujoco']} (the old max rule for contact margins), capsules "
        "replaced for inertia by the cylinders of MuJoCo <= 2.1.1's rule (see benchmarks/physics_check.py). "
        f"{args.samples} states per task visited by uniform random actions, uniform random actions; the error of "
        "a sample is the mean absolute difference of the next observation after one environment step.", "",
        "| task | papers: median | papers: 99th pct | papers: max | v5: median | v5: max | body masses, papers vs "
        "reference |", "|---|---|---|---|---|---|---|"]
    for task, row in rows.items():
        lines.append(f"| {task} | {row['papers']['median']:.1e} | {row['papers']['p99']:.1e} | "
                     f"{row['papers']['max']:.1e} | {row['v5']['median']:.1e} | {row['v5']['max']:.1e} | "
                     f"{row['papers']['max_body_mass_difference']:.1e} kg |")
    if others:
        lines += ["", "The same construction stepped by other MuJoCo releases (margins halved from 3.5 on), against "
                  "3.4.0: median / max of the same error.", "",
                  "| MuJoCo | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
        for version, by_task in others.items():
            lines.append(f"| {version} | " + " | ".join(f"{by_task[t]['median']:.1e} / {by_task[t]['max']:.1e}"
                                                       for t in TASKS) + " |")
    exact = [task for task, row in rows.items() if row["papers"]["max"] <= 1e-5]
    lines += ["", f"Conclusion: within 1e-5 on every sample for {', '.join(exact) or 'no task'}."]
    for task in (task for task in rows if task not in exact):
        row = rows[task]["papers"]
        same = [v for v, by_task in others.items() if by_task[task]["max"] >= 0.5 * row["max"]]
        lines.append(f"{task}: median {row['median']:.1e}, 99th percentile {row['p99']:.1e}, max {row['max']:.1e}"
                     + (f"; the same independent construction stepped by MuJoCo {', '.join(same)} differs from 3.4.0 "
                        f"as much: the residual comes from the engine release, not from the model (no model "
                        f"edit can undo it)." if same else "."))
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out.with_suffix(".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
