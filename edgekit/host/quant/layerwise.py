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

import torch

# The Linears of a Llama-family layer, and which shared input each one reads.
LINEARS = {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# the module whose input is recorded for each shared input
INPUT_OF = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
            "down_in": "mlp.down_proj"}


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states (N, L, hidden) entering layer 0 and the keyword arguments the model
    passes to every layer (rotary cos/sin, mask), captured by stopping the model there."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "use_cache", "hidden_states")}
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
def linear_inputs(layer, hidden: torch.Tensor, kwargs: dict, chunk: int = 8) -> tuple[dict, torch.Tensor]:
    """The inputs of the layer's Linears while it runs on `hidden`: {"attn_in", "o_in", "mlp_in",
    "down_in"} -> (N, L, in_features), and the layer's output (N, L, hidden)."""
    got: dict[str, list] = {k: [] for k in INPUT_OF}
    handles = [layer.get_submodule(path).register_forward_pre_hook(
        lambda m, args, key=key: got[key].append(args[0].detach())) for key, path in INPUT_OF.items()]
    try:
        out = run_layer(layer, hidden, kwargs, chunk)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}, out


def attention_block(layer, kwargs: dict):
    """x (S, L, hidden) -> self_attn(x) with the model's rotary cos/sin and mask, for AWQ's loss."""
    def block(x: torch.Tensor) -> torch.Tensor:
        kw = {k: v[: x.shape[0]] if isinstance(v, torch.Tensor) and v.dim() > 2 and v.shape[0] > 1 else v
              for k, v in kwargs.items()}  # a per-sample mask follows x's first samples
        return layer.self_attn(hidden_states=x, position_embeddings=kw.get("position_embeddings"),
                               attention_mask=kw.get("attention_mask"))[0]
    return block
