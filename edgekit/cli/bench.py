"""`edgekit bench`: benchmark a bundle on this device, profile its operators, compare two reports.

    edgekit bench BUNDLE                                   # table on stdout, JSON report + PNG in out/
    edgekit bench BUNDLE --prompt-tokens 32,128,512 --new-tokens 128 --runs 5 --threads 1,2,4 --report out/
    edgekit bench BUNDLE -o csv                            # llama-bench's formats: md (default), csv, json
    edgekit bench BUNDLE --profile-ops                     # time by operator type and node, prefill and decode
    edgekit bench --compare a.json b.json                  # ratios B / A for the tests both ran
"""

from __future__ import annotations

import argparse
import json
import sys

from edgekit.cli import THREADS_DEFAULT


def _int_list(text: str) -> list[int]:
    """llama-bench's sweeps: "32,128,512"."""
    try:
        values = [int(v) for v in text.split(",")]  # "8,,9": a number left out is a mistake, not a skip
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark a bundle on this device (device side)",
        description="Time a bundle on this device, llama-bench style: pp (prompt processing) and tg (text "
                    "generation) tokens/s, time to first token, inter-token latency, peak memory, CPU "
                    "temperature and frequency. Prints a table and writes a JSON report and a PNG plot.",
        epilog="examples: edgekit bench bundles/rpi5 --prompt-tokens 32,128,512 --threads 1,2,4 | "
               "edgekit bench bundles/rpi5 --profile-ops | edgekit bench --compare a.json b.json")
    p.add_argument("bundle", nargs="?", help="a bundle folder made by `edgekit export`")
    p.add_argument("-p", "--prompt-tokens", type=_int_list, default=[128], metavar="N[,N...]",
                   help="prompt lengths to sweep (default: 128)")
    p.add_argument("-n", "--new-tokens", type=int, default=64, metavar="N",
                   help="one-token decode steps after each prompt (default: 64)")
    p.add_argument("-r", "--runs", type=int, default=5, help="counted runs per test (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted warm-up runs per test (default: 1)")
    p.add_argument("-t", "--threads", type=_int_list, metavar="N[,N...]",
                   help=f"onnxruntime intra-op threads to sweep (default: {THREADS_DEFAULT})")
    p.add_argument("-o", "--output", choices=["md", "csv", "json"], default="md",
                   help="what to print on stdout (default: md)")
    p.add_argument("--report", default="out", metavar="DIR",
                   help="folder for the JSON report and the PNG plot (default: out)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="run N processes spinning on the CPU meanwhile, as a busy device would (default: 0)")
    p.add_argument("--profile-ops", action="store_true",
                   help="instead of timing, profile the operators (onnxruntime's profiler) at the first prompt "
                        "length and thread count: time by operator type and by node, prefill and decode")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print the ratios B / A between two reports (no benchmark is run)")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgekit.device import bench

    if args.compare:
        if args.bundle:
            raise bench.BenchError("--compare takes two reports and no bundle")
        a, b = (bench.read_report(path) for path in args.compare)
        print(bench.format_compare(a, b, *args.compare))
        return 0
    if not args.bundle:
        raise bench.BenchError("give a BUNDLE folder to benchmark, or --compare A.json B.json")
    threads = args.threads or [None]
    say = lambda msg: print(f"edgekit bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    if args.profile_ops:
        return _run_profile(args, threads[0], say)

    options = bench.BenchOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                                 warmup=args.warmup, threads=threads, background_load=args.background_load)
    report = bench.run_benchmark(args.bundle, options, progress=say)
    if args.output == "md":
        print(bench.format_markdown(report))
    elif args.output == "csv":
        print(bench.format_csv(report), end="")
    else:
        print(json.dumps(report, indent=1))
    path = bench.write_report(report, args.report)
    say(f"report: {path}")
    if not args.no_plot:
        try:
            say(f"plot: {bench.plot_report(report, path.with_suffix('.png'))}")
        except bench.PlotUnavailable as e:
            say(f"no plot: {e}")
    return 0


def _run_profile(args, threads: int | None, say) -> int:
    from edgekit.device import bench, op_profile

    prompt = args.prompt_tokens[0]
    new = min(args.new_tokens, 32)  # decode steps are alike: a few dozen give a stable per-step mean
    say(f"profiling operators: pp{prompt} + {new} decode steps, threads {threads or 'default'} "
        "(the profiler slows every run; use plain `edgekit bench` for speed)")
    phases = op_profile.profile_ops(args.bundle, prompt_tokens=prompt, new_tokens=new, threads=threads,
                                    warmup=max(args.warmup, 1))
    report = op_profile.profile_report(args.bundle, phases, prompt, new, threads)
    if args.output == "json":
        print(json.dumps(report, indent=1))
    else:
        print(op_profile.format_profile(phases), end="")
    say(f"report: {bench.write_report(report, args.report)}")
    return 0
