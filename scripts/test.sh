#!/usr/bin/env bash
# Fresh machine -> set up and run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    # the MQTT tests start a real Mosquitto broker
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
bash scripts/setup.sh
. scripts/env.sh
"$PY" -m ruff check .     # lint: pyflakes, pycodestyle, isort, pyupgrade, bugbear (pyproject)
"$PY" -m mypy            # types of edgekit/ (pyproject [tool.mypy])
# two worker processes, a test file each at a time (pytest-xdist): 14 minutes on CI's 2 cores where
# one process took 21 (it kept one core busy on average). `-n 0` after this runs them in one process.
"$PY" -m pytest -q -ra -n 2 --dist loadfile "$@"
