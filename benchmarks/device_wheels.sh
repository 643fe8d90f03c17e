#!/usr/bin/env bash
# The wheels a GPU machine without network lacks, for benchmarks/device_check.sh to install there offline: the
# versions requirements.txt pins of the packages its image does not hold, plus what those need that the image does
# not hold either, for CPython 3.12 on manylinux x86-64, into .whl/ (git-ignored). Run it where PyPI is reachable:
#     bash benchmarks/device_wheels.sh
# The image (the device tool's KINDS.md, kind nvidia-h200) has jax 0.11 with CUDA 13, numpy, h5py, pytest and most
# of what flax needs; flax, optax, chex and tqdm are in it too and travel only as fallbacks, installed where absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PROJECT="gymnasium mujoco minari tyro ott-jax flax optax chex tqdm"  # at the versions requirements.txt pins
# what those need beyond the image, at the versions the test suite runs with
NEEDS="farama-notifications==0.0.6 glfw==2.11.0 pyopengl==3.1.10 websockets==17.4 jaxopt==0.8.5
       docstring-parser==0.18.0 typeguard==4.6.1"
pins=$(for name in $PROJECT; do grep -E "^$name(\[[^]]*\])?==" requirements.txt | sed -E 's/\[[^]]*\]//'; done)
platforms=$(for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
            echo --platform ${tag}_x86_64; done)
rm -rf .whl && mkdir .whl  # one version of each: two of one package stop the whole install there
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $pins $NEEDS
"$PYTHON" - .whl/*.whl <<'EOF'
"""List the wheels, their total size with the working tree that travels, and the needs left to the image."""
import re, subprocess, sys, zipfile
from pathlib import Path
wheels = [Path(p) for p in sys.argv[1:]]
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
carried = {norm(w.name.split("-")[0]) for w in wheels}
needs = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line and "python_version <" not in line:
            needs.add(norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    print(f"{w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
tree = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True).stdout
tree_bytes = sum(Path(p).stat().st_size for p in tree.decode().split("\0") if p and Path(p).is_file())
total = sum(w.stat().st_size for w in wheels)
print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; with the working tree ({tree_bytes / 2**20:.1f} MiB) "
      f"{(total + tree_bytes) / 2**20:.1f} MiB of the device tool's 64 MiB")
print("needed, left to the image:", " ".join(sorted(needs - carried)))
if total + tree_bytes > 60 * 2**20:
    sys.exit("too large to travel: drop a fallback wheel (flax, optax, chex, tqdm) or files from the tree")
EOF
