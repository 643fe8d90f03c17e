"""What the algorithm tests share: small synthetic datasets (HalfCheetah's shapes unless told otherwise) and the
check that a bad flag ends in one sentence."""
from pathlib import Path

import h5py
import numpy as np
import pytest


def write_d4rl(path: Path, rng, n: int, episode_length: int, ref=None, obs_dim: int = 17, act_dim: int = 6) -> str:
    """A D4RL-format HDF5 file of n random transitions in episodes of `episode_length` ended by time limits."""
    observations = rng.normal(size=(n, obs_dim)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file["observations"] = observations
        file["actions"] = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
        file["rewards"] = rng.normal(size=n).astype(np.float32)
        file["next_observations"] = observations + 0.1 * rng.normal(size=(n, obs_dim)).astype(np.float32)
        file["terminals"] = np.zeros(n, dtype=bool)
        file["timeouts"] = (np.arange(n) % episode_length == episode_length - 1)
        if ref is not None:
            file.attrs["ref_min_score"], file.attrs["ref_max_score"] = ref
    return str(path)


def assert_one_sentence_exit(main, argv: list[str], message: str) -> None:
    """main(argv) ends with SystemExit whose text starts with `message` and is one line ending in . or ?"""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value)
    assert text.startswith(message) and text.endswith((".", "?")) and "\n" not in text


def fake_actor(path, obs_dim, act_dim, seed, step):
    """A small random SAC actor snapshot (the zoo's npz format) at `path`."""
    rng = np.random.default_rng(seed)
    sizes = [(obs_dim, 32), (32, 32), (32, 2 * act_dim)]
    arrays = {f"w{i}": rng.normal(scale=0.3, size=s).astype(np.float32) for i, s in enumerate(sizes)}
    arrays.update({f"b{i}": np.zeros(s[1], np.float32) for i, s in enumerate(sizes)})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, step=step, **arrays)
