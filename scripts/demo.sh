#!/usr/bin/env bash
# Fresh machine -> set up, export the shipped SmolLM2-135M-Instruct, generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
edgekit export smollm2-135m --out bundles/smollm2
edgekit generate bundles/smollm2 "A Raspberry Pi is a small computer that" --max-new-tokens 48 --stats
edgekit generate bundles/smollm2 --chat "Give me three safety rules for a robot arm." --max-new-tokens 96 --stats
