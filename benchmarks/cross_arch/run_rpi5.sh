#!/usr/bin/env bash
# Real cross-architecture check: a Raspberry Pi bundle of SmolLM2-135M, 16 greedy tokens on
# x86-64 (this machine's onnxruntime) and on aarch64 (onnxruntime's aarch64 wheel run by
# qemu-user emulating the Pi's core: Cortex-A76 for rpi5, Cortex-A72 for rpi4).
#
#   benchmarks/cross_arch/setup_arm64.sh                      # once: the arm64 Python environment
#   benchmarks/cross_arch/run_rpi5.sh [BUNDLE]                # rpi5; exports to /tmp/edgekit-cross-arch/rpi5
#   TARGET=rpi4 QEMU_CPU_MODEL=cortex-a72 benchmarks/cross_arch/run_rpi5.sh
#
# Besides the greedy tokens, both machines score the same token sequence (the prompt and
# the x86 continuation) in one pass, so their logits compare position by position: greedy
# tokens can part ways at a near tie even when the arithmetic agrees closely.
# Writes result-$TARGET.json beside this script (recorded in README.md). Same tokens: exit 0.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${EDGEKIT_ARM64_ROOT:-$HOME/.cache/edgekit/arm64}
TARGET=${TARGET:-rpi5}
CPU=${QEMU_CPU_MODEL:-cortex-a76}
BUNDLE=${1:-/tmp/edgekit-cross-arch/$TARGET}
TOKENS=${TOKENS:-16}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

[ -e "$ROOT/usr/bin/python3" ] || { echo "no arm64 environment at $ROOT: run $HERE/setup_arm64.sh" >&2; exit 1; }
if [ ! -e "$BUNDLE/edgekit.json" ]; then
    (cd "$REPO" && python3 -m edgekit export smollm2-135m --target "$TARGET" --out "$BUNDLE")
fi

echo "x86-64 (native):" >&2
X86=$(cd "$REPO" && python3 "$HERE/greedy.py" "$BUNDLE" --tokens "$TOKENS")
echo "$X86" >&2
TEACHER=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["tokens"])' "$X86")
(cd "$REPO" && python3 "$HERE/greedy.py" "$BUNDLE" --tokens 1 --teacher "$TEACHER" --save-logits "$WORK/x86.npy" >/dev/null)

echo "aarch64 (qemu-user, -cpu $CPU):" >&2
# Only the device side is on the path: the arm64 site-packages (onnxruntime, numpy, tokenizers)
# and the repository's edgekit package, whose device side imports nothing else.
ARM=$(cd "$REPO" && PYTHONPATH="$ROOT/opt/edgekit-site:$REPO" \
      qemu-aarch64-static -cpu "$CPU" -L "$ROOT" "$ROOT/usr/bin/python3" "$HERE/greedy.py" "$BUNDLE" \
      --tokens "$TOKENS" --teacher "$TEACHER" --save-logits "$WORK/arm.npy" 2> >(grep -v "cpuid_info warning" >&2))
echo "$ARM" >&2

python3 - "$X86" "$ARM" "$HERE/result-$TARGET.json" "$CPU" "$(qemu-aarch64-static --version | head -1)" "$WORK" <<'PY'
import json, sys
import numpy as np
x86, arm = json.loads(sys.argv[1]), json.loads(sys.argv[2])
lx, la = np.load(f"{sys.argv[6]}/x86.npy"), np.load(f"{sys.argv[6]}/arm.npy")
same = x86["tokens"] == arm["tokens"]
first_diff = next((i for i, (a, b) in enumerate(zip(x86["tokens"], arm["tokens"])) if a != b), None)
top2 = np.sort(lx, axis=-1)[:, -2:]
result = {
    "same_tokens": same, "first_difference": first_diff, "qemu_cpu": sys.argv[4], "qemu": sys.argv[5],
    "teacher_forced": {  # both machines score prompt + the x86 continuation
        "positions": int(lx.shape[0]),
        "max_abs_logit_diff": float(np.abs(lx - la).max()),
        "mean_abs_logit_diff": float(np.abs(lx - la).mean()),
        "argmax_agree": int((lx.argmax(-1) == la.argmax(-1)).sum()),
        "x86_top2_margin_at_first_difference": None if first_diff is None else float(top2[first_diff, 1] - top2[first_diff, 0]),
    },
    "x86_64": x86, "aarch64": arm,
}
open(sys.argv[3], "w").write(json.dumps(result, indent=2) + "\n")
print(f"x86-64 : {x86['tokens']}\naarch64: {arm['tokens']}")
print(f"teacher-forced logits: max |diff| {result['teacher_forced']['max_abs_logit_diff']:.4g}, "
      f"argmax agrees at {result['teacher_forced']['argmax_agree']}/{lx.shape[0]} positions")
print("SAME TOKENS" if same else f"DIFFERENT from token {first_diff}")
sys.exit(0 if same else 1)
PY
