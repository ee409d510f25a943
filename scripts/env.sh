# Sourced by setup.sh, demo.sh and test.sh: choose the Python that edgekit is installed into.
#
#   $PYTHON set            ──► that interpreter (you manage its environment)
#   a virtualenv is active ──► its python
#   otherwise              ──► ./.venv, made here on first use (Debian's system Python refuses
#                              pip installs, PEP 668), and put first on PATH so `edgekit` is found
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    if [ ! -x .venv/bin/python ]; then
        if ! python3 -m venv .venv >/dev/null 2>&1; then
            # Debian ships venv's pip bootstrap separately
            rm -rf .venv
            if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv .venv
        fi
    fi
    PY="$PWD/.venv/bin/python"
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
fi
