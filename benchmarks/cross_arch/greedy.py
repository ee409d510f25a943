"""Greedy tokens from a bundle, as JSON on stdout: runs on any architecture with only the
device side installed (onnxruntime, numpy, tokenizers). run_rpi5.sh runs it on x86-64
natively and on aarch64 under qemu-user, then compares.

    python benchmarks/cross_arch/greedy.py BUNDLE [--tokens 16] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

PROMPT = "The robot arm lifted the red cube and placed it on the shelf, then"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--teacher", help="JSON list of token ids: also run prompt + these in one pass and save "
                                      "the logits of every continuation position to --save-logits")
    ap.add_argument("--save-logits", help=".npy path for the --teacher logits")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error(f"--tokens must be at least 1, got {args.tokens}")
    try:
        teacher = json.loads(args.teacher) if args.teacher else None
    except json.JSONDecodeError:
        ap.error(f"--teacher must be a JSON list of token ids, got {args.teacher[:40]!r}")
    if teacher is not None and not (isinstance(teacher, list) and all(isinstance(i, int) for i in teacher)):
        ap.error("--teacher must be a JSON list of token ids")
    t0 = time.perf_counter()
    import onnxruntime

    from edgekit.device import Model

    assert "torch" not in sys.modules, "the device side must not import torch"
    model = Model(args.bundle)
    t1 = time.perf_counter()
    # stop only at the token count: the comparison wants exactly `tokens` ids
    done = model.generate(args.prompt, max_new_tokens=args.tokens, temperature=0.0)
    t2 = time.perf_counter()
    if teacher:
        # the same token sequence on both machines, so the logits are comparable position by position
        import numpy as np

        ids = model.encode(args.prompt)
        model.reset()
        logits = model.forward(ids + teacher[:-1], 0, all_logits=True)[len(ids) - 1:]  # (len(teacher), vocab)
        np.save(args.save_logits, logits.astype(np.float32))
    print(json.dumps({
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "provider": model.provider,
        "target": model.manifest.target.name,
        "flavour": model.manifest.graph.flavour,
        "quantization": model.manifest.quantization.method,
        "prompt": args.prompt,
        "tokens": done.token_ids,
        "text": done.text,
        "finish_reason": done.finish_reason,
        "load_s": round(t1 - t0, 2),
        "generate_s": round(t2 - t1, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
