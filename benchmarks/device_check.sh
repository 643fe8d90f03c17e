#!/usr/bin/env bash
# The check of a GPU lease in one command (README, "GPUs"): installs from .whl/ (made by benchmarks/device_wheels.sh
# where PyPI is reachable) the packages this Python lacks, into $DEVICE_CHECK_SITE (/tmp/site), then runs
# benchmarks/device_check.py, whose flags it passes on, within its budget (7.5 minutes from here) and, as a last
# resort, stopped at $DEVICE_CHECK_TIMEOUT seconds (500). Where OUT is set, its output is also in $OUT/device_check.log.
#     bash benchmarks/device_check.sh              # on the GPU machine: device tool, carry [".whl"], timeout_s 540
#     bash benchmarks/device_check.sh --small      # tiny sizes (the default on a CPU)
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export DEVICE_CHECK_START=${DEVICE_CHECK_START:-$(date +%s)} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
if compgen -G ".whl/*.whl" > /dev/null; then
    # the wheels of packages this Python does not have and that it can install (.whl/ holds CPython 3.12's)
    missing=$("$PYTHON" - .whl/*.whl <<'EOF'
import sys
from importlib import metadata
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    supported = set(sys_tags())
except ImportError:
    supported = None
for wheel in sys.argv[1:]:
    name = wheel.rsplit("/", 1)[-1].split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        if supported is None or supported & set(parse_wheel_filename(wheel.rsplit("/", 1)[-1])[3]):
            print(wheel)
EOF
)
    if [ -n "$missing" ]; then
        echo "installing into $SITE:" $(for w in $missing; do basename "$w" | cut -d- -f1,2; done)
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            $missing || exit 1
        case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    fi
fi
log=/dev/null
if [ -n "$OUT" ]; then mkdir -p "$OUT" && log="$OUT/device_check.log"; fi
timeout -k 10 "${DEVICE_CHECK_TIMEOUT:-500}" "$PYTHON" benchmarks/device_check.py "$@" 2>&1 | tee "$log"
