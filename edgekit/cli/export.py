"""`edgekit export`: a model to a bundle per target (host side: imports torch when it runs)."""

from __future__ import annotations

from edgekit.cli import host_side_missing
from edgekit.quantization import METHODS


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to a bundle (host side)",
                       description="Export a model to a bundle a device can run. SOURCE is a shipped model "
                                   "name (smollm2-135m), a Hugging Face model folder, or a .gguf file.")
    p.add_argument("source", help="smollm2-135m, a Hugging Face folder, or a .gguf file")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--context-length", type=int, help="KV cache length (default: min(2048, the model's maximum))")
    p.add_argument("--target", help="device profile(s) from targets/ (see `edgekit targets`), comma-separated: "
                                    "one bundle per target in OUT/<target>; its defaults apply where no flag is given "
                                    "(default: a generic fp32 x86-64 bundle)")
    p.add_argument("--flavour", choices=["fused", "portable"],
                   help="graph operators: fused (onnxruntime's contrib operators) or portable (standard ONNX only); "
                        "default: the target's, else fused")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="the chat template to ship: alpaca (= dolly), oasst, or a Jinja file (default: the model's "
                        "own; models without one take plain prompts)")
    p.add_argument("--fit-context", action="store_true",
                   help="shrink the context length until the bundle fits the target's memory instead of refusing")
    p.add_argument("--adapter", action="append", default=[], dest="adapters", metavar="[NAME=]PATH[:WEIGHT]",
                   help="a PEFT adapter folder to merge (LoRA) or bake in (prefix tuning); repeatable")
    q = p.add_argument_group("quantization")
    methods = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    q.add_argument("--quant", choices=["none", *METHODS], metavar="METHOD",
                   help="default: the target's (int4-best for every shipped profile that quantizes), none without "
                        f"--target; or: {methods}")
    q.add_argument("--bits", type=int, help="weight bits: 4 or 8")
    q.add_argument("--group-size", type=int, help="weights per scale: 32, 64, 128, or 0 for per-channel")
    q.add_argument("--sym", action="store_true", help="symmetric weights, no zero points (default: asymmetric)")
    q.add_argument("--calib", help="calibration text: a .txt file or a .jsonl of {\"text\": ...}; GPTQ, AWQ and "
                   "int4-best draw N samples from it and N more from the default text (CPython's docs)")
    q.add_argument("--calib-samples", type=int, help="calibration samples (N)")
    q.add_argument("--calib-seq-len", type=int, help="tokens per calibration sample (L)")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    q.add_argument("--damp", type=float, help="gptq: dampening added to the Hessian's diagonal, as a fraction of "
                                              "its mean (default 0.01)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false", default=None,
                   help="gptq: quantize columns in their stored order, not by decreasing activation")
    q.add_argument("--awq-grid", type=int, help="awq: scale exponents tried per layer group (default 20)")
    q.add_argument("--alpha", type=float, help="smoothquant: migration strength 0..1 (default 0.5)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8],
                   help="lm_head weights: 8 per channel (default) or 4 in blocks of 32 (faster decode, "
                        "higher perplexity)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    try:
        from edgekit.host import ExportOptions, export
    except ImportError as e:
        raise host_side_missing("export", e) from None
    from dataclasses import fields
    from pathlib import Path

    from edgekit.device.targets import load_targets

    targets = load_targets(args.target) if args.target else [None]  # all of them, before any work: fail fast
    for t in targets:
        given = {f.name: getattr(args, f.name) for f in fields(ExportOptions) if f.name != "target"}  # one flag each
        options = ExportOptions(target=t.path if t else None, **given)
        out = Path(args.out) / t.name if t and len(targets) > 1 else args.out  # several targets: one folder each
        print(export(args.source, out, options))
    return 0
