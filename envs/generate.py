"""Dataset generator: the source and target datasets the papers never released, made from the committed
behaviour-policy zoo (envs/policies/), deterministically from a seed, into the local Minari store.

    python -m envs.generate --domain halfcheetah-kinematic --quality medium --size 1000000 --seed 0

Qualities (the D4RL recipe applied to any domain):
    random          uniform random actions
    medium          the zoo's medium policy (25-65% of the expert's return), actions sampled from its Gaussian
    expert          the zoo's expert policy, actions sampled
    medium-expert   half medium, half expert (D4RL: 1M + 1M)
    medium-replay   rebuilt from the zoo's SAC snapshots up to the medium policy (every 25k steps, at most 5
                    kept, evenly spaced): the steps between snapshot k and k+1 are played by snapshot k (the steps
                    before the first snapshot by uniform random actions), as many transitions per snapshot as SAC
                    took between them. A true replay buffer holds data of a policy that changed at every step; here
                    it changes every 25k or more steps, and episodes do not straddle a snapshot change.

Every episode's MuJoCo state (qpos, qvel) is stored in its `infos`, so any transition can be re-simulated.
Dataset metadata: ref_min_score / ref_max_score (the domain's random and expert returns), and
"episode_metadata", a JSON list with one {"domain", "quality", "policy"} per episode.
Dataset ids: crossdomain/<domain>/<quality>-v0 in the papers' physics (the default), crossdomain-v5/... with
--physics v5 (envs.generated_dataset_id); the dataset's metadata says which ("physics").

Mixtures: one dataset of whole trajectories from several (domain, quality) components, each rolled out in its own
domain, with each episode's domain and quality in episode_metadata (DVDF's motivating example, V2A's heterogeneous
sources). The named mixtures are in MIXTURES and stored as crossdomain/mix/<name>-v0 (crossdomain-v5/mix/... in
v5 physics; made on demand by the loader like any generated dataset); ref_min_score / ref_max_score are those of
the first component's domain.

    python -m envs.generate --mixture halfcheetah-kinematic-random-expert
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from envs.catalog import QUALITIES, generated_dataset_id, generated_namespace
from envs.domains import DEFAULT_PHYSICS, PHYSICS, check_domain, check_physics, domain_info, make_env

POLICY_DIR = Path(__file__).parent / "policies"
REFERENCES = Path(__file__).parent / "references.json"
DEFAULT_SIZE = 1_000_000
GENERATION_RATE = 4000  # transitions per second one CPU core rolls out (a 1M-transition dataset: about 4 min)
MIXTURE_NAMESPACE = "crossdomain/mix"  # the papers' physics; crossdomain-v5/mix in v5 physics
HETEROGENEOUS_TASKS = ("halfcheetah", "hopper")
HETEROGENEOUS_TARGET_QUALITIES = ("medium", "expert")


def heterogeneous_mixtures(task: str) -> dict[str, list[tuple[str, str, int]]]:
    """V2A's heterogeneous sources of one task: whole trajectories of its two paper shifts (kinematic and morph),
    collected by behaviour policies of different qualities, ~1M transitions. The three sources x the target
    qualities HETEROGENEOUS_TARGET_QUALITIES (the target: the original domain, as in DVDF) are the task's six
    source-target combinations; <task>-kinematic-morph-random (uniform actions in both domains: only the dynamics
    tell the trajectories apart) is the probe of the trajectory encoder."""
    kinematic, morph = f"{task}-kinematic", f"{task}-morph"
    return {
        f"{task}-kinematic-morph-medium-expert": [(kinematic, "medium", 500_000), (morph, "expert", 500_000)],
        f"{task}-kinematic-morph-expert-medium": [(kinematic, "expert", 500_000), (morph, "medium", 500_000)],
        f"{task}-kinematic-morph-mixed": [(domain, quality, 170_000) for domain in (kinematic, morph)
                                          for quality in ("random", "medium", "expert")],
        f"{task}-kinematic-morph-random": [(kinematic, "random", 500_000), (morph, "random", 500_000)],
    }


MIXTURES: dict[str, list[tuple[str, str, int]]] = {  # name -> (domain, quality, transitions) components
    # DVDF's motivating example: random and expert data of the shifted domain; the expert half is the data worth
    # keeping, the random half is as dynamics-aligned but of little value
    "halfcheetah-kinematic-random-expert": [("halfcheetah-kinematic", "random", 500_000),
                                            ("halfcheetah-kinematic", "expert", 500_000)],
    "hopper-kinematic-random-expert": [("hopper-kinematic", "random", 500_000), ("hopper-kinematic", "expert", 500_000)],
    **{name: components for task in HETEROGENEOUS_TASKS for name, components in heterogeneous_mixtures(task).items()},
}


# ----------------------------------------------------------------------------------------------------------
# Policies: the SAC actor snapshot format (w0, b0, w1, b1, w2, b2; output [mean, log_std]), run in numpy.
# ----------------------------------------------------------------------------------------------------------
class Policy:
    def __init__(self, path: Path | None, act_dim: int):
        self.name = "uniform-random" if path is None else (
            str(path.relative_to(POLICY_DIR)) if path.is_relative_to(POLICY_DIR) else str(path))
        self.act_dim = act_dim
        self.layers = None
        if path is not None:
            with np.load(path) as arrays:
                self.layers = [(arrays[f"w{i}"].astype(np.float64), arrays[f"b{i}"].astype(np.float64))
                               for i in range(3)]

    def __call__(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False) -> np.ndarray:
        """The action for one observation [obs_dim], or actions [B, act_dim] for a batch [B, obs_dim] (one draw
        per row; a single observation draws what it always drew)."""
        if self.layers is None:
            return rng.uniform(-1.0, 1.0, obs.shape[:-1] + (self.act_dim,))
        h = obs
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        out = h @ self.layers[-1][0] + self.layers[-1][1]
        mean, log_std = out[..., : self.act_dim], np.clip(out[..., self.act_dim:], -5.0, 2.0)
        noise = 0.0 if deterministic else np.exp(log_std) * rng.standard_normal(mean.shape)
        return np.tanh(mean + noise)


def zoo_path(domain: str, name: str) -> Path:
    return POLICY_DIR / domain / f"{name}.npz"


def replay_snapshots(domain: str) -> list[tuple[int, Path]]:
    """(step, path) of the snapshots kept for medium-replay, in training order."""
    paths = sorted((POLICY_DIR / domain / "replay").glob("actor_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    return [(int(p.stem.split("_")[1]), p) for p in paths]


def _require_policy(domain: str, name: str) -> Path:
    path = zoo_path(domain, name)
    if not path.exists():
        raise SystemExit(f"No {name} policy for {domain} in the zoo ({path}); train one with "
                         f"`python algos/sac.py --env {domain}` and add it with `python benchmarks/policy_zoo.py`.")
    return path


# ----------------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------------
def rollout(domain: str, policy: Policy, num_transitions: int, rng: np.random.Generator, first_seed: int,
            quality: str, progress=None, physics: str = DEFAULT_PHYSICS) -> list[dict]:
    """Play episodes until `num_transitions` transitions; the last episode is cut (a truncation, not an end)."""
    env = make_env(domain, physics)
    model_data = env.unwrapped.data
    episodes, collected, episode_seed = [], 0, first_seed
    while collected < num_transitions:
        obs, _ = env.reset(seed=episode_seed)
        episode_seed += 1
        observations, qpos, qvel = [obs], [model_data.qpos.copy()], [model_data.qvel.copy()]
        actions, rewards, terminations, truncations = [], [], [], []
        while True:
            action = policy(obs, rng)
            obs, reward, terminated, truncated, _ = env.step(action)
            collected += 1
            truncated = truncated or collected == num_transitions
            observations.append(obs), qpos.append(model_data.qpos.copy()), qvel.append(model_data.qvel.copy())
            actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated and not terminated)
            if progress is not None:
                progress.update(1)
            if terminated or truncated:
                break
        episodes.append(dict(
            observations=np.asarray(observations), actions=np.asarray(actions, dtype=np.float32),
            rewards=np.asarray(rewards), terminations=np.asarray(terminations),
            truncations=np.asarray(truncations),
            infos={"qpos": np.asarray(qpos), "qvel": np.asarray(qvel)},
            metadata={"domain": domain, "quality": quality, "policy": policy.name}))
    env.close()
    return episodes


def policy_return(domain: str, policy: Policy, episodes: int = 10, seed: int = 10_000,
                  physics: str = DEFAULT_PHYSICS) -> tuple[float, float]:
    """Mean and std of the return of a policy over `episodes` episodes, actions as in the datasets (sampled)."""
    rng = np.random.default_rng(seed)
    env = make_env(domain, physics)
    returns = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs, rng))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), float(np.std(returns))


def reference_returns(domain: str) -> tuple[float, float]:
    """The domain's (random, expert) returns: from envs/references.json, written by benchmarks/policy_zoo.py."""
    table = json.loads(REFERENCES.read_text()) if REFERENCES.exists() else {}
    if domain in table:
        return float(table[domain]["random"]), float(table[domain]["expert"])
    raise SystemExit(f"No reference returns for {domain} in {REFERENCES}; run "
                     f"`python benchmarks/policy_zoo.py --domains {domain}` once its expert policy is in the zoo.")


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
def default_size(domain: str, quality: str) -> int:
    if quality == "medium-expert":
        return 2 * DEFAULT_SIZE
    if quality == "medium-replay":
        medium = np.load(_require_policy(domain, "medium"))
        return int(medium["step"])
    return DEFAULT_SIZE


def plan(domain: str, quality: str, size: int) -> list[tuple[Policy, int, str]]:
    """The (policy, number of transitions, quality label) pieces a dataset is made of, in order."""
    act_dim = domain_info(domain).act_dim
    if quality == "random":
        return [(Policy(None, act_dim), size, "random")]
    if quality in ("medium", "expert"):
        return [(Policy(_require_policy(domain, quality), act_dim), size, quality)]
    if quality == "medium-expert":
        return [(Policy(_require_policy(domain, "medium"), act_dim), size // 2, "medium"),
                (Policy(_require_policy(domain, "expert"), act_dim), size - size // 2, "expert")]
    # medium-replay: SAC's data up to the medium policy's step, snapshot by snapshot, scaled to `size`
    medium_step = int(np.load(_require_policy(domain, "medium"))["step"])
    snapshots = [(s, p) for s, p in replay_snapshots(domain) if s < medium_step]
    if not snapshots:
        raise SystemExit(f"No replay snapshots for {domain} in {POLICY_DIR / domain / 'replay'}.")
    steps = [s for s, _ in snapshots]
    segments = ([(0, steps[0], None)] if steps[0] > 0 else [])  # before the first snapshot: uniform random
    segments += [(start, end, path) for (start, path), end in zip(snapshots, steps[1:] + [medium_step])]
    pieces, given = [], 0
    for start, end, path in segments:
        count = round(end / medium_step * size) - given
        given += count
        if count > 0:
            pieces.append((Policy(path, act_dim), count, "medium-replay"))
    return pieces


def mixture_id(name: str, physics: str = DEFAULT_PHYSICS) -> str:
    return f"{generated_namespace(physics)}/mix/{name}-v0"


def parse_mixture_id(dataset_id: str) -> tuple[str, str] | None:
    """(name, physics) of a mixture id of either physics, None for any other id."""
    for physics in PHYSICS:
        prefix = f"{generated_namespace(physics)}/mix/"
        if dataset_id.startswith(prefix) and dataset_id.endswith("-v0"):
            return dataset_id[len(prefix):-3], physics
    return None


def check_mixture(name: str) -> list[tuple[str, str, int]]:
    if name not in MIXTURES:
        raise SystemExit(f"Unknown mixture '{name}': choose one of {', '.join(sorted(MIXTURES))}.")
    return MIXTURES[name]


def mixture_plan(components) -> list[tuple[str, Policy, int, str]]:
    """The (domain, policy, transitions, quality label) pieces of a list of (domain, quality, size) components."""
    return [(domain, *piece) for domain, quality, size in components for piece in plan(domain, quality, size)]


def zoo_fingerprint(pieces, references: tuple[float, float], physics: str = DEFAULT_PHYSICS) -> str:
    """Hash of the policies a dataset is made from, of its reference returns and of its physics: a cached dataset
    of an older zoo (or of the generator before it knew two physics) is made again."""
    digest = hashlib.sha256(repr(references).encode() + f"physics={physics}".encode())
    for *domain, policy, count, label in pieces:  # (domain,) policy, count, label: mixtures name the domain
        digest.update(f"{''.join(domain)}{policy.name}:{count}:{label}".encode())
        for w, b in policy.layers or []:
            digest.update(w.tobytes()), digest.update(b.tobytes())
    return digest.hexdigest()[:16]


def check_dataset_id(dataset_id: str) -> None:
    """One sentence unless `dataset_id` is an id Minari can store: (namespace/)name-v<version>, the namespace of
    letters, digits, - and _ (and / between its parts)."""
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import NAMESPACE_REGEX

    try:
        namespace = parse_dataset_id(dataset_id)[0]
        valid = namespace is None or NAMESPACE_REGEX.fullmatch(namespace) is not None
    except ValueError:
        valid = False
    if not valid:
        raise SystemExit(f"--id {dataset_id!r} is not a Minari dataset id: give (namespace/)name-v<version> of "
                         f"letters, digits, - and _, such as crossdomain/hopper/medium-mine-v0.")


def generate(domain: str, quality: str, size: int | None = None, seed: int = 0, dataset_id: str | None = None,
             force: bool = False, physics: str = DEFAULT_PHYSICS):
    """Make the dataset and store it in the local Minari store; returns the Minari dataset."""
    check_domain(domain)
    check_physics(physics)
    if quality not in QUALITIES:
        raise SystemExit(f"Unknown quality '{quality}': choose one of {', '.join(QUALITIES)}.")
    usual = default_size(domain, quality)
    size = usual if size is None else size
    if size < 1:
        raise SystemExit(f"--size must be a positive number of transitions, got {size}.")
    dataset_id = dataset_id or generated_dataset_id(domain, quality, physics)
    check_dataset_id(dataset_id)  # before any rollout, not when the finished episodes are stored
    pieces = [(domain, *piece) for piece in plan(domain, quality, size)]
    description = (f"{quality} data of domain {domain} (envs.make_env('{domain}', '{physics}'); the stored env spec "
                   f"is the unshifted v5 task), {physics} physics, seed {seed}; infos hold qpos/qvel for "
                   f"re-simulation.")
    fingerprint = zoo_fingerprint([piece[1:] for piece in pieces], reference_returns(domain), physics)
    return _store(dataset_id, pieces, fingerprint, seed, force, {"domain": domain, "quality": quality}, description,
                  physics, usual)


def generate_mixture(name: str, seed: int = 0, force: bool = False, physics: str = DEFAULT_PHYSICS):
    """Make the named mixture (MIXTURES) and store it as crossdomain/mix/<name>-v0 (crossdomain-v5/mix/... in v5
    physics); returns the Minari dataset."""
    components = check_mixture(name)
    pieces = mixture_plan(components)
    first = components[0][0]
    parts = ", ".join(f"{size:,} {quality} of {domain}" for domain, quality, size in components)
    description = (f"mixture {name}: whole trajectories, {parts}; {physics} physics, seed {seed}; episode_metadata "
                   f"names each episode's domain and quality; the reference scores are those of {first}.")
    return _store(mixture_id(name, physics), pieces, zoo_fingerprint(pieces, reference_returns(first), physics), seed,
                  force, {"mixture": json.dumps(components)}, description, physics,
                  sum(size for _, _, size in components))


def made_by_hand(existing, usual_size: int) -> bool:
    """Whether a stored dataset was asked for with another seed or size than the generator's own (seed 0, the
    default size): a user's, never replaced without --force; the generator's own are a cache it remakes when the
    zoo changes."""
    return existing.storage.metadata.get("seed", 0) != 0 or existing.total_steps != usual_size


def _store(dataset_id: str, pieces, fingerprint: str, seed: int, force: bool, metadata: dict, description: str,
           physics: str = DEFAULT_PHYSICS, usual_size: int | None = None):
    """Roll out the (domain, policy, transitions, label) pieces in order and store them under dataset_id, unless
    a dataset of that id, fingerprint, seed and size is there already. A different dataset of that id is replaced
    only with `force`, or when it is the generator's own of an older zoo; it is deleted only once the new episodes
    are rolled out, so an interrupted generation leaves it in place."""
    import minari
    from minari.data_collector import EpisodeBuffer

    size = sum(count for _, _, count, _ in pieces)
    replacing = None
    if dataset_id in minari.list_local_datasets():
        existing = minari.load_dataset(dataset_id)
        same = (existing.storage.metadata.get("zoo_fingerprint") == fingerprint
                and existing.storage.metadata.get("seed") == seed and existing.total_steps == size)
        if same and not force:
            return existing
        if not force and made_by_hand(existing, size if usual_size is None else usual_size):
            raise SystemExit(f"{dataset_id} already holds a dataset of {existing.total_steps:,} transitions (seed "
                             f"{existing.storage.metadata.get('seed')}) made with other settings; it is kept: pass "
                             f"--force to replace it, or --id to store this one under another id.")
        replacing = "--force given." if same else "it was made from other policies, another seed or size."
    first_domain = pieces[0][0]
    ref_min, ref_max = reference_returns(first_domain)
    rng = np.random.default_rng(seed)
    episodes = []
    with tqdm(total=size, desc=f"{dataset_id}", unit="transition", unit_scale=True, file=sys.stdout) as bar:
        for domain, policy, count, label in pieces:
            episodes += rollout(domain, policy, count, rng, seed * 1_000_000 + len(episodes), label, bar, physics)
    if replacing is not None:  # only now: the new episodes are complete
        print(f"Replacing {dataset_id}: {replacing}", flush=True)
        minari.delete_dataset(dataset_id)
    buffers = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                             terminations=e["terminations"], truncations=e["truncations"], infos=e["infos"])
               for i, e in enumerate(episodes)]
    task_env = make_env(first_domain, physics)
    dataset = minari.create_dataset_from_buffers(
        dataset_id, buffers, env=task_env, eval_env=task_env.spec, algorithm_name="SAC behaviour policies (algos/sac.py)",
        description=description, ref_min_score=ref_min, ref_max_score=ref_max, code_permalink="envs/generate.py",
        author="crossdomain", author_email="none")
    dataset.storage.update_metadata({
        "episode_metadata": json.dumps([e["metadata"] for e in episodes]), **metadata, "seed": seed,
        "zoo_fingerprint": fingerprint, "physics": physics})
    return dataset


def ensure_dataset(domain: str, quality: str, physics: str = DEFAULT_PHYSICS) -> None:
    """Hook called by envs.load_dataset: make the generated dataset if it is missing or was made from another
    version of the zoo (its fingerprint differs); a dataset this zoo cannot remake is left as it is."""
    import minari

    dataset_id = generated_dataset_id(domain, quality, physics)
    exists = dataset_id in minari.list_local_datasets()
    try:
        size = default_size(domain, quality)
        fingerprint = zoo_fingerprint(plan(domain, quality, size), reference_returns(domain), physics)
    except SystemExit:
        if exists:
            return
        raise
    if exists:
        existing = minari.load_dataset(dataset_id)
        if existing.storage.metadata.get("zoo_fingerprint") == fingerprint:
            return
        if made_by_hand(existing, size):
            raise SystemExit(f"{dataset_id} in the local Minari store holds {existing.total_steps:,} transitions of "
                             f"seed {existing.storage.metadata.get('seed')}, not the {size:,} of seed 0 that a script "
                             f"asking for {domain} {quality} trains on; it is kept. Name it to train on it "
                             f"(--source-dataset / --target-dataset {dataset_id}), or replace it with: python -m "
                             f"envs.generate --domain {domain} --quality {quality} --force")
    _announce(dataset_id, size)
    start = time.time()
    generate(domain, quality, physics=physics)
    print(f"Generated in {time.time() - start:.0f} s.", flush=True)


def ensure_mixture(name: str, physics: str = DEFAULT_PHYSICS) -> None:
    """Hook called by envs.load_dataset for crossdomain/mix/<name>-v0 (or crossdomain-v5/mix/...): make the named
    mixture if it is missing or was made from another version of the zoo."""
    import minari

    components = check_mixture(name)
    dataset_id = mixture_id(name, physics)
    fingerprint = zoo_fingerprint(mixture_plan(components), reference_returns(components[0][0]), physics)
    if (dataset_id in minari.list_local_datasets()
            and minari.load_dataset(dataset_id).storage.metadata.get("zoo_fingerprint") == fingerprint):
        return
    _announce(dataset_id, sum(size for _, _, size in components))
    start = time.time()
    generate_mixture(name, physics=physics)
    print(f"Generated in {time.time() - start:.0f} s.", flush=True)


def _announce(dataset_id: str, size: int) -> None:
    print(f"Generating {dataset_id} ({size:,} transitions) from the policy zoo; about "
          f"{size / GENERATION_RATE / 60:.0f} min on one CPU core, cached afterwards.", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain")
    parser.add_argument("--quality", choices=QUALITIES)
    parser.add_argument("--mixture", choices=sorted(MIXTURES), help="make a named mixture instead (MIXTURES)")
    parser.add_argument("--size", type=int, default=None, help="transitions (default: 1M; 2M medium-expert; "
                                                               "SAC's steps to medium for medium-replay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id", default=None, help="Minari id to store under (default crossdomain/<domain>/<quality>-v0)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset of that id")
    parser.add_argument("--physics", choices=PHYSICS, default=DEFAULT_PHYSICS,
                        help="papers (the simulator of the papers and D4RL, default) or v5 (Gymnasium's v5)")
    args = parser.parse_args(argv)
    if args.mixture:
        dataset = generate_mixture(args.mixture, args.seed, args.force, args.physics)
    elif args.domain and args.quality:
        dataset = generate(args.domain, args.quality, args.size, args.seed, args.id, args.force, args.physics)
    else:
        parser.error("give --domain and --quality, or --mixture")
    print(f"{dataset.spec.dataset_id}: {dataset.total_steps:,} transitions, {dataset.total_episodes} episodes")


if __name__ == "__main__":
    main()
