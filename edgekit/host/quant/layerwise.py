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


class LayerKwargs:
    """The keyword arguments the model passes to each layer (rotary cos/sin, mask, ALiBi) for a
    batch of b samples. Calibration samples have no padding, so they depend on b only; they are
    captured once per batch size by running the model up to its first layer."""

    def __init__(self, model, first_layer, ids: torch.Tensor):
        self.model, self.first_layer, self.ids = model, first_layer, ids
        self.by_batch: dict[int, dict] = {}

    def __call__(self, b: int) -> dict:
        if b not in self.by_batch:
            self.by_batch[b] = _capture(self.model, self.first_layer, self.ids[:b])[1]
        return self.by_batch[b]


@torch.no_grad()
def _capture(model, module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering `module` and its other keyword arguments when `model` runs on
    `ids`; the run stops there."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items()
              if k not in ("past_key_values", "cache", "layer_past", "use_cache", "hidden_states")}
    return captured["hidden"], kwargs


def first_layer_inputs(model, first_layer, ids: torch.Tensor) -> tuple[torch.Tensor, LayerKwargs]:
    """The hidden states (N, L, hidden) entering `first_layer`, and the layers' keyword arguments."""
    hidden, kwargs = _capture(model, first_layer, ids)
    layer_kwargs = LayerKwargs(model, first_layer, ids)
    layer_kwargs.by_batch[ids.shape[0]] = kwargs
    return hidden, layer_kwargs


@torch.no_grad()
def run_layer(layer, hidden: torch.Tensor, kwargs: LayerKwargs, chunk: int = 8) -> torch.Tensor:
    """layer(hidden) for all N samples, `chunk` at a time; (N, L, hidden)."""
    out = []
    for lo in range(0, hidden.shape[0], chunk):
        x = hidden[lo:lo + chunk]
        y = layer(x, **kwargs(x.shape[0]))
        out.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat(out)


@torch.no_grad()
def linear_inputs(layer, inputs: dict[str, str], hidden: torch.Tensor, kwargs: LayerKwargs,
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
    # (N, L, in) each; a layer that flattens tokens before a Linear (OPT's MLP) gives (N * L, in)
    return {k: torch.cat(v).reshape(-1, hidden.shape[1], v[0].shape[-1]) for k, v in got.items()}, out


def head_inputs(model, ids: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """The input of the model's lm_head (N, L, in) on the samples `ids` (N, L), as the model now
    computes it (its layers quantized): the whole model runs, `chunk` samples at a time, and
    stops at the lm_head (_capture), so no (N, L, vocab) logits are made."""
    head = model.get_output_embeddings()
    return torch.cat([_capture(model, head, ids[lo:lo + chunk])[0] for lo in range(0, ids.shape[0], chunk)])


def scorer(layer, paths: tuple[str, ...], kwargs: LayerKwargs):
    """x (S, L, in) -> the sum of the outputs of the modules `paths` of `layer` run on x, for AWQ's
    loss. A module whose forward takes more than x (attention: rotary cos/sin, mask, ALiBi) gets
    those of the layer's keyword arguments it names; one that adds the residual itself (BLOOM's and
    MPT's attention and MLP take `residual`) gets zeros, so that only its own output is scored."""
    modules = [layer.get_submodule(p) for p in paths]
    names = [set(inspect.signature(m.forward).parameters) for m in modules]

    def score(x: torch.Tensor) -> torch.Tensor:
        kw = kwargs(x.shape[0])
        total = None
        for module, accepts in zip(modules, names, strict=True):
            extra = {"residual": torch.zeros_like(x)} if "residual" in accepts else {}
            y = module(x, **{k: v for k, v in kw.items() if k in accepts}, **extra)
            y = y[0] if isinstance(y, tuple) else y
            total = y if total is None else total + y
        assert total is not None  # a scored group has at least one module
        return total
    return score
