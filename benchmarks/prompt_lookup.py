"""Prompt lookup: greedy answers with and without drafting from the context's n-grams.

Each prompt is answered greedy twice, interleaved, by the same Model: one token per model run
(prompt_lookup=False) and with drafts verified in the run of the sampled token (True: on for
any bundle here, also int8-compute ones where it is opt-in, to show what it does there).
Prints per kind of prompt: whether the tokens are identical, model runs, decode tok/s of each
and the speed-up; --busy N runs it with N processes spinning on the CPU meanwhile.

    python benchmarks/prompt_lookup.py BUNDLE [--threads 2] [--new-tokens 96] [--busy 1]

Kinds: extraction and rewriting (the answer copies the prompt), a command (the robot arm's
JSON, free, not constrained), and free text (a story: little to copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from edgekit.device import Model
from edgekit.device.bench.busy import busy_cpus

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "llama-ecosystem-overview.txt"


def passages(n: int, chars: int = 700) -> list[str]:
    """`n` paragraphs of English from the shared corpus (or a fixed text when it is absent)."""
    text = CORPUS.read_text() if CORPUS.exists() else ("Edge devices run small language models offline. " * 40)
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 300]
    return [p[:chars] for p in (paras or [text])[:n]]


def prompts() -> dict[str, list[list[dict]]]:
    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    texts = passages(4)
    return {
        "extraction": [user(f"{t}\n\nCopy the sentences of the text above that mention a model, word for word.")
                       for t in texts],
        "rewriting": [user(f"Fix the spelling, keep everything else:\n\n{t.replace('the ', 'teh ')}") for t in texts],
        "command": [user(c) for c in ("Put the green gear on the charging dock and then pick up the red cube",
                                      "Move the blue box to bin A, then move the yellow ball to bin A",
                                      "Pick up the wrench. Pick up the bolt. Pick up the spring.",
                                      "Stop, then go home, then pick up the grey cone")],
        "free text": [user(s) for s in ("Write a short story about a robot who learns to paint.",
                                        "Describe a sunrise over the sea.", "Why do people keep pets?",
                                        "Tell me about your favourite city.")],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    args = p.parse_args()
    if args.new_tokens < 1:
        p.error(f"--new-tokens must be at least 1, got {args.new_tokens}")
    model = Model(args.bundle, threads=args.threads)
    model.generate("warm up", max_new_tokens=4, temperature=0)

    rows = []
    with busy_cpus(args.busy):
        for kind, messages in prompts().items():
            same, runs, tps = True, {False: [], True: []}, {False: [], True: []}
            for m in messages:
                done = {}
                for lookup in (False, True):  # True: also where the default (None) would not draft
                    model.reset()  # both from a cold cache: only the decode differs
                    done[lookup] = model.generate(m, max_new_tokens=args.new_tokens, temperature=0,
                                                  prompt_lookup=lookup)
                    runs[lookup].append(len(done[lookup].stats.decode_s))
                    tps[lookup].append(done[lookup].stats.decode_tokens_per_s)
                same &= done[False].token_ids == done[True].token_ids
            base, fast = statistics.median(tps[False]), statistics.median(tps[True])
            rows.append((kind, "yes" if same else "NO", statistics.median(runs[False]), statistics.median(runs[True]),
                         base, fast, fast / base))
    print(f"{Path(args.bundle).name}: {args.new_tokens} new tokens at most, {args.threads} threads, "
          f"{args.busy} busy process(es), load average {os.getloadavg()[0]:.2f}; medians over the prompts\n")
    print("| prompts | same tokens | runs, one at a time | runs, with lookup | tok/s, one at a time "
          "| tok/s, with lookup | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, same, r0, r1, t0, t1, x in rows:
        print(f"| {kind} | {same} | {r0:.0f} | {r1:.0f} | {t0:.0f} | {t1:.0f} | {x:.2f}x |")


if __name__ == "__main__":
    main()
