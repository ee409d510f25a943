"""One bundle under two checkouts of edgekit: peak memory, TTFT and decode speed, side by side.

    git worktree add /tmp/before <commit>                       # the code before a change
    python benchmarks/before_after.py bundles/int4 /tmp/before . --prompt-tokens 131 --processes 4

Each process loads the bundle with one checkout's runtime, runs a prompt (token ids, no chat
template) and `--new-tokens` greedy steps `--runs` times after a warm-up, and reports the medians
and its peak resident memory (VmHWM, which only a fresh process can give). The checkouts take
turns, process by process, so that a busy minute on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from edgekit.device import Model, sysinfo

bundle, prompt_tokens, new, runs, threads = sys.argv[2], *map(int, sys.argv[3:7])
model = Model(bundle, threads=threads)
text = "A field robot reports its battery, position and the state of each joint. " * 200
ids = model.encode(text)[:prompt_tokens]
ttft, decode = [], []
for run in range(runs + 1):
    model.reset()
    t0 = time.perf_counter()
    logits, _ = model.prefill(ids)
    token = int(np.argmax(logits))
    t1 = time.perf_counter()
    for _ in range(new):
        token = int(np.argmax(model.step(token)))
    if run:  # the first is a warm-up
        ttft.append((t1 - t0) * 1e3)
        decode.append(new / (time.perf_counter() - t1))
print(json.dumps({"ttft_ms": sorted(ttft)[len(ttft) // 2], "decode_tps": sorted(decode)[len(decode) // 2],
                  "peak_rss_mb": sysinfo.peak_rss_mb()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("checkouts", nargs=2, help="two edgekit source trees: before, after")
    ap.add_argument("--prompt-tokens", type=int, default=131)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="counted runs per process (default: 5)")
    ap.add_argument("--processes", type=int, default=4, help="fresh processes per checkout (default: 4)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    trees = [str(Path(c).resolve()) for c in args.checkouts]
    for tree in trees:
        if not (Path(tree) / "edgekit" / "device").is_dir():
            ap.error(f"{tree} is not an edgekit checkout (no edgekit/device in it)")
    results: dict[str, list[dict]] = {tree: [] for tree in trees}
    for i in range(args.processes):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            out = subprocess.run([sys.executable, "-c", CHILD, tree, args.bundle, str(args.prompt_tokens),
                                  str(args.new_tokens), str(args.runs), str(args.threads)],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree})
            if out.returncode != 0:
                raise SystemExit(f"before_after: the process for {tree} failed:\n{out.stderr[-2000:]}")
            results[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.bundle}: prompt {args.prompt_tokens} tokens + {args.new_tokens} greedy steps, "
          f"{args.threads} threads, medians of {args.processes} processes, load average {os.getloadavg()[0]:.2f}")
    for label, tree in zip(("before", "after"), trees, strict=True):
        rs = results[tree]
        print(f"{label:6s} {tree}: peak RSS {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MB, "
              f"TTFT {statistics.median(r['ttft_ms'] for r in rs):.1f} ms, "
              f"decode {statistics.median(r['decode_tps'] for r in rs):.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
