#!/usr/bin/env bash
# The bundle the arm's controller uses: SmolLM2-135M-Instruct taught the arm's commands (LoRA),
# merged into the weights and quantized to int4 for a Raspberry Pi 5.
#
#   firmware_examples/robot_arm/build_bundle.sh OUT_DIR [EXPORT_OPTION...]
#
# EXPORT_OPTIONs go to edgekit export as they are (for example --calib my_commands.txt, --quant rtn).
#
# [make_dataset.py ──► train.jsonl ──► edgekit finetune ──► adapter/]   only when adapter/ is missing
#  edgekit export smollm2-135m --adapter adapter/ --target rpi5 ──► OUT_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build_bundle.sh OUT_DIR [EXPORT_OPTION...]}
shift
edgekit=${EDGEKIT:-edgekit}
python=${PYTHON:-python3}

if [ ! -f "$here/adapter/adapter_config.json" ]; then
    data=$(mktemp -d)
    trap 'rm -rf "$data"' EXIT
    (cd "$here" && "$python" make_dataset.py "$data")
    # 100 steps of 8 examples: minutes on a laptop's CPU (the shipped adapter/ is what this made)
    "$edgekit" finetune smollm2-135m --data "$data/train.jsonl" --out "$here/adapter" \
        --steps 100 --batch-size 8 --lr 2e-3 --seed 0
fi
"$edgekit" export smollm2-135m --adapter "$here/adapter" --target rpi5 --out "$out" "$@"
