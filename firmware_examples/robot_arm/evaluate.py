"""How often does a bundle turn a held-out command into the right arm action?

    python evaluate.py data/test.jsonl BUNDLE [BUNDLE ...]

For each bundle, each command of the test split is answered twice, greedy, with the
controller's own system prompt: freely, and constrained by ACTION_SCHEMA (as the controller
asks). An answer is valid when parse_action accepts it, correct when its action and object are
the expected ones. Prints one table row per bundle and mode, with the median latency per command
(prompt to last token, this machine) and the load average.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from arm_controller import ACTION_SCHEMA, SYSTEM, parse_action

from edgekit.device import Model


def score(model: Model, tests: list[dict], constrained: bool) -> tuple[float, float, float]:
    """(valid rate, correct action+object rate, median seconds per command)."""
    valid = correct = 0
    times = []
    for row in tests:
        command, want = row["messages"][1]["content"], json.loads(row["messages"][2]["content"])
        t = time.perf_counter()
        done = model.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": command}],
                              max_new_tokens=48, temperature=0.0,
                              json_schema=ACTION_SCHEMA if constrained else None)
        times.append(time.perf_counter() - t)
        try:
            got = parse_action(done.text)
        except ValueError:
            continue
        valid += 1
        same_object = (got["object"] or "").lower().removeprefix("the ") == (want["object"] or "").lower()
        correct += got["action"] == want["action"] and same_object
    return valid / len(tests), correct / len(tests), statistics.median(times)


def main() -> None:
    tests = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print(f"{len(tests)} held-out commands (load average {os.getloadavg()[0]:.2f})\n")
    print("| bundle | output | valid action | correct action + object | ms per command |")
    print("|---|---|---:|---:|---:|")
    for bundle in sys.argv[2:]:
        model = Model(bundle)
        for constrained in (False, True):
            v, c, s = score(model, tests, constrained)
            print(f"| {Path(bundle).name} | {'ACTION_SCHEMA' if constrained else 'free'} | {v:.0%} | {c:.0%} | "
                  f"{s * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
