"""Shared by every test: the CPU platform, JAX's persistent compilation cache in a folder outside the repository, and
the `zoo` fixture (a temporary Minari store and zoo of small random actors, for the generator's tests).

The tests run on the CPU also where a GPU is visible: several compare a one-device run with a CPU run at rtol 1e-4,
and a GPU's float32 matmuls (TF32) differ by more; JAX_PLATFORMS=cpu is only a default, so that
`JAX_PLATFORMS=cuda python -m pytest ...` (benchmarks/device_check.py's test subset) runs them on the GPU. The cache:
the many tiny end-to-end runs that compile the same programs (the same networks, batch sizes and chunk lengths)
compile each once per machine, not once per test; subprocesses that tests start (the two-device run) inherit both
through the environment. The cache is keyed by the program, the jax version and the flags: a stale entry is never
used. Everything here is set through environment variables, which every jax version reads when it is imported; the
config updates after the import only matter where a pytest plugin imported jax first."""
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = Path(os.environ.get("CROSSDOMAIN_TEST_JAX_CACHE", Path(tempfile.gettempdir()) / "crossdomain-jax-test-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above, which jax reads at import)
import pytest  # noqa: E402

for name, value in (("jax_platforms", os.environ["JAX_PLATFORMS"] or None),
                    ("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]),
                    ("jax_persistent_cache_min_compile_time_secs", 0.0),
                    ("jax_persistent_cache_min_entry_size_bytes", 0)):
    try:
        jax.config.update(name, value)
    except (AttributeError, KeyError, ValueError):  # an option a later jax renamed: its environment variable stays
        pass


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A Minari store and a zoo of small random actors for hopper-kinematic (medium, expert, two replay
    snapshots) in tmp_path, in place of the project's own."""
    import envs.generate as generate
    from envs import domain_info
    from synthetic import fake_actor

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setattr(generate, "POLICY_DIR", tmp_path / "policies")
    refs = tmp_path / "references.json"
    refs.write_text(json.dumps({"hopper-kinematic": {"random": -5.0, "expert": 3000.0}}))
    monkeypatch.setattr(generate, "REFERENCES", refs)
    info = domain_info("hopper-kinematic")
    root = tmp_path / "policies" / "hopper-kinematic"
    fake_actor(root / "medium.npz", info.obs_dim, info.act_dim, 1, 3000)
    fake_actor(root / "expert.npz", info.obs_dim, info.act_dim, 2, 9000)
    for step in (1000, 2000):
        fake_actor(root / "replay" / f"actor_{step}.npz", info.obs_dim, info.act_dim, step, step)
    return root
