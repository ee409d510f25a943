"""One bundle under two checkouts of edgekit: peak memory, TTFT and decode speed, side by side.

    git worktree add /tmp/before <commit>                       # the code before a change
    python benchmarks/before_after.py bundles/int4 /tmp/before . --prompt-tokens 131 --processes 4

Each process is compare_peers.py's edgekit child with one checkout's runtime on its path: it
loads the bundle, then runs the prompt (compare_peers' token ids) and `--new-tokens` greedy
steps `--runs` times after a warm-up; the parent reads its peak resident memory (VmHWM, which
only a fresh process can give) before it ends it. The checkouts take turns, process by process,
so that a busy minute on a shared machine falls on both.

With --cold-cache (root), the page cache is dropped before each process, as after a reboot:
the processes no longer inherit the page cache the one before left (which pages of the
bundle's file it holds, in which folio sizes), and the first request's TTFT shows what
reading the weights from the disk costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import compare_peers as peers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("checkouts", nargs=2, help="two edgekit source trees: before, after")
    ap.add_argument("--prompt-tokens", type=int, default=131)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="counted runs per process (default: 5)")
    ap.add_argument("--processes", type=int, default=4, help="fresh processes per checkout (default: 4)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0: each checkout's default)")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="N processes spinning on the CPU throughout, loads included (default 0)")
    ap.add_argument("--cold-cache", action="store_true",
                    help="drop the page cache before each process, as after a reboot (root)")
    args = ap.parse_args()
    trees = [Path(c).resolve() for c in args.checkouts]
    for tree in trees:
        if not (tree / "edgekit" / "device").is_dir():
            ap.error(f"{tree} is not an edgekit checkout (no edgekit/device in it)")

    sys.path.insert(0, str(peers.ROOT))
    from tokenizers import Tokenizer

    from edgekit.device.bench import prompt_ids
    from edgekit.device.bench.busy import busy_cpus

    ids = prompt_ids(Tokenizer.from_file(str(Path(args.bundle) / "tokenizer.json")), args.prompt_tokens)
    ids_file = Path(tempfile.mkdtemp(prefix="before_after-")) / "prompt_ids.json"
    ids_file.write_text(json.dumps(ids))
    results: dict[Path, list[dict]] = {tree: [] for tree in trees}
    with busy_cpus(args.background_load):
        for i in range(args.processes):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                if args.cold_cache:
                    drop_page_cache()
                try:
                    proc, load_s = peers.start_child("edgekit", args.bundle, ids_file, args.new_tokens, args.threads,
                                                     tree)
                except RuntimeError as e:
                    raise SystemExit(f"before_after: the process for {tree}: {e}") from None
                first, *runs = [peers.run_child(proc) for _ in range(args.runs + 1)]  # the first is a warm-up
                results[tree].append({**peers.summarize("edgekit", args.bundle, load_s, runs, len(ids),
                                                        args.new_tokens, peers.stop_child(proc)),
                                      "first_ttft_ms": first["ttft_s"] * 1e3})
        load_average = os.getloadavg()[0]
    print(f"{args.bundle}: prompt {len(ids)} tokens + {args.new_tokens} greedy steps, "
          f"{args.threads or 'default'} threads, {args.background_load} busy process(es) alongside, "
          f"medians of {args.processes} processes, load average {load_average:.2f}")
    for label, tree in zip(("before", "after"), trees, strict=True):
        rs = results[tree]
        print(f"{label:6s} {tree}: peak RSS {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MB, "
              f"TTFT {statistics.median(r['ttft_ms'] for r in rs):.1f} ms "
              f"(first request {statistics.median(r['first_ttft_ms'] for r in rs):.1f}), "
              f"decode {statistics.median(r['decode_tps'] for r in rs):.1f} tok/s")
    return 0


def drop_page_cache() -> None:
    """Write the dirty pages out, then drop the clean ones from the page cache (Linux, root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError as e:
        raise SystemExit(f"before_after: --cold-cache needs root on Linux ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
