"""A decoder-only transformer as the graph builder sees it: plain data, in Llama's vocabulary.

A family (host/families/) reads a transformers model into this description; the graph
builder (host/graph/) turns the description into ONNX, in either flavour. Neither knows
the other, so a family never emits an operator and a flavour never reads a checkpoint.

    Decoder
      embed[ids] ──► × embed_scale ──► embed_norm ──► + positions[pos] ──► project_in
      layers[i]:  Layer = norms + Attention + MLP, and how they are arranged
      final_norm ──► project_out ──► lm_head (or the tied embedding) ──► × logits_scale ──► softcap

Conventions every family delivers:
- Linear weights are (out, in), as transformers stores them: fp32 arrays, or quantized
  weights from host/quant (nbits.py); `rows`/`stack_rows`/`scale_rows` work on either.
- q, k and v come packed in one Linear, q's heads first, then k's, then v's; query head h
  reads kv head h // (num_heads / num_kv_heads).
- Rotary embedding is always rotate-half over the whole head, as GroupQueryAttention does it:
  dims (i, i + head_size / 2) form a pair. A family with partial or interleaved rotary
  permutes each q and k head into that layout (`rotate_half_order`) and pads its cos/sin
  tables with cos = 1, sin = 0 for the dims that are not rotated. A permutation of a head's
  dims applied to both q and k leaves q·k unchanged, so the model computes the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekit.device.bundle import Architecture
from edgekit.host.quant.nbits import NBitsWeight, W8A8Weight

Weight = np.ndarray | NBitsWeight | W8A8Weight  # a Linear's (out, in) weight, fp32 or quantized


@dataclass
class Linear:
    """y = x @ weight.T + bias"""

    weight: Weight
    bias: np.ndarray | None = None


@dataclass
class Norm:
    """RMSNorm (x / rms(x) * weight) or LayerNorm ((x - mean) / std * weight + bias) over the last axis."""

    name: str  # the module's name in the checkpoint; the graph names its initializers after it
    weight: np.ndarray  # what multiplies: Gemma's (1 + w) comes here already added
    bias: np.ndarray | None = None
    eps: float = 1e-6
    rms: bool = True


@dataclass
class Rotary:
    """cos and sin (positions, head_size / 2) in the rotate-half layout (see the module docstring).

    LongRoPE (Phi-3) has a second pair that applies to a whole run once it reaches past
    `switch_at` positions, as transformers switches from its short to its long factors.
    """

    cos: np.ndarray
    sin: np.ndarray
    long: tuple[np.ndarray, np.ndarray] | None = None
    switch_at: int = 0


@dataclass
class Attention:
    qkv: Linear  # packed (num_heads + 2 num_kv_heads) * head_size rows
    o_proj: Linear
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float  # applied to q·k
    rotary: str | None = "default"  # a key of Decoder.rotary; None: no rotary (NoPE, ALiBi, learned positions)
    window: int | None = None  # sliding window: a query sees this many keys, itself included
    softcap: float | None = None  # scores <- softcap * tanh(scores / softcap) (Gemma 2)
    # norms of q and k before rotary: per head, one weight of head_size (Qwen3, Gemma 3) or one per
    # head, (heads, head_size) (StableLM's LayerNorm per head); or over the whole projection, a weight
    # of heads * head_size (OLMo 2)
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    # ALiBi (BLOOM, MPT, Falcon): (num_heads, context_length), score += alibi[head, key position]; a table
    # rather than slopes so that a family reproduces its reference's rounding (Falcon's is bfloat16)
    alibi: np.ndarray | None = None
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] (MPT)


@dataclass
class MLP:
    """down(act(gate(x)) * up(x)) when gated, else down(act(up(x)))."""

    up: Linear
    down: Linear
    gate: Linear | None = None
    act: str = "silu"  # silu | gelu (erf) | gelu_tanh | relu


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class Layer:
    """One decoder layer. The arrangement, with h the residual stream:

        sequential (default)   h = h + attn_out_norm(attention(attn_norm(h)))
                               h = h + mlp_out_norm(mlp(mlp_norm(h)))
        parallel               h = h + attention(attn_norm(h)) + mlp(mlp_norm(h))
                               (mlp_norm None: the MLP reads attn_norm(h) too, GPT-J, Falcon)
        post_norm              h = attn_norm(h + attention(h));  h = mlp_norm(h + mlp(h))   (OPT-350m)

    A norm that is None is skipped (OLMo 2's attention reads h itself).
    """

    attention: Attention
    mlp: MLP
    attn_norm: Norm | None
    mlp_norm: Norm | None
    attn_out_norm: Norm | None = None  # Gemma 2/3, OLMo 2, GLM-4
    mlp_out_norm: Norm | None = None
    parallel: bool = False
    post_norm: bool = False


@dataclass
class Decoder:
    arch: Architecture  # the manifest's shape numbers
    embed: np.ndarray | NBitsWeight  # (vocab, hidden) float32, or int8 per channel in quantized bundles
    layers: list[Layer]
    final_norm: Norm | None
    lm_head: Linear | None  # None: tied to the embedding
    tied_lm_head_bias: np.ndarray | None = None  # (vocab,) a tied lm_head's own bias (GPT-J)
    rotary: dict[str, Rotary] = field(default_factory=dict)
    embed_name: str = "model.embed_tokens"  # the checkpoint's name, for the initializer
    embed_scale: float = 1.0  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    embed_norm: Norm | None = None  # BLOOM
    positions: np.ndarray | None = None  # (context, hidden) learned absolute positions (OPT)
    project_in: Linear | None = None  # OPT when word_embed_proj_dim != hidden_size
    project_out: Linear | None = None
    logits_scale: float = 1.0  # Granite: 1 / logits_scaling
    logits_softcap: float | None = None  # Gemma 2
    # the order rotate_half_order gave each q and k head (None: as stored); the runtime's
    # baked-in prefix keys (prefix tuning) are permuted the same way
    head_order: np.ndarray | None = None


# -- Linear weights, fp32 or quantized: the same row operations on both ---------------------------


def rows(w: Weight, index: np.ndarray) -> Weight:
    """The rows (output features) `index` of `w`, in that order."""
    return w[index] if isinstance(w, np.ndarray) else w.take_rows(index)


def stack_rows(ws: list[Weight]) -> Weight:
    """Weights of one kind stacked along the output dimension (q, k, v -> qkv)."""
    arrays = [w for w in ws if isinstance(w, np.ndarray)]
    nbits = [w for w in ws if isinstance(w, NBitsWeight)]
    w8a8 = [w for w in ws if isinstance(w, W8A8Weight)]
    if len(arrays) == len(ws):
        return np.concatenate(arrays, axis=0)
    if len(nbits) == len(ws):
        return NBitsWeight.stack(nbits)
    if len(w8a8) == len(ws):
        return W8A8Weight.stack(w8a8)
    raise TypeError(f"cannot stack weights of different kinds: {sorted({type(w).__name__ for w in ws})}")


def scale_rows(w: Weight, factor: float | np.ndarray) -> Weight:
    """`w` with each output row multiplied by `factor` (a scalar or one per row)."""
    if isinstance(w, np.ndarray):
        f = np.asarray(factor, np.float32)
        return (w * (f[:, None] if f.ndim else f)).astype(w.dtype)
    return w.scale_rows(factor)


def out_features(w: Weight) -> int:
    return w.shape[0] if isinstance(w, np.ndarray) else w.out_features


def stack_linears(parts: list[Linear]) -> Linear:
    """Linears stacked along the output dimension; a missing bias counts as zeros."""
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(out_features(p.weight), np.float32)
                               for p in parts])
    return Linear(stack_rows([p.weight for p in parts]), bias)


def take_linear(lin: Linear, index: np.ndarray) -> Linear:
    return Linear(rows(lin.weight, index), None if lin.bias is None else lin.bias[index])


def rotate_half_order(head_size: int, rotary_dim: int, interleaved: bool) -> np.ndarray:
    """The order of one head's dims that puts each rotary pair at (i, i + head_size / 2).

        rotate-half, rotary_dim r:  pairs (i, i + r/2), i < r/2; dims r.. pass through
        interleaved:                pairs (2i, 2i + 1), i < r/2

    Returned: [first of each pair, first half of the pass-through dims, second of each pair,
    second half of the pass-through dims], so that the pass-through dims pair with each other,
    where the padded table has cos = 1 and sin = 0 (x * 1 + y * 0 = x exactly).
    """
    assert rotary_dim % 2 == 0 and (head_size - rotary_dim) % 2 == 0, (head_size, rotary_dim)
    if interleaved:
        first, second = np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)
    else:
        first, second = np.arange(rotary_dim // 2), np.arange(rotary_dim // 2, rotary_dim)
    rest = np.arange(rotary_dim, head_size)
    half = len(rest) // 2
    return np.concatenate([first, rest[:half], second, rest[half:]])


def per_head(order: np.ndarray, heads: int) -> np.ndarray:
    """A per-head dim order, applied to every head of a (heads * head_size) projection."""
    head_size = len(order)
    return (np.arange(heads)[:, None] * head_size + order[None, :]).reshape(-1)


def pad_rotary(cos: np.ndarray, sin: np.ndarray, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, rotary_dim / 2) tables widened to head_size / 2 with cos = 1, sin = 0."""
    n, half = cos.shape
    if 2 * half == head_size:
        return cos.astype(np.float32), sin.astype(np.float32)
    pad = head_size // 2 - half
    return (np.concatenate([cos, np.ones((n, pad))], axis=1).astype(np.float32),
            np.concatenate([sin, np.zeros((n, pad))], axis=1).astype(np.float32))
