"""edgekit's memory estimate (edgekit check, export's fit) against the measured peak, per bundle.

    python benchmarks/memory_estimate.py bundles/fp32 bundles/int4 --prompt-tokens 64 2000

Each bundle runs in a fresh process (tests/test_targets.py's RSS_SCRIPT: load, prefill a prompt of
random tokens, 4 decode steps, VmHWM). Also prints the weight overhead that would make the estimate
match, the figure check.WEIGHT_OVERHEAD is fitted to (docs/targets.md, "Memory check").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_targets import RSS_SCRIPT  # noqa: E402

from edgekit.device import check  # noqa: E402
from edgekit.device.bundle import read_manifest  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 2000])
    args = ap.parse_args()
    try:  # every bundle's manifest before any measuring: a wrong path is one line, not a half table
        manifests = {bundle: read_manifest(bundle, verify=False) for bundle in args.bundles}
    except EdgekitError as e:
        raise SystemExit(f"memory_estimate: {e}") from None
    for bundle, m in manifests.items():
        room = m.architecture.context_length - 4  # the prompt, then RSS_SCRIPT's 4 decode steps
        if not all(1 <= p <= room for p in args.prompt_tokens):
            raise SystemExit(f"memory_estimate: --prompt-tokens must be from 1 to {room} for {bundle} "
                             f"(context length {m.architecture.context_length}, then 4 decode steps)")
    print("| bundle | prompt | estimate MB | measured MB | error | overhead that fits |")
    print("|---|---:|---:|---:|---:|---:|")
    for bundle, m in manifests.items():
        q = m.quantization
        level = q.accuracy_level if q.accuracy_level is not None else 4
        weights = check.bundle_weight_bytes(bundle)
        for prompt in args.prompt_tokens:
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, bundle, str(prompt)], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            measured = float(out.stdout.split()[-1])
            est = check.estimate_memory(m.architecture, weights, m.graph.flavour, prompt_tokens=prompt,
                                        quantized=q.method != "none", accuracy_level=level)
            fits = (measured - (est.total_mb - est.weight_overhead_mb)) / est.weights_mb
            print(f"| {bundle} ({m.graph.flavour}, {q.label}) | {prompt} | {est.total_mb:.0f} | {measured:.0f} | "
                  f"{(est.total_mb - measured) / measured:+.1%} | {fits:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
