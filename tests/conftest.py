"""Shared by every test: JAX's persistent compilation cache, in a folder outside the repository, so that the many
tiny end-to-end runs that compile the same programs (the same networks, batch sizes and chunk lengths) compile each
once per machine, not once per test; subprocesses that tests start (the two-device run) inherit it through the
environment. The cache is keyed by the program, the jax version and the flags: a stale entry is never used."""
import os
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("CROSSDOMAIN_TEST_JAX_CACHE", Path(tempfile.gettempdir()) / "crossdomain-jax-test-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above, which jax reads at import)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
