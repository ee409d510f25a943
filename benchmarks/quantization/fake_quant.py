"""Research runs: quantize SmolLM2-135M in torch and measure its perplexity there, without building
a bundle ("fake-quantized" in README.md). The decoder's Linears hold their quantized values; the
embedding and the lm_head stay fp32, which puts these figures about 0.15 below a device bundle's
on the licence. Same texts and windows as run.py (the first 2048 tokens of each, 4 windows of 512).

    python benchmarks/quantization/fake_quant.py awq --group-size 128 --narrow
    python benchmarks/quantization/fake_quant.py awq --narrow --set awq.search_tokens=4096 awq.fit=0
    python benchmarks/quantization/fake_quant.py gptq --group-size 64 --threads 1   # two runs side by side

One line of JSON per run, also appended to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import texts as texts_  # noqa: E402

from edgekit.host import quant  # noqa: E402
from edgekit.host.families import family_of  # noqa: E402
from edgekit.host.load import load  # noqa: E402
from edgekit.host.options import ExportOptions, quant_plan  # noqa: E402

WINDOWS, WINDOW = 4, 512


def with_settings(plan, settings: list[str]):
    """`plan` with "awq.n_grid=40"-style overrides of its algorithm configs (awq., gptq.)."""
    for item in settings:
        path, _, value = item.partition("=")
        part, _, key = path.partition(".")
        config = getattr(plan, part)
        kind = type(getattr(config, key))
        typed = bool(int(value)) if kind is bool else kind(value)
        plan = dataclasses.replace(plan, **{part: dataclasses.replace(config, **{key: typed})})
    return plan


@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids[:WINDOWS * WINDOW]
    nll, scored = 0.0, 0
    for window in torch.tensor(ids).reshape(WINDOWS, WINDOW):  # each from an empty cache
        logits = model(window[None]).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        scored += WINDOW - 1
    return float(torch.tensor(nll / scored).exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quant", help="a method of edgekit/quantization.py, or none")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--narrow", action="store_true", help=f"--calib {texts_.CALIB.name}, as run.py's -narrow rows")
    ap.add_argument("--set", nargs="*", default=[], metavar="CONFIG.KEY=VALUE", help="e.g. awq.clip=0")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="fake_quant.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load("smollm2-135m")
    t0 = time.perf_counter()
    if args.quant != "none":
        options = ExportOptions(quant=args.quant, bits=args.bits, group_size=args.group_size,
                                calib=str(texts_.CALIB) if args.narrow else None)
        plan = with_settings(quant_plan(options), args.set)
        family = family_of(loaded.model)
        weights = {k: v.detach().numpy().copy() for k, v in loaded.model.state_dict().items()}
        quant.quantize(loaded, family, family.architecture(None), weights, plan,
                       lambda line: print(line, file=sys.stderr))  # leaves the dequantized Linears in the model
    row = {"quant": args.quant, "bits": args.bits, "group_size": args.group_size, "narrow": args.narrow,
           "set": args.set, "seconds": round(time.perf_counter() - t0)}
    ppl = {name: round(perplexity(loaded.model, loaded.tokenizer, text), 2)
           for name, text in texts_.texts(list(texts_.OUT_OF_DOMAIN)).items()}
    row.update(ppl, mean=round(sum(ppl.values()) / len(ppl), 2))
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
