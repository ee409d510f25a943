"""One decoder layer quantized by each method: the functions edgekit/quantization.py's rows name.

    quantize_layer(layer, family, feats, kwargs, plan) -> {Linear path: quantized weight}

`feats` are the calibration inputs of the layer's Linears (None for methods that calibrate
nothing), `kwargs` what the layer's forward takes besides the hidden states.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekit.host.quant import awq as awq_
from edgekit.host.quant import layerwise
from edgekit.host.quant.calibration import default_text_rows
from edgekit.host.quant.gptq import gptq, hessian, single_thread
from edgekit.host.quant.plan import QuantPlan
from edgekit.host.quant.rtn import rtn
from edgekit.host.quant.smoothquant import smooth
from edgekit.host.quant.w8a8 import quantize_w8a8


def rtn_layer(layer, family, feats, kwargs, plan: QuantPlan) -> dict:
    return {path: rtn(layer.get_submodule(path).weight.data, plan.spec_for(key))
            for path, key in family.linears.items()}


def gptq_layer(layer, family, feats: dict, kwargs, plan: QuantPlan) -> dict:
    """GPTQ treats rows independently given the Hessian of their input, so the Linears that
    share an input (q/k/v, gate/up) run as one stacked weight: one column loop instead of three."""
    config = plan.gptq
    quantized = {}
    for key, paths in layerwise.readers(family.linears).items():
        ws = [layer.get_submodule(p).weight.data for p in paths]
        q = gptq(torch.cat(ws), hessian(feats[key], config.sink_weight), plan.spec_for(key), config)
        r = np.cumsum([0] + [w.shape[0] for w in ws])
        quantized.update({p: q.take_rows(np.arange(r[j], r[j + 1])) for j, p in enumerate(paths)})
    return quantized


def awq_layer(layer, family, feats: dict, kwargs: layerwise.LayerKwargs, plan: QuantPlan) -> dict:
    """Scale search and apply, then clip search, then RTN of the scaled, clipped weights, then
    their scales fitted to the codes (the clip search and the fit score on the Hessian GPTQ would use)."""
    config = plan.awq
    inputs = {}
    with single_thread():  # many small ops per grid point (see gptq.single_thread): 6x faster measured
        for sg, prev, fcs, x, channels in scale_groups(layer, family, feats):
            group = awq_.ScaleGroup(prev, fcs, x, layerwise.scorer(layer, sg.scored, kwargs), family.norm_offset,
                                    channels, default_text_rows(len(x), plan.calib, plan.method.mixed_calibration))
            awq_.apply_scale(group, awq_.search_scale(group, plan.spec_for(family.linears[sg.linears[0]]), config))
            for fc in fcs:
                inputs[fc] = group.x
        quantized, hessians = {}, {}
        for path, key in family.linears.items():
            fc, spec = layer.get_submodule(path), plan.spec_for(key)
            w, x = fc.weight.data, inputs.get(fc, feats[key])
            if id(x) not in hessians:  # q/k/v and gate/up share one input
                hessians[id(x)] = hessian(x, plan.gptq.sink_weight)
            clipped = w
            if config.clip and path not in family.no_clip:
                clipped = awq_.search_clip(w, hessians[id(x)], spec, config)
            q = rtn(clipped, spec)
            if config.fit:
                q = awq_.fit_scales(w, hessians[id(x)], q, plan.gptq.percdamp)
            quantized[path] = q
    return quantized


def smooth_layer(layer, family, feats: dict, kwargs, plan: QuantPlan) -> dict:
    """Migrate the activations' outliers into the weights, then int8 weights for int8-per-token activations."""
    for sg, prev, fcs, x, channels in scale_groups(layer, family, feats):
        if sg.smooth and channels is None:
            act_max = x.abs().reshape(-1, x.shape[-1]).amax(0)  # (K,)
            smooth(prev, fcs, act_max, plan.alpha, family.norm_offset)
    return {path: quantize_w8a8(layer.get_submodule(path).weight.data, "per_token") for path in family.linears}


def w8a8_layer(layer, family, feats, kwargs, plan: QuantPlan) -> dict:
    """int8 weights, activations per tensor, no smoothing: the baseline of the SmoothQuant paper."""
    return {path: quantize_w8a8(layer.get_submodule(path).weight.data, "per_tensor") for path in family.linears}


def settings_record(family, plan: QuantPlan) -> dict:
    """The settings of the method's algorithm, for the manifest's quantization record."""
    if plan.method.layer == "gptq_layer":
        c = plan.gptq
        return dict(percdamp=c.percdamp, act_order=c.act_order, lazy_block=c.block_size, sink_weight=c.sink_weight,
                    mse=c.mse)
    if plan.method.layer == "awq_layer":
        a = plan.awq
        return dict(n_grid=a.n_grid, search_tokens=a.search_tokens, clip=a.clip, clip_passes=a.clip_passes, fit=a.fit)
    if plan.method.layer == "smooth_layer":
        return dict(alpha=plan.alpha, smoothed=", ".join(f"{g.prev}->{'/'.join(g.linears)}"
                                                        for g in family.scale_groups))
    return {}


def scale_groups(layer, family, feats: dict) -> list[tuple]:
    """The family's scale groups as (prev module, Linears, their input, channels) that apply to this
    layer. A Linear feeding Linears needs each of their input channels to be one of its output
    channels: the same one, or under grouped-query attention (v_proj -> o_proj) the kv channel a
    query head's channel repeats, which `channels` (K,) then names (see awq.ScaleGroup)."""
    groups = []
    for sg in family.scale_groups:
        prev, fcs = layer.get_submodule(sg.prev), [layer.get_submodule(p) for p in sg.linears]
        channels = None
        if isinstance(prev, torch.nn.Linear) and prev.out_features != fcs[0].in_features:
            channels = repeated_kv_channels(family, prev.out_features, fcs[0].in_features)
            if channels is None:
                continue
        groups.append((sg, prev, fcs, feats[family.linears[sg.linears[0]]], channels))
    return groups


def repeated_kv_channels(family, kv_features: int, in_features: int) -> torch.Tensor | None:
    """o_proj's input channel h * head_size + d -> the v_proj channel (h // n_rep) * head_size + d
    it reads (transformers' repeat_kv), when the shapes are those of grouped-query attention."""
    heads, kv_heads, size = family.num_heads, family.num_kv_heads, family.head_size
    if kv_features != kv_heads * size or in_features != heads * size or heads % kv_heads:
        return None
    c = torch.arange(in_features)
    return (c // size) // (heads // kv_heads) * size + c % size
