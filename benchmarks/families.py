"""Decode speed of every family's graph against a Llama graph of the same size.

A family's features (q/k norms, sandwich norms, softcaps, partial rotary by head permutation,
ALiBi through GroupQueryAttention's attention_bias, LayerNorm, parallel residual, learned
positions) should not make a decode step slower per parameter than Llama's. For each family a
random model of one size (hidden 512, 8 layers, 8 heads of 64, SmolLM2's 49152-token vocabulary)
is exported in fp32; each is timed on the same 128-token prompt then 128 decode steps, median of
--runs, all models interleaved in one run (these hosts are shared: compare the ratios).

    python benchmarks/families.py [--threads 2] [--runs 5] [--families llama,gemma2,bloom]

Prints one row per family: decode ms/token, parameters, and the ratio of ms per parameter to
Llama's (1.00 = as fast per parameter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024)
GATED = dict(intermediate_size=1536, num_key_value_heads=8)  # gate, up, down: 3 x 512 x 1536
PLAIN = 2048  # up, down: 2 x 512 x 2048, the same MLP parameters
FAMILIES = {
    "llama": ("llama", GATED),
    "qwen3 (q/k norm)": ("qwen3", {**GATED, "head_dim": 64}),
    "gemma2 (sandwich norms, softcaps, local layers)": ("gemma2", {**GATED, "head_dim": 64, "sliding_window": 256,
                                                                   "query_pre_attn_scalar": 64}),
    "gemma3 (q/k norm, two rope tables)": ("gemma3_text", {**GATED, "head_dim": 64, "sliding_window": 256,
                                                           "query_pre_attn_scalar": 64}),
    "phi3 (partial rotary 3/4)": ("phi3", {**GATED, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                        "partial_rotary_factor": 0.75}}),
    "stablelm (LayerNorm, rotary 1/4)": ("stablelm", {**GATED}),
    "gpt_neox (parallel, LayerNorm, GELU)": ("gpt_neox", {"intermediate_size": PLAIN}),
    "bloom (ALiBi)": ("bloom", {}),
    "mpt (ALiBi, no bias)": ("mpt", {"expansion_ratio": 4, "max_seq_len": 1024}),
    "falcon (multi-query, parallel)": ("falcon", {"ffn_hidden_size": PLAIN, "multi_query": True}),
    "opt (learned positions, ReLU)": ("opt", {"ffn_dim": PLAIN, "word_embed_proj_dim": 512}),
}


def make(model_type: str, config: dict, folder: Path, tokenizer) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **{**SIZE, **config})
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def matmul_params(bundle: Path) -> int:
    """The weights every decode step reads in full: the MatMul and Gemm weights (the lm_head included)."""
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    return sum(sizes.get(n.input[1], 0) for n in graph.node if n.op_type in ("MatMul", "Gemm"))


def decode_ms(bundle: Path, threads: int, prompt: list[int], steps: int) -> float:
    from edgekit.device import Model

    model = Model(bundle, threads=threads)
    logits, _ = model.prefill(prompt)
    times = []
    token = int(np.argmax(logits))
    for _ in range(steps):
        t = time.perf_counter()
        logits = model.step(token)
        times.append(time.perf_counter() - t)
        token = int(np.argmax(logits))
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--families", help="comma-separated model types to include (default: all)")
    ap.add_argument("--work", type=Path, help="where to keep the models and bundles (default: a temporary folder)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from edgekit.host import export
    from edgekit.host.load import resolve

    src = resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-families-"))
    chosen = {k: v for k, v in FAMILIES.items()
              if not args.families or v[0] in args.families.split(",") or v[0] == "llama"}
    bundles = {}
    for name, (model_type, config) in chosen.items():
        folder, bundle = work / f"{model_type}-hf", work / model_type
        if not (bundle / "edgekit.json").exists():
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            make(model_type, config, folder, tokenizer)
            export(folder, bundle, progress=lambda _: None)
        bundles[name] = bundle

    prompt = tokenizer("The robot arm lifted the red cube and placed it on the shelf, then " * 8).input_ids[:128]
    times: dict[str, list[float]] = {name: [] for name in bundles}
    for r in range(args.runs):  # interleaved: every model once per round
        for name, bundle in bundles.items():
            times[name].append(decode_ms(bundle, args.threads, prompt, args.steps))
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"decode, {args.threads} threads, 128-token prompt, {args.steps} steps, median of {args.runs} "
          f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})\n")
    base = statistics.median(times["llama"]) / matmul_params(bundles["llama"])
    print("| family | ms/token | MatMul weights (M) | ms per weight vs Llama |")
    print("|---|---:|---:|---:|")
    for name, bundle in bundles.items():
        ms, n = statistics.median(times[name]), matmul_params(bundle)
        print(f"| {name} | {ms:.2f} | {n / 1e6:.1f} | {ms / n / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
