"""What constrained decoding costs: the same answers generated freely and under a JSON schema.

The robot arm's bundle (firmware_examples/robot_arm/build_bundle.sh) answers the held-out
commands of its data set three ways, greedy, interleaved command by command:

    free      no constraint: the model writes the JSON itself
    masked    ACTION_SCHEMA, every token sampled from masked logits, one model run per token
              (the grammar's forced tokens taken one step at a time, as a plain masking loop does)
    forced    ACTION_SCHEMA as edgekit runs it: the tokens the grammar fixes (`{"action":"`,
              `","object":`, ...) are fed with the sampled token in one model run

Only commands whose three answers are the same tokens are compared, so the ratios are per
same output. Prints per mode: ms per command, model runs per command, ms per output token,
mask + sample ms per step, and the ratio to free; with --busy N, N processes spin on
the CPU meanwhile (a device is rarely idle).

    python benchmarks/constrained.py BUNDLE [--commands 50] [--threads 2] [--busy 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ARM = Path(__file__).resolve().parent.parent / "firmware_examples" / "robot_arm"
sys.path.insert(0, str(ARM))

from arm_controller import ACTION_SCHEMA, SYSTEM  # noqa: E402
from make_dataset import make  # noqa: E402

from edgekit.device import Model, constrain  # noqa: E402
from edgekit.device.bench.busy import busy_cpus  # noqa: E402

MODES = ("free", "masked", "forced")


def answer(model: Model, command: str, mode: str):
    """One greedy answer to `command` in `mode`; the Completion and its wall time."""
    force = constrain.Constraint.force
    if mode == "masked":  # the grammar forces nothing: each fixed token is one masked step
        constrain.Constraint.force = lambda self: []
    try:
        t = time.perf_counter()
        done = model.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": command}],
                              max_new_tokens=48, temperature=0.0,
                              json_schema=None if mode == "free" else ACTION_SCHEMA)
        return done, time.perf_counter() - t
    finally:
        constrain.Constraint.force = force


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--commands", type=int, default=50, help="held-out commands to answer (default 50)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    args = p.parse_args()
    if args.commands < 1:
        p.error(f"--commands must be at least 1, got {args.commands}")

    _, test = make()
    commands = [row["messages"][1]["content"] for row in test[:: max(1, len(test) // args.commands)]][: args.commands]
    model = Model(args.bundle, threads=args.threads)
    for mode in MODES:  # warm up each path once
        answer(model, commands[0], mode)
    runs: dict[str, list] = {m: [] for m in MODES}
    with busy_cpus(args.busy):
        for command in commands:
            got = {m: answer(model, command, m) for m in MODES}
            if len({tuple(done.token_ids) for done, _ in got.values()}) == 1:
                for m, r in got.items():
                    runs[m].append(r)

    same = len(runs["free"])
    print(f"{Path(args.bundle).name}: {same} of {len(commands)} commands gave the same tokens in every mode; "
          f"threads {args.threads}, {args.busy} busy process(es), load average {os.getloadavg()[0]:.2f}\n")
    print("| mode | ms per command | model runs | ms per output token | mask + sample ms per step "
          "| time vs free |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(s for _, s in runs["free"])
    for m in MODES:
        seconds = statistics.median(s for _, s in runs[m])
        model_runs = statistics.median(1 + len(d.stats.decode_s) for d, _ in runs[m])
        per_token = statistics.median(s / len(d.token_ids) for d, s in runs[m])
        sampled = statistics.median(d.stats.sample_s / (1 + len(d.stats.decode_s)) for d, _ in runs[m])
        print(f"| {m} | {seconds * 1e3:.0f} | {model_runs:.0f} | {per_token * 1e3:.1f} | {sampled * 1e3:.2f} "
              f"| {seconds / base:.2f}x |")
    print("\n" + json.dumps({"example": runs["forced"][0][0].text}) if same else "")


if __name__ == "__main__":
    main()
