"""The quantization stage of the export: fp32 weights in, integer weights out.

    quantize(loaded, family, arch, weights, plan, say) -> (weights, manifest record)

The methods are the rows of edgekit/quantization.py; each names the function of layers.py
that quantizes one decoder layer, after its paper (rtn.py, gptq.py, awq.py, smoothquant.py,
w8a8.py). plan.py holds one run's checked settings.

Weight-only methods become MatMulNBits with accuracy_level=4; W8A8 becomes
DynamicQuantizeMatMul (nbits.py). The decoder's Linears are quantized; around them:

- embedding: int8 per channel, the lm_head's spec, read by GatherBlockQuantized (host/graph:
  the portable flavour dequantizes it to float16 when it builds the graph). A lookup reads
  one row per token, so the table costs disk and memory, not time: SmolLM2's 49152 x 576
  embedding is 21% of its weights, 56 MB as float16 and 28 MB as int8 (+3.5 MB of scales).
  Against the float16 table it moved benchmarks/quantization's RTN perplexities by 0.8% at
  most on any text, in both directions, and their means by under 0.4%.
- lm_head: int8 per channel through MatMulNBits, for every method. When the model ties it
  to the embedding, the bundle stores this separate quantized copy (28 MB for SmolLM2, a
  quarter of the fp32 tie). `--lm-head-bits 4` (int4, blocks of 32, as onnxruntime-genai
  builds it) is there for when decode speed matters more: the lm_head is the largest matmul
  of a small model, and int4 halves the bytes each token reads. Rounded to nearest it costs
  SmolLM2 +6-11% perplexity on every text of benchmarks/quantization (the logits of a 49k
  vocabulary all go through it); so a calibrated method quantizes it with GPTQ on the
  calibration samples' lm_head inputs (the model run through its quantized layers), which
  costs +1-3% (fake-quantized research figures, the rest of the model fp32; about 20 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from edgekit.errors import ExportError
from edgekit.host.quant import layers, layerwise
from edgekit.host.quant.calibration import calibration_ids
from edgekit.host.quant.gptq import GPTQConfig, gptq, hessian
from edgekit.host.quant.nbits import ACCURACY_LEVEL_INT8
from edgekit.host.quant.plan import DEFAULT_SEQ_LEN, LM_HEAD, QuantPlan
from edgekit.host.quant.rtn import QuantSpec, rtn


def check_applicable(family, method: str) -> None:
    """The family's layers have the modules its quantization description names."""
    model = family.model
    try:
        layer = model.get_submodule(f"{family.decoder_layers}.0")
    except AttributeError:
        raise ExportError(f"{method} cannot apply to {type(model).__name__}: it has no decoder layers at "
                          f"{family.decoder_layers}") from None
    needed = [*family.linears, *(g.prev for g in family.scale_groups)]
    for path in needed:
        try:
            layer.get_submodule(path)
        except AttributeError:
            raise ExportError(f"{method} cannot apply to this {model.config.model_type} model: its layers have no "
                              f"{path} (edgekit's {type(family).__name__} family expects "
                              f"{', '.join(family.linears)})") from None


def quantize(loaded, family, arch, weights: dict, plan: QuantPlan,
             say: Callable[[str], None]) -> tuple[dict, dict]:
    """Quantize the decoder's Linears of `loaded.model` (walked as `family` describes them) as
    `plan` says.

    Returns the weights for family.describe (quantized Linears are nbits objects, keyed by their
    state_dict names) and the manifest's `quantization` record. The model's own parameters are
    replaced (never changed in place) by their quantized values, so `weights` stays fp32.
    """
    method = plan.method
    model = loaded.model
    check_applicable(family, method.name)
    t0 = time.perf_counter()
    torch.manual_seed(plan.seed)

    calib = None
    if method.calibrated:
        limit = family.longest_forward()
        if limit is not None and plan.seq_len > limit:
            raise ExportError(f"calibration samples of {plan.seq_len} tokens (--calib-seq-len, default "
                              f"{DEFAULT_SEQ_LEN}) are longer than the {limit} positions transformers runs this "
                              f"model on; pass --calib-seq-len {limit} or less")
        calib = calibration_ids(loaded.tokenizer, plan.calib, plan.samples, plan.seq_len, plan.seed,
                                mix_default=method.mixed_calibration)
        say(f"      calibration: {calib.ids.shape[0]} x {plan.seq_len} tokens from {calib.source}")

    quantize_layer = getattr(layers, method.layer)
    # GPTQ corrects each layer for the error of the ones before: the next layer calibrates on this
    # one's quantized output; AWQ and SmoothQuant on the fp32 output
    sequential = method.layer == "gptq_layer"
    decoder_layers = model.get_submodule(family.decoder_layers)
    inputs = layerwise.inputs_of(family.linears)
    out = dict(weights)
    hidden, kwargs = (None, None) if calib is None else layerwise.first_layer_inputs(model, decoder_layers[0],
                                                                                     calib.ids)
    for i, layer in enumerate(decoder_layers):
        t = time.perf_counter()
        feats, fp_out = None, None
        if hidden is not None:
            assert kwargs is not None  # both come from the calibration samples
            feats, fp_out = layerwise.linear_inputs(layer, inputs, hidden, kwargs)
        quantized = quantize_layer(layer, family, feats, kwargs, plan)
        for path, q in quantized.items():  # the layer as the device will run it
            layer.get_submodule(path).weight.data = torch.from_numpy(q.dequantize().copy())
        store_layer(out, f"{family.decoder_layers}.{i}", layer, quantized)
        if hidden is not None:
            assert kwargs is not None
            del feats
            hidden = layerwise.run_layer(layer, hidden, kwargs) if sequential else fp_out
        say(f"      layer {i + 1}/{len(decoder_layers)} {method.name} ({time.perf_counter() - t:.1f}s)")

    head_x = None  # a 4-bit lm_head is GPTQ-calibrated when there are samples: +1-3% perplexity against RTN's +6-11%
    if calib is not None and plan.lm_head.bits < 8:
        t = time.perf_counter()
        head_x = layerwise.head_inputs(model, calib.ids)
        say(f"      lm_head int{plan.lm_head.bits} gptq ({time.perf_counter() - t:.1f}s of inputs)")
    store_embeddings(out, weights, family, plan.lm_head, head_x, plan.gptq)
    head = plan.lm_head
    record = {
        "method": method.name,
        "weights": f"int{plan.spec.bits}",
        "bits": plan.spec.bits,
        "group_size": plan.spec.group_size,
        "symmetric": True if method.int8_activations else plan.spec.sym,
        "operator": method.operator,
        "accuracy_level": None if method.int8_activations else ACCURACY_LEVEL_INT8,  # the target's, once built
        "activations": method.activations,
        "calibration": None if calib is None else calib.record(),
        "embedding": "int8 per channel (GatherBlockQuantized; float16 Gather in the portable flavour)",
        "lm_head": f"int{head.bits} {f'g{head.group_size}' if head.group_size else 'per-channel'} MatMulNBits"
                   + (", gptq" if head_x is not None else "")
                   + (", a quantized copy of the tied embedding" if arch.tie_word_embeddings else ""),
        "int8_linears": [p for p, key in family.linears.items() if key in method.int8_inputs],
        "seconds": round(time.perf_counter() - t0, 1),
        **layers.settings_record(family, plan),
    }
    return out, record


def store_layer(out: dict, p: str, layer, quantized: dict) -> None:
    """Put layer `p`'s entries into `out`: the quantized Linears, and every other parameter (norms
    and biases, possibly rescaled by AWQ or SmoothQuant) as a fresh fp32 copy."""
    for path, q in quantized.items():
        out[f"{p}.{path}.weight"] = q
    for name, param in layer.named_parameters():
        if name.removesuffix(".weight") not in quantized:
            out[f"{p}.{name}"] = param.detach().numpy().copy()


def store_embeddings(out: dict, weights: dict, family, head_spec: QuantSpec = LM_HEAD[8],
                     head_x: torch.Tensor | None = None, config: GPTQConfig | None = None) -> None:
    """The embedding as int8 per channel and the lm_head quantized by `head_spec`: by GPTQ when
    its calibration inputs `head_x` (N, L, in) are given, else round to nearest (see the module
    docstring)."""
    embed = torch.from_numpy(np.asarray(weights[f"{family.embed_tokens}.weight"]))
    head = weights.get(f"{family.lm_head}.weight")  # absent when tied
    head_w = embed if head is None else torch.from_numpy(np.asarray(head))
    out[f"{family.embed_tokens}.weight"] = rtn(embed, LM_HEAD[8])
    if head_x is not None:
        config = config or GPTQConfig()
        out[f"{family.lm_head}.weight"] = gptq(head_w, hessian(head_x, config.sink_weight), head_spec, config)
    elif head is None and head_spec == LM_HEAD[8]:  # tied, rounded as the embedding is: the same codes
        out[f"{family.lm_head}.weight"] = out[f"{family.embed_tokens}.weight"]
    else:
        out[f"{family.lm_head}.weight"] = rtn(head_w, head_spec)
