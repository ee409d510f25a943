"""`edgekit finetune`: a LoRA adapter from chat examples (host side: imports torch when it runs)."""

from __future__ import annotations

import sys

from edgekit.cli import host_side_missing


def register(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on chat examples (host side, CPU)",
                       description="Train a LoRA adapter on a JSONL of chat examples ({\"messages\": [...]} per "
                                   "line, ending with the assistant's answer, the part learnt); then export with "
                                   "--adapter.")
    p.add_argument("source", help="smollm2-135m, a Hugging Face folder, or a .gguf file")
    p.add_argument("--data", required=True, help="the training examples, JSONL")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    for flag, kind, default, what in (("--steps", int, 200, "optimizer steps"), ("--batch-size", int, 8, "examples "
                                      "per step"), ("--lr", float, 1e-3, "learning rate, "
                                      "times a 10-step warm-up and a linear decay to 0 (so with few steps the "
                                      "peak is lower: 55%% of it at 20 steps, 91%% at 100)"), ("--rank", int, 8,
                                      "LoRA rank"), ("--alpha", int, 16, "LoRA alpha"), ("--max-len", int, 256,
                                      "tokens per example, at most"), ("--seed", int, 0, "seed"),
                                      ("--threads", int, None, "torch threads")):
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    try:
        from edgekit.host.finetune import FinetuneOptions, finetune
    except ImportError as e:
        raise host_side_missing("finetune", e) from None
    options = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                              alpha=args.alpha, max_len=args.max_len, seed=args.seed, threads=args.threads)
    finetune(args.source, args.data, args.out, options, say=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
