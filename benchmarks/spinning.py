"""Decode speed by thread and spin setting, on a quiet CPU and with processes competing for it.

onnxruntime's intra-op worker threads spin-wait for work between operators by default. On
a quiet machine that saves the wake-up of every operator of a 4 ms decode step; when
another process wants the same cores (a robot's camera or planning node), the spinning
threads take turns with it and with each other, and the decode step waits for the
preempted one. This measures each setting in one run, interleaved, so the ratios hold on a
shared host:

    python benchmarks/spinning.py BUNDLE [--busy 0 1] [--new-tokens 64] [--runs 5]

Settings: 1 thread; 2 threads spinning without bound (onnxruntime's default); 2 threads not
spinning; 2 threads spinning for at most each --spin-us microseconds before they sleep
(edgekit's default is 10, device/session.py).
Greedy, EOS masked, the same prompt each time; tok/s is the median of --runs decode phases.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from edgekit.device import Model
from edgekit.device.bench.busy import busy_cpus
from edgekit.device.table import format_table

PROMPT = ("Explain to a new technician how a robot arm's controller turns a command into joint motions, "
          "step by step, with the safety checks it makes on the way. ") * 4


def settings(spin_us: list[int]) -> dict[str, tuple[int, dict[str, str]]]:
    """name -> (threads, onnxruntime session config)"""
    on = {"session.intra_op.allow_spinning": "1"}
    out = {"t1": (1, {}), "t2 spin": (2, on), "t2 no spin": (2, {"session.intra_op.allow_spinning": "0"})}
    for us in spin_us:
        out[f"t2 spin {us}us"] = (2, {**on, "session.intra_op.spin_duration_us": str(us)})
    return out


def decode_rate(model: Model, new_tokens: int) -> float:
    c = model.generate(PROMPT, max_new_tokens=new_tokens, temperature=0.0, prompt_lookup=False,
                       logit_bias={i: -100.0 for i in model.eos_token_ids})
    return c.stats.decode_tokens / sum(c.stats.decode_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="competing processes, one row each")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--spin-us", type=int, nargs="*", default=[10], help="spin durations to try, microseconds")
    args = ap.parse_args()

    configs = settings(args.spin_us)
    models = {name: Model(args.bundle, threads=t, session_config=cfg) for name, (t, cfg) in configs.items()}
    for m in models.values():
        decode_rate(m, 8)  # warm up: first-run allocations and pre-packing
    rows = []
    for busy in args.busy:
        with busy_cpus(busy):
            rates: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.runs):  # interleaved: every setting sees the same moments of the host
                for name, m in models.items():
                    rates[name].append(decode_rate(m, args.new_tokens))
            load = os.getloadavg()[0]
        rows.append([str(busy), f"{load:.2f}", *(f"{statistics.median(r):.0f}" for r in rates.values())])
    print(f"{args.bundle}: decode tok/s, median of {args.runs} x {args.new_tokens} tokens, {os.cpu_count()} CPUs")
    print(format_table(["busy", "load", *models], rows))
    if 0 in args.busy and len(args.busy) > 1:
        quiet = dict(zip(models, map(float, rows[args.busy.index(0)][2:]), strict=True))
        for r in rows:
            if r[0] != "0":
                kept = ", ".join(f"{n} {float(v) / quiet[n]:.0%}" for n, v in zip(models, r[2:], strict=True))
                print(f"busy {r[0]}: share of quiet speed kept: {kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
