"""Run a transformers decoder one layer at a time over the calibration samples.

Only one layer's inputs (N, L, hidden) and the inputs of its Linears are alive at a time,
so calibration costs one fp32 model plus one layer's activations, whatever the depth:

    ids ──► embed ──► h_0 ──► layer 0 ──► h_1 ──► layer 1 ──► ...
                              (collect its Linears' inputs, quantize it,
                               then run it again, quantized, to get h_1)

GPTQ runs each layer twice, so that the next layer sees the outputs of the already
quantized layers and corrects for their errors (as its paper does). AWQ and SmoothQuant
change a layer without changing what it computes in fp32 (before rounding), and their
papers pass the fp32 outputs on: one run per layer.
"""

from __future__ import annotations

import inspect

import torch


def readers(linears: dict[str, str]) -> dict[str, list[str]]:
    """input key -> the Linears (module paths in a layer) that read it, in the family's order."""
    out: dict[str, list[str]] = {}
    for path, key in linears.items():
        out.setdefault(key, []).append(path)
    return out


def inputs_of(linears: dict[str, str]) -> dict[str, str]:
    """input key -> the module whose input is recorded for it (the first Linear that reads it)."""
    return {key: paths[0] for key, paths in readers(linears).items()}


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, first_layer, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states (N, L, hidden) entering `first_layer` and the keyword arguments the model
    passes to every layer (rotary cos/sin, mask, ALiBi), captured by stopping the model there."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items()
              if k not in ("past_key_values", "cache", "layer_past", "use_cache", "hidden_states")}
    return captured["hidden"], kwargs


def _rows(kwargs: dict, n: int, lo: int, hi: int) -> dict:
    """kwargs for samples lo:hi: tensors with a batch dimension of n are sliced (a mask)."""
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 2 and v.shape[0] == n > 1 else v
            for k, v in kwargs.items()}


@torch.no_grad()
def run_layer(layer, hidden: torch.Tensor, kwargs: dict, chunk: int = 8) -> torch.Tensor:
    """layer(hidden) for all N samples, `chunk` at a time; (N, L, hidden)."""
    n = hidden.shape[0]
    out = []
    for lo in range(0, n, chunk):
        y = layer(hidden[lo:lo + chunk], **_rows(kwargs, n, lo, lo + chunk))
        out.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat(out)


@torch.no_grad()
def linear_inputs(layer, inputs: dict[str, str], hidden: torch.Tensor, kwargs: dict,
                  chunk: int = 8) -> tuple[dict, torch.Tensor]:
    """The inputs of the layer's Linears while it runs on `hidden`: for each key of `inputs`
    (inputs_of) -> (N, L, in_features), and the layer's output (N, L, hidden)."""
    got: dict[str, list] = {k: [] for k in inputs}
    handles = [layer.get_submodule(path).register_forward_pre_hook(
        lambda m, args, key=key: got[key].append(args[0].detach())) for key, path in inputs.items()]
    try:
        out = run_layer(layer, hidden, kwargs, chunk)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}, out


def scorer(layer, paths: tuple[str, ...], kwargs: dict):
    """x (S, L, in) -> the sum of the outputs of the modules `paths` of `layer` run on x, for AWQ's
    loss. A module whose forward takes more than x (attention: rotary cos/sin, mask, ALiBi) gets
    those of the layer's keyword arguments it names."""
    modules = [layer.get_submodule(p) for p in paths]
    names = [set(inspect.signature(m.forward).parameters) for m in modules]

    def score(x: torch.Tensor) -> torch.Tensor:
        kw = {k: v[: x.shape[0]] if isinstance(v, torch.Tensor) and v.dim() > 2 and v.shape[0] > 1 else v
              for k, v in kwargs.items()}  # a per-sample mask follows x's first samples
        total = None
        for module, accepts in zip(modules, names):
            y = module(x, **{k: v for k, v in kw.items() if k in accepts})
            y = y[0] if isinstance(y, tuple) else y
            total = y if total is None else total + y
        return total
    return score
