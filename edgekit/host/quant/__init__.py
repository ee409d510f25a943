"""The quantization stage of the export: fp32 weights in, integer weights out.

    quantize(loaded, arch, weights, options, say) -> (weights, manifest record)

Methods (each in its own file, after its paper):

    rtn          round to nearest, 4 or 8 bits, per group or per channel       (rtn.py)
    gptq         Hessian-guided error compensation, act-order, dampening        (gptq.py)
    awq          activation-aware scales folded into the op before, clipping    (awq.py)
    smoothquant  outliers migrated into the weights, int8 weights + activations (smoothquant.py)
    w8a8         int8 weights + activations without smoothing (the baseline SmoothQuant beats)

Presets (PRESETS) name a whole recipe:

    int4-best    GPTQ (sink-weighted Hessian, searched group ranges) int4 in groups of 32, calibrated
                 on --calib and the default text half each, so that quality holds off the user's
                 domain: the best int4 edgekit makes within 5 minutes of CPU for SmolLM2-135M,
                 at 0.297 of the fp32 bundle (benchmarks/quantization/README.md)

Weight-only methods become MatMulNBits with accuracy_level=4; W8A8 becomes
DynamicQuantizeMatMul (nbits.py). The decoder's Linears are quantized; around them:

- embedding: stored as float16 (Gather, then Cast to float32). A lookup reads one row per
  token, so it costs no time to keep it precise, and halving it is what brings SmolLM2's
  int4 bundle under a third of fp32 (its 49152 x 576 embedding is 21% of the weights).
- lm_head: int8 per channel through MatMulNBits, for every method. When the model ties it
  to the embedding, the bundle stores this separate quantized copy: a 4-bit lm_head costs
  small models noticeably more perplexity than it saves (the logits of a 49k vocabulary
  all go through it), and an int8 copy (28 MB for SmolLM2) is a quarter of the fp32 tie.
  `--lm-head-bits 4` (int4, blocks of 32, as onnxruntime-genai builds it) is there for
  when decode speed matters more: the lm_head is the largest matmul of a small model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from edgekit.errors import ExportError
from edgekit.host.quant import awq as awq_
from edgekit.host.quant import layerwise
from edgekit.host.quant.calibration import calibration_ids
from edgekit.host.quant.gptq import GPTQConfig, gptq, hessian, single_thread
from edgekit.host.quant.nbits import ACCURACY_LEVEL_INT8
from edgekit.host.quant.rtn import QuantSpec, rtn
from edgekit.host.quant.smoothquant import DEFAULT_ALPHA, smooth
from edgekit.host.quant.w8a8 import quantize_w8a8

METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
# preset -> the method it runs and its settings; flags the user gives still override bits and group size
PRESETS = {"int4-best": {"method": "gptq", "bits": 4, "group_size": 32, "mix_calibration": True}}
BITS = (4, 8)
GROUP_SIZES = (0, 32, 64, 128)  # 0 = per output channel
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
# lm_head by --lm-head-bits: int8 per channel by default; int4 in blocks of 32 (onnxruntime-genai's
# choice) trades perplexity for decode speed, the lm_head being the largest matmul of a small model
LM_HEAD = {8: QuantSpec(bits=8, group_size=0, sym=True), 4: QuantSpec(bits=4, group_size=32, sym=False)}


def resolve(options) -> dict:
    """The method's settings with defaults filled in; ExportError for what cannot be done."""
    from edgekit.host.export import flag

    preset = PRESETS.get(options.quant, {})
    method = preset.get("method", options.quant)
    if method not in METHODS:
        raise ExportError(f"unknown quantization method {method!r}; choose one of: none, {', '.join(METHODS)}, "
                          f"{', '.join(PRESETS)}")
    if preset and options.bits not in (None, preset["bits"]):
        raise ExportError(f"--quant {options.quant} is a {preset['bits']}-bit recipe; drop --bits {options.bits} "
                          f"(or use --quant {method} --bits {options.bits})")
    if method in ("smoothquant", "w8a8"):
        if options.bits not in (None, 8):
            raise ExportError(f"{method} quantizes weights and activations to 8 bits; --bits {options.bits} "
                              "is not supported (use gptq, awq or rtn for 4-bit weights)")
        if options.group_size not in (None, 0):
            raise ExportError(f"{method} uses one scale per output channel; drop --group-size "
                              f"(int8 activations are quantized per tensor, weights per channel)")
        bits, group_size = 8, 0
    else:
        bits = preset.get("bits", 4) if options.bits is None else options.bits
        if bits not in BITS:
            raise ExportError(f"--bits {bits} is not supported; use 4 or 8")
        group_size = options.group_size if options.group_size is not None else (
            preset.get("group_size", 128 if bits == 4 else 0))
        if group_size not in GROUP_SIZES:
            raise ExportError(f"--group-size {group_size} is not supported; use 32, 64, 128, or 0 for per-channel")
    knobs = {"damp": "gptq", "act_order": "gptq", "awq_grid": "awq", "alpha": "smoothquant"}
    for knob, owner in knobs.items():
        if getattr(options, knob) is not None and method != owner:
            raise ExportError(f"{flag(knob)} applies to --quant {owner}, not {method}")
    damp = GPTQConfig.percdamp if options.damp is None else options.damp
    if not 0 < damp <= 1:
        raise ExportError(f"--damp {damp} is out of range; use a fraction in (0, 1], e.g. 0.01")
    alpha = DEFAULT_ALPHA if options.alpha is None else options.alpha
    if not 0 <= alpha <= 1:
        raise ExportError(f"--alpha {alpha} is out of range; use 0..1 (0.5 suits most models)")
    lm_head_bits = 8 if options.lm_head_bits is None else options.lm_head_bits
    if lm_head_bits not in LM_HEAD:
        raise ExportError(f"--lm-head-bits {lm_head_bits} is not supported; use 8 (default) or 4")
    awq_grid = awq_.AWQConfig.n_grid if options.awq_grid is None else options.awq_grid
    if awq_grid < 1:
        raise ExportError(f"--awq-grid {awq_grid} must be at least 1")
    samples = options.calib_samples or DEFAULT_SAMPLES
    seq_len = options.calib_seq_len or DEFAULT_SEQ_LEN
    if samples < 1 or seq_len < 16:
        raise ExportError(f"calibration needs --calib-samples >= 1 and --calib-seq-len >= 16 "
                          f"(got {samples}, {seq_len})")
    return {"method": method, "preset": options.quant if preset else None,
            "mix_calibration": preset.get("mix_calibration", False), "bits": bits, "group_size": group_size,
            "sym": options.sym,
            "samples": samples, "seq_len": seq_len, "alpha": alpha, "lm_head": LM_HEAD[lm_head_bits],
            "gptq": GPTQConfig(percdamp=damp, act_order=options.act_order is not False),
            "awq": awq_.AWQConfig(n_grid=awq_grid)}


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


def quantize(loaded, family, arch, weights: dict, options, say: Callable[[str], None]) -> tuple[dict, dict | None]:
    """Quantize the decoder's Linears of `loaded.model` (walked as `family` describes them) as
    `options` asks.

    Returns the weights for family.describe (quantized Linears are nbits objects, keyed by their
    state_dict names) and the manifest's `quantization` record. With no method, returns
    `weights` unchanged and None. The model's own parameters are replaced (never changed in
    place) by their quantized values, so `weights` stays fp32.
    """
    if options.quant in (None, "none"):
        return weights, None
    cfg = resolve(options)
    method = cfg["method"]
    model = loaded.model
    check_applicable(family, method)
    spec = QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"])
    t0 = time.perf_counter()
    torch.manual_seed(options.seed)

    calib = None
    if method in ("gptq", "awq", "smoothquant"):
        calib = calibration_ids(loaded.tokenizer, options.calib, cfg["samples"], cfg["seq_len"], options.seed,
                                mix_default=cfg["mix_calibration"])
        say(f"      calibration: {cfg['samples']} x {cfg['seq_len']} tokens from {calib.source}")

    layers = model.get_submodule(family.decoder_layers)
    inputs = layerwise.inputs_of(family.linears)
    out = dict(weights)
    hidden, kwargs = (None, None) if calib is None else layerwise.first_layer_inputs(model, layers[0], calib.ids)
    gptq_config, awq_config, alpha = cfg["gptq"], cfg["awq"], cfg["alpha"]
    for i, layer in enumerate(layers):
        t = time.perf_counter()
        feats, fp_out = (None, None) if hidden is None else layerwise.linear_inputs(layer, inputs, hidden, kwargs)
        if method == "rtn":
            quantized = {path: rtn(layer.get_submodule(path).weight.data, spec) for path in family.linears}
        elif method == "gptq":
            quantized = _gptq_layer(layer, family, feats, spec, gptq_config)
        elif method == "awq":
            with single_thread():  # many small ops per grid point (see gptq.single_thread): 6x faster measured
                quantized = _awq_layer(layer, family, feats, kwargs, spec, awq_config)
        elif method == "smoothquant":
            _smooth_layer(layer, family, feats, alpha)
            quantized = {path: quantize_w8a8(layer.get_submodule(path).weight.data, "per_token")
                         for path in family.linears}
        else:  # w8a8 without smoothing, activations per tensor: the baseline of the SmoothQuant paper
            quantized = {path: quantize_w8a8(layer.get_submodule(path).weight.data, "per_tensor")
                         for path in family.linears}
        for path, q in quantized.items():  # the layer as the device will run it
            layer.get_submodule(path).weight.data = torch.from_numpy(q.dequantize().copy())
        store_layer(out, f"{family.decoder_layers}.{i}", layer, quantized)
        if hidden is not None:
            del feats
            # GPTQ: the next layer sees this one quantized; AWQ and SmoothQuant: the fp32 outputs
            hidden = layerwise.run_layer(layer, hidden, kwargs) if method == "gptq" else fp_out
        say(f"      layer {i + 1}/{len(layers)} {method} ({time.perf_counter() - t:.1f}s)")

    head = cfg["lm_head"]
    store_embeddings(out, weights, family, head)
    record = {
        "method": method,
        **({"preset": cfg["preset"]} if cfg["preset"] else {}),
        "weights": f"int{cfg['bits']}",
        "bits": cfg["bits"],
        "group_size": cfg["group_size"],
        "symmetric": True if method in ("smoothquant", "w8a8") else cfg["sym"],
        "operator": {"smoothquant": "MatMulInteger", "w8a8": "DynamicQuantizeMatMul"}.get(method, "MatMulNBits"),
        "accuracy_level": None if method in ("smoothquant", "w8a8") else ACCURACY_LEVEL_INT8,
        "activations": {"smoothquant": "int8, dynamic per token", "w8a8": "uint8, dynamic per tensor"}.get(
            method, "float32"),
        "calibration": None if calib is None else calib.record(),
        "embedding": "float16 Gather + Cast",
        "lm_head": (f"int{head.bits} {f'g{head.group_size}' if head.group_size else 'per-channel'} "
                    "MatMulNBits (accuracy_level 4)")
                   + (", a quantized copy of the tied embedding" if arch.tie_word_embeddings else ""),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if method == "gptq":
        record.update(percdamp=gptq_config.percdamp, act_order=gptq_config.act_order,
                      lazy_block=gptq_config.block_size, sink_weight=gptq_config.sink_weight, mse=gptq_config.mse)
    elif method == "awq":
        record.update(n_grid=awq_config.n_grid, search_tokens=awq_config.search_tokens, clip=awq_config.clip)
    elif method == "smoothquant":
        record.update(alpha=alpha, smoothed=", ".join(f"{g.prev}->{'/'.join(g.linears)}"
                                                     for g in family.scale_groups))
    return out, record


def _gptq_layer(layer, family, feats: dict, spec: QuantSpec, config: GPTQConfig) -> dict:
    """GPTQ treats rows independently given the Hessian of their input, so the Linears that
    share an input (q/k/v, gate/up) run as one stacked weight: one column loop instead of three."""
    quantized = {}
    for key, paths in layerwise.readers(family.linears).items():
        ws = [layer.get_submodule(p).weight.data for p in paths]
        q = gptq(torch.cat(ws), hessian(feats[key], config.sink_weight), spec, config)
        r = np.cumsum([0] + [w.shape[0] for w in ws])
        quantized.update({p: q.take_rows(np.arange(r[j], r[j + 1])) for j, p in enumerate(paths)})
    return quantized


def _scale_groups(layer, family, feats: dict) -> list[tuple]:
    """The family's scale groups as (prev module, Linears, their input) that apply to this layer:
    a Linear feeding Linears needs its output rows to be their input channels (not so for v_proj
    and o_proj under grouped-query attention)."""
    groups = []
    for sg in family.scale_groups:
        prev, fcs = layer.get_submodule(sg.prev), [layer.get_submodule(p) for p in sg.linears]
        if isinstance(prev, torch.nn.Linear) and prev.out_features != fcs[0].in_features:
            continue
        groups.append((sg, prev, fcs, feats[family.linears[sg.linears[0]]]))
    return groups


def _awq_layer(layer, family, feats: dict, kwargs: layerwise.LayerKwargs, spec: QuantSpec, config) -> dict:
    """Scale search and apply, then clip search, then RTN of the scaled, clipped weights."""
    inputs = {}
    for sg, prev, fcs, x in _scale_groups(layer, family, feats):
        group = awq_.ScaleGroup(prev, fcs, x, layerwise.scorer(layer, sg.scored, kwargs), family.norm_offset)
        awq_.apply_scale(group, awq_.search_scale(group, spec, config))
        for fc in fcs:
            inputs[fc] = group.x
    quantized = {}
    for path, key in family.linears.items():
        fc = layer.get_submodule(path)
        w = fc.weight.data
        if config.clip and path not in family.no_clip:
            x = inputs.get(fc, feats[key])
            w = awq_.search_clip(w, x.reshape(-1, x.shape[-1]), spec, config)
        quantized[path] = rtn(w, spec)
    return quantized


def _smooth_layer(layer, family, feats: dict, alpha: float) -> None:
    def act_max(x: torch.Tensor) -> torch.Tensor:
        return x.abs().reshape(-1, x.shape[-1]).amax(0)

    for sg, prev, fcs, x in _scale_groups(layer, family, feats):
        if sg.smooth:
            smooth(prev, fcs, act_max(x), alpha, family.norm_offset)


def store_layer(out: dict, p: str, layer, quantized: dict) -> None:
    """Put layer `p`'s entries into `out`: the quantized Linears, and every other parameter (norms
    and biases, possibly rescaled by AWQ or SmoothQuant) as a fresh fp32 copy."""
    for path, q in quantized.items():
        out[f"{p}.{path}.weight"] = q
    for name, param in layer.named_parameters():
        if name.removesuffix(".weight") not in quantized:
            out[f"{p}.{name}"] = param.detach().numpy().copy()


def store_embeddings(out: dict, weights: dict, family, head_spec: QuantSpec = LM_HEAD[8]) -> None:
    """The embedding as float16 and the lm_head quantized by `head_spec` (see the module docstring)."""
    embed = weights[f"{family.embed_tokens}.weight"]
    head = weights.get(f"{family.lm_head}.weight", embed)  # absent when tied
    out[f"{family.lm_head}.weight"] = rtn(torch.from_numpy(np.asarray(head)), head_spec)
    out[f"{family.embed_tokens}.weight"] = np.asarray(embed).astype(np.float16)
