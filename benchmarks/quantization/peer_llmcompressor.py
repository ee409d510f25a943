"""GPTQ by llm-compressor (vLLM's quantization library), for the side-by-side in run.py.

Runs in its own virtual environment, because llm-compressor pins transformers to an older
release than edgekit's export extra (see setup_peer_llmcompressor.sh):

    ~/.cache/edgekit/peer-llmc/bin/python peer_llmcompressor.py MODEL_DIR CALIB_IDS.npy OUT.npz

MODEL_DIR is a Hugging Face folder (run.py writes SmolLM2's), CALIB_IDS.npy the (N, L)
int64 calibration windows edgekit itself calibrates on. The GPTQ settings match edgekit's
defaults: int4, asymmetric, static act-order, dampening 0.01, lm_head left alone; groups
of --group-size (run.py passes 64: llm-compressor cannot do 128 on SmolLM2's 576 inputs).
OUT.npz gets, per Linear, its integer codes in [0, 15] and the scales and zero points of
each group, which run.py packs into the very MatMulNBits graph edgekit builds, so the two
rows differ only in how the codes were chosen.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("calib_ids")
    ap.add_argument("out")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    args = ap.parse_args()

    torch.manual_seed(0)
    ids = np.load(args.calib_ids)  # (N, L)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                               group_size=args.group_size, actorder="static")
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=args.damp, block_size=128,
                          bypass_divisibility_checks=True)  # a partial last group; at 128 it still fails
    t = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t

    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        scale = module.weight_scale.detach().float()  # (N, groups)
        zero = module.weight_zero_point.detach().float()  # (N, groups), signed: codes are in [-8, 7]
        w = module.weight.detach().float()  # (N, K), already the dequantized GPTQ result
        g = args.group_size
        s_full = scale.repeat_interleave(g, 1)[:, : w.shape[1]]
        z_full = zero.repeat_interleave(g, 1)[:, : w.shape[1]]
        q = torch.round(w / s_full) + z_full  # the signed code
        assert q.min() >= -8 and q.max() <= 7, name
        assert torch.allclose((q - z_full) * s_full, w, atol=1e-6), f"{name}: weights are not on the int4 grid"
        out[f"{name}.codes"] = (q + 8).to(torch.uint8).numpy()  # MatMulNBits' unsigned codes
        out[f"{name}.scales"] = scale.numpy()
        out[f"{name}.zeros"] = (zero + 8).to(torch.uint8).numpy()
    np.savez(args.out, **out)
    print(json.dumps({"seconds": round(seconds, 1), "linears": len(out) // 3}))


if __name__ == "__main__":
    main()
