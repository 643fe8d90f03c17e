"""Which value pre-training estimates advantages better, SQL's (DVDF's value alignment) or IQL's? Both against
Monte-Carlo estimates of the behaviour policy's advantage on transitions of a generated source dataset (the
question of DVDF's Fig. 2b, asked of this project's data).

    python benchmarks/advantage_error.py --source hopper-kinematic --qualities medium expert --steps 1000000

Estimators, each trained on the whole source dataset for --steps (resumable runs under --runs, reused when done):
    sql   python algos/sql_pretrain.py --no-policy with its defaults (alpha 0.1, 0.2 on Ant; rewards scaled by
          1000 / return range; LayerNorm): the stage dvdf.py filters with
    iql   python algos/iql.py --data source --target <source> with its defaults (the IGDF/DVDF authors' IQL:
          expectile 0.7, raw rewards): IQL's value pre-training
each read as A(s, a) = min(Q1, Q2)(s, a) - V(s) of its online critics and value (dvdf.py's advantage), divided by
the run's reward scale, so in the data's reward units.

Ground truth: --states transitions (s, a) drawn from the dataset. The generator stored every step's MuJoCo state
(qpos, qvel), so the domain is reset to that exact state and the episode's own behaviour policy (its
episode_metadata entry: the zoo policy with sampled actions, or uniform random actions) is rolled out --rollouts
times starting with the action a (Q_MC) and --rollouts times starting with an action of its own (V_MC), each for
--horizon steps discounted by the stages' 0.99 (no time limit: the stages bootstrap through truncations);
A_MC = Q_MC - V_MC is the behaviour policy's advantage.

Columns: Spearman rank correlation of A with A_MC; top-half agreement (of the half of the transitions that A ranks
highest, the share that A_MC ranks in its own top half: DVDF's keep decision at xi = 0.5, 0.5 being chance); RMSE
of A - A_MC in reward units (SQL and IQL value an improved, in-support policy rather than the behaviour policy, so
part of it is bias by design); and the ceiling: how far A_MC's own rollout noise lets any estimator correlate with
it, sqrt of its reliability (the rank correlation of its two halves of rollouts, stepped up to all of them by
Spearman-Brown). Writes benchmarks/results/advantage_error_<source>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from envs import load_dataset, make_env  # noqa: E402
from envs.generate import POLICY_DIR, Policy  # noqa: E402
from envs.run import load_script, read_artifact, read_checkpoint, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ESTIMATORS = ("sql", "iql")
DISCOUNT = 0.99


# ---------------------------------------------------------------- ground truth
def sample_transitions(dataset, count: int, rng: np.random.Generator) -> dict:
    """`count` transitions of the dataset, drawn without replacement, with each one's MuJoCo state and policy."""
    import minari

    if count > dataset.size:
        raise SystemExit(f"--states {count} is more than the {dataset.size:,} transitions of {dataset.name}.")
    if not dataset.episode_metadata:
        raise SystemExit(f"{dataset.name} says nothing of the policy behind each episode (no episode_metadata): "
                         f"only the project's generated datasets can be rolled out again.")
    indices = np.sort(rng.choice(dataset.size, count, replace=False))
    episodes = dataset.episode_ids[indices]
    steps = indices - np.searchsorted(dataset.episode_ids, episodes, side="left")
    wanted = np.unique(episodes)
    stored = minari.load_dataset(dataset.name).iterate_episodes(episode_indices=wanted.tolist())
    infos = {int(e): episode.infos for e, episode in zip(wanted, stored)}
    if any("qpos" not in info for info in infos.values()):
        raise SystemExit(f"{dataset.name} holds no MuJoCo states (infos qpos/qvel); make it again with "
                         f"python -m envs.generate to roll its transitions out.")
    return {"index": indices, "observations": dataset.observations[indices], "actions": dataset.actions[indices],
            "qpos": np.stack([infos[int(e)]["qpos"][t] for e, t in zip(episodes, steps)]),
            "qvel": np.stack([infos[int(e)]["qvel"][t] for e, t in zip(episodes, steps)]),
            "policy": [dataset.episode_metadata[int(e)]["policy"] for e in episodes]}


def behaviour_policy(name: str, act_dim: int) -> Policy:
    return Policy(None if name == "uniform-random" else POLICY_DIR / name, act_dim)


def rollout_returns(domain: str, physics: str, jobs: list[tuple], act_dim: int, horizon: int, rng, slots: int,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Discounted --horizon-step return of each job (qpos, qvel, first action or None, policy name), rolled out
    `slots` at a time in lockstep (one batched policy call per step); also the observation each reset gave."""
    envs = [make_env(domain, physics) for _ in range(min(slots, len(jobs)))]
    returns, first_obs = np.zeros(len(jobs)), np.zeros((len(jobs), envs[0].observation_space.shape[0]))
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][3])  # one policy per batch
    batches = []
    for j in order:
        if not batches or len(batches[-1]) == len(envs) or jobs[batches[-1][0]][3] != jobs[j][3]:
            batches.append([])
        batches[-1].append(j)
    for batch in batches:
        policy = behaviour_policy(jobs[batch[0]][3], act_dim)
        obs = []
        for env, j in zip(envs, batch):
            env.reset(seed=0)
            env.unwrapped.set_state(jobs[j][0], jobs[j][1])
            obs.append(env.unwrapped._get_obs())
        obs = np.asarray(obs, dtype=np.float64)
        first_obs[batch] = obs
        live, total, weight = np.ones(len(batch), bool), np.zeros(len(batch)), 1.0
        given = np.array([jobs[j][2] is not None for j in batch])
        first = np.array([jobs[j][2] if jobs[j][2] is not None else np.zeros(act_dim) for j in batch])
        for t in range(horizon):
            actions = policy(obs, rng)
            if t == 0:
                actions = np.where(given[:, None], first, actions)
            for i in np.flatnonzero(live):
                obs[i], reward, terminated, _, _ = envs[i].step(actions[i])
                total[i] += weight * reward
                live[i] = not terminated
            weight *= DISCOUNT
            if not live.any():
                break
        returns[batch] = total
        if progress is not None:
            progress(len(batch))
    for env in envs:
        env.close()
    return returns, first_obs


def monte_carlo_advantages(domain: str, physics: str, sample: dict, rollouts: int, horizon: int, seed: int,
                           slots: int) -> dict:
    """A_MC = Q_MC - V_MC of each sampled transition, with its two half-estimates (for the reliability)."""
    count, act_dim = len(sample["index"]), sample["actions"].shape[1]
    def jobs_of(first_action: bool) -> list[tuple]:
        return [(sample["qpos"][i], sample["qvel"][i], sample["actions"][i].astype(np.float64) if first_action
                 else None, sample["policy"][i]) for i in range(count) for _ in range(rollouts)]

    jobs = jobs_of(True) + jobs_of(False)  # Q's rollouts (state i's at i * rollouts ...), then V's
    begin, done = time.time(), [0]

    def progress(n: int) -> None:
        done[0] += n
        rate = done[0] / max(time.time() - begin, 1e-9)
        print(f"\r  rollouts {done[0]:,}/{len(jobs):,} ({rate:.1f}/s, ETA {(len(jobs) - done[0]) / rate:.0f} s)",
              end="", flush=True)

    returns, first_obs = rollout_returns(domain, physics, jobs, act_dim, horizon, np.random.default_rng(seed),
                                         slots, progress)
    print()
    mismatch = np.abs(first_obs[: count * rollouts: rollouts] - sample["observations"]).max()
    if mismatch > 1e-3:
        raise SystemExit(f"Resetting {domain} to the stored MuJoCo states does not give the dataset's observations "
                         f"back (largest difference {mismatch:.3g}): the dataset was made in another physics or "
                         f"domain; make it again with python -m envs.generate --force.")
    q, v = returns[: count * rollouts].reshape(count, rollouts), returns[count * rollouts:].reshape(count, rollouts)
    half = rollouts // 2
    return {"advantage": q.mean(1) - v.mean(1), "q": q.mean(1), "v": v.mean(1),
            "halves": (q[:, :half].mean(1) - v[:, :half].mean(1), q[:, half:].mean(1) - v[:, half:].mean(1)),
            "standard_error": float(np.sqrt((q.var(1, ddof=1) + v.var(1, ddof=1)) / rollouts).mean()),
            "mismatch": float(mismatch)}


# ---------------------------------------------------------------- estimators
def train_estimator(kind: str, source: str, quality: str, steps: int, runs: Path) -> Path:
    """The run folder of a finished `kind` stage on (source, quality), trained or resumed here when it is not."""
    out = runs / f"{source}-{quality}" / kind
    try:
        if json.loads((out / "results.json").read_text()).get("finished"):
            return out
    except (OSError, ValueError):
        pass
    every = str(min(steps, 10_000) if kind == "sql" else steps)  # IQL: one evaluation, at the end
    common = ["--source", source, "--quality", quality, "--steps", str(steps), "--eval-every", every, "--out",
              str(out)] + (["--resume"] if (out / "checkpoint.msgpack").exists() else [])
    if kind == "sql":
        load_script("sql_pretrain", "advantage_error_sql").main(common + ["--no-policy"])
    else:
        load_script("iql", "advantage_error_iql").main(common + ["--data", "source", "--target", source,
                                                                 "--eval-episodes", "5"])
    return out


def estimator_advantage(kind: str, out: Path, observations: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray,
                                                                                                       dict]:
    """A = min(Q1, Q2)(s, a) - V(s) of the run's first seed, in reward units, and what the run was."""
    sql = load_script("sql_pretrain", "advantage_error_networks")  # the copied networks (identical in iql.py)
    obs_dim, act_dim = observations.shape[1], actions.shape[1]
    if kind == "sql":
        params, info = read_artifact(str(out / "sql.msgpack"), "sql", "--runs", obs_dim, act_dim)
        hidden, layer_norm, scale = tuple(info["hidden"]), info["layer_norm"], info["reward_scale"]
        critic, value, step = params["critic"], params["value"], info["step"]
        mean, std = np.zeros(obs_dim), np.ones(obs_dim)
    else:
        saved = read_checkpoint(out / "checkpoint.msgpack")
        flags, results = json.loads(saved["flags"]), json.loads((out / "results.json").read_text())
        state = jax.tree.map(lambda x: x[0], saved["runner"]["state"])
        hidden, layer_norm, scale = tuple(flags["hidden"]), False, results["data"]["reward_scale"]
        critic, value, step = state["critic"]["params"], state["value"]["params"], int(saved["step"])
        mean = np.asarray(results["data"]["state_mean"] or np.zeros(obs_dim))
        std = np.asarray(results["data"]["state_std"] or np.ones(obs_dim))
    obs = jnp.asarray((observations - mean) / std, jnp.float32)
    q = sql.TwinCritic(hidden, layer_norm).apply(critic, obs, jnp.asarray(actions, jnp.float32)).min(0)
    v = sql.ValueNet(hidden, layer_norm).apply(value, obs)
    return np.asarray(q - v) / scale, {"run": str(out), "step": step, "reward_scale": scale,
                                        "layer_norm": layer_norm, "q_mean": float(np.asarray(q).mean() / scale)}


def agreement(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Of the half of the transitions `estimate` ranks highest, the share that `truth` ranks in its top half."""
    half = len(truth) // 2
    top_estimate, top_truth = set(np.argsort(-estimate)[:half]), set(np.argsort(-truth)[:half])
    return len(top_estimate & top_truth) / max(half, 1)


def compare(estimate: np.ndarray, mc: dict) -> dict:
    truth = mc["advantage"]
    return {"spearman": float(spearmanr(estimate, truth).statistic), "top_half_agreement": agreement(estimate, truth),
            "rmse": float(np.sqrt(np.mean((estimate - truth) ** 2))), "mean": float(estimate.mean())}


def ceiling(mc: dict) -> float:
    """sqrt of A_MC's reliability: its two halves' rank correlation, stepped up to all rollouts (Spearman-Brown)."""
    half = float(spearmanr(*mc["halves"]).statistic)
    reliability = max(2 * half / (1 + half), 0.0) if half > -1 else 0.0
    return float(np.sqrt(reliability))


# ---------------------------------------------------------------- main
def measure(args, quality: str) -> dict:
    dataset = load_dataset(domain=args.source, quality=quality, physics=args.physics)
    runs = {kind: train_estimator(kind, args.source, quality, args.steps, Path(args.runs)) for kind in args.estimators}
    sample = sample_transitions(dataset, args.states, np.random.default_rng(args.seed))
    print(f"{args.source} {quality}: {args.states} transitions x {args.rollouts} + {args.rollouts} rollouts of "
          f"{args.horizon} steps")
    mc = monte_carlo_advantages(args.source, args.physics, sample, args.rollouts, args.horizon, args.seed + 1,
                                args.slots)
    row = {"quality": quality, "dataset": dataset.name, "mc": {
        "advantage_mean": float(mc["advantage"].mean()), "advantage_std": float(mc["advantage"].std()),
        "q_mean": float(mc["q"].mean()), "standard_error": mc["standard_error"], "ceiling": ceiling(mc),
        "observation_mismatch": mc["mismatch"]}, "estimators": {}}
    for kind, out in runs.items():
        estimate, info = estimator_advantage(kind, out, sample["observations"], sample["actions"])
        row["estimators"][kind] = info | compare(estimate, mc)
    return row


def markdown(record: dict) -> str:
    lines = [f"# Advantage estimation against Monte-Carlo: {record['source']}", "",
             f"`{record['command']}`", "",
             f"{record['states']} source transitions per dataset; A_MC from {record['rollouts']} + "
             f"{record['rollouts']} rollouts of the episode's own behaviour policy, {record['horizon']} steps, "
             f"discount {DISCOUNT} "
             "(benchmarks/advantage_error.py says how). Spearman and top-half agreement: higher is better (chance: "
             "0 and 0.5); ceiling: the most A_MC's own rollout noise lets any estimator reach in Spearman; RMSE in "
             "reward units.", "",
             "| quality | estimator | steps | Spearman | top-half agreement | RMSE | mean A | mean A_MC | MC std error "
             "| ceiling |", "|---" * 10 + "|"]
    for row in record["rows"]:
        for kind, e in row["estimators"].items():
            lines.append(f"| {row['quality']} | {kind} | {e['step']:,} | {e['spearman']:.3f} | "
                         f"{e['top_half_agreement']:.3f} | {e['rmse']:.3g} | {e['mean']:.3g} | "
                         f"{row['mc']['advantage_mean']:.3g} | {row['mc']['standard_error']:.3g} | "
                         f"{row['mc']['ceiling']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="hopper-kinematic", help="domain of the source dataset")
    parser.add_argument("--qualities", nargs="+", default=["medium"],
                        choices=["random", "medium", "medium-replay", "medium-expert", "expert"])
    parser.add_argument("--steps", type=int, default=1_000_000, help="gradient steps of each value stage")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--states", type=int, default=200, help="transitions evaluated per dataset")
    parser.add_argument("--rollouts", type=int, default=10, help="Monte-Carlo rollouts for Q and again for V")
    parser.add_argument("--horizon", type=int, default=500, help="steps per rollout (0.99^500 = 0.007)")
    parser.add_argument("--slots", type=int, default=256, help="environments stepped in lockstep")
    parser.add_argument("--physics", default="papers", choices=["papers", "v5"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/advantage_error", help="where the value stages train")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/advantage_error_"
                                                    "<source>)")
    args = parser.parse_args(argv)
    for flag, value, low in (("--steps", args.steps, 1), ("--states", args.states, 4), ("--rollouts", args.rollouts, 2),
                             ("--slots", args.slots, 1)):
        if value < low:
            raise SystemExit(f"{flag} must be at least {low}, got {value}.")
    if not 1 <= args.horizon <= 1000:
        raise SystemExit(f"--horizon must be between 1 and 1000 (the domains' time limit), got {args.horizon}.")
    record = {"command": "python benchmarks/advantage_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "source": args.source, "steps": args.steps, "states": args.states, "rollouts": args.rollouts,
              "horizon": args.horizon, "discount": DISCOUNT, "physics": args.physics, "seed": args.seed,
              "rows": [measure(args, quality) for quality in args.qualities]}
    stem = Path(args.out) if args.out else RESULTS / f"advantage_error_{args.source}"
    write_atomic(stem.with_suffix(".json"), json.dumps(record, indent=1, allow_nan=False))
    write_atomic(stem.with_suffix(".md"), markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
