"""Time to first token when requests share a system prompt, cold and with it already cached.

The MQTT service (and any caller that keeps one `Model`) answers requests that start with the
same system prompt and chat template. `Model` remembers the tokens in its KV cache and feeds
only what follows their longest common prefix with the new prompt (device/generate.py,
`prefill`), so after the first request each one costs the prefill of its own question. The
cache lives in the process: a restarted service pays the cold prefill once, on its first
request.

    python benchmarks/prefix_cache.py BUNDLE [--runs 7] [--threads 2]

Each round sends every question twice through the chat template, interleaved: once after
`reset()` (cold: the whole prompt is prefilled, as a peer without a prefix cache does) and once
right after another question (warm: the system prompt is cached). TTFT is tokenize + prefill +
first sample (Stats.time_to_first_token_s), the median over rounds and questions.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from edgekit.device import Model

SYSTEM = ("You are the voice interface of a six-axis robot arm in a packaging cell. Answer in one short "
          "sentence. The arm can pick, place, move to a named pose, open or close its gripper, and stop. "
          "Poses: home, shelf, conveyor, bin_a, bin_b. Never move while a person is inside the cell; say "
          "so instead. Report the gripper's state when asked. Speeds are slow, normal or fast.")
QUESTIONS = ["Move the red box from the conveyor to bin a.", "What is the gripper doing right now?",
             "Go home slowly.", "Can you stack two boxes on the shelf?", "Stop everything, someone is inside.",
             "Pick the blue part and place it in bin b at normal speed."]


def ttft_ms(model: Model, question: str, cold: bool) -> tuple[float, int, int]:
    if cold:
        model.reset()
    c = model.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                       max_new_tokens=1, temperature=0.0)
    return c.stats.time_to_first_token_s * 1e3, c.stats.prompt_tokens, c.stats.cached_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error(f"--runs must be at least 1, got {args.runs}")

    model = Model(args.bundle, threads=args.threads)
    ttft_ms(model, QUESTIONS[0], cold=True)  # warm up: first-run allocations and pre-packing
    times: dict[bool, list[float]] = {True: [], False: []}
    prompt, cached = [], []
    for _ in range(args.runs):
        for i, q in enumerate(QUESTIONS):
            for cold in (True, False):
                if not cold:
                    ttft_ms(model, QUESTIONS[(i + 1) % len(QUESTIONS)], cold=False)  # another request first
                ms, n, hit = ttft_ms(model, q, cold)
                times[cold].append(ms)
                if not cold:
                    prompt.append(n)
                    cached.append(hit)
    cold_ms, warm_ms = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.bundle}: {args.threads} threads, {args.runs} rounds x {len(QUESTIONS)} questions, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"prompt {statistics.median(prompt):.0f} tokens, {statistics.median(cached):.0f} of them cached when warm")
    print(f"ttft cold {cold_ms:.1f} ms, warm {warm_ms:.1f} ms: {warm_ms / cold_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
