"""Llama, Mistral, Qwen2: the layout every other family is described against.

    embed_tokens ──► layers × (input_layernorm ─► self_attn ─► + ─► post_attention_layernorm ─► mlp ─► +)
                 ──► norm ──► lm_head

RMSNorm, rotary embedding (every scaling transformers implements for Llama, from the model's
own rotary module), grouped-query attention, an optional sliding window (Mistral; per layer
where the config has layer_types), SiLU-gated MLP, optional biases (Qwen2's q/k/v).

A family file subclasses `Llama` and overrides only what differs: where a weight lives
(`qkv`, `mlp`), how a layer is arranged (`layer`), a norm's kind (`norm`), the rotary
tables (`rotary`), the attention's settings (`attention`). The class attributes name the
checkpoint's modules for quantization (layer by layer) and adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgekit.device.bundle import Architecture
from edgekit.errors import ExportError
from edgekit.host.decoder import (
    ACTIVATIONS,
    MLP,
    Attention,
    Decoder,
    Layer,
    Linear,
    Norm,
    Rotary,
    pad_rotary,
    per_head,
    rotate_half_order,
    stack_linears,
    take_linear,
)
from edgekit.host.load import CausalLM

DEFAULT_CONTEXT = 2048
# transformers' hidden_act names -> the graph's activations (host/decoder.py ACTIVATIONS)
ACTIVATION_OF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                 "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# one rotary's tables, as Llama.rotary gives them: cos, sin, the long pair or None (LongRoPE), the switch position
RotaryTables = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, int]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and the op that produces it (AWQ and SmoothQuant fold a
    per-channel scale into `prev` and its inverse into the Linears). AWQ scores a candidate
    scale on the output of `scored` (module paths in the layer; their outputs are summed)."""

    prev: str
    linears: tuple[str, ...]
    scored: tuple[str, ...]
    smooth: bool = True  # SmoothQuant uses it too


class Llama:
    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")
    # -- where things are in the checkpoint (module paths) ---------------------------------------
    decoder_layers = "model.layers"
    embed_tokens = "model.embed_tokens"
    final_norm = "model.norm"
    lm_head = "lm_head"
    rotary_module = "model.rotary_emb"
    attention_module = "self_attn"  # in a layer
    o_proj = "o_proj"  # in the attention module
    positions = "rope"  # rope | alibi | learned: what the manifest says the model uses
    grouped_kv = True  # reads num_key_value_heads; False: every head has its own k and v
    reads_head_dim = True  # config.head_dim sets the head size; False: always hidden_size / heads, as transformers
    # a layer's Linears and the input each reads: GPTQ builds one Hessian per input
    linears = {
        "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
        "self_attn.o_proj": "o_in",
        "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
        "mlp.down_proj": "down_in",
    }
    scale_groups: tuple[ScaleGroup, ...] = (
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn",)),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ("self_attn.o_proj",), smooth=False),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), ("mlp",)),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), ("mlp.down_proj",)),
    )
    rms_norm = True  # False: LayerNorm (mean subtracted, usually with a bias)
    # AWQ does not clip these: errors in q and k compound in q k^T (as AWQ's reference)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    norm_offset = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    rotary_interleaved = False  # GPT-J, GLM rotate pairs (2i, 2i + 1)

    def __init__(self, model: torch.nn.Module):
        self.model: Any = model  # a transformers CausalLM: its config and submodules resolve at run time
        self.config: Any = model.config
        self.w: dict = {}  # state_dict name -> fp32 array or quantized weight, while describing

    # -- what is supported --------------------------------------------------------------------

    @classmethod
    def check(cls, config) -> None:
        """Refuse, with one line naming it, a setting of this family the graph does not implement."""
        act = cls.hidden_act(config)
        if act not in ACTIVATION_OF:
            raise ExportError(f"{config.model_type}: hidden_act {act!r} is not supported; supported: "
                              f"{', '.join(sorted(ACTIVATION_OF))}")
        rope = rope_parameters(config)
        if rope is not None and rope.get("rope_type", "default") not in ROPE_TYPES:
            raise ExportError(f"{config.model_type}: rope_type {rope['rope_type']!r} is not supported; supported: "
                              f"{', '.join(ROPE_TYPES)}")

    @staticmethod
    def hidden_act(config) -> str:
        return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"

    # -- the shape numbers ----------------------------------------------------------------------

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        if not self.grouped_kv:
            return self.num_heads
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_size(self) -> int:
        return (self.reads_head_dim and getattr(self.config, "head_dim", None)) or \
            self.config.hidden_size // self.num_heads

    @property
    def eps(self) -> float:
        return float(self.config.rms_norm_eps)

    @property
    def intermediate_size(self) -> int:
        """The MLP's width: the input features of the Linear that reads the MLP's activation."""
        down = next(path for path, reads in self.linears.items() if reads == "down_in")
        return self.model.get_submodule(f"{self.decoder_layers}.0.{down}").in_features

    def longest_context(self) -> int:
        """The longest context the graph computes exactly as transformers does."""
        # dynamic rope's frequencies change with the length above max_position_embeddings only
        # (transformers ignores an original_max_position_embeddings there)
        return getattr(self.config, "max_position_embeddings", None) or DEFAULT_CONTEXT

    def longest_forward(self) -> int | None:
        """The longest sequence transformers' forward takes (calibration runs it); None: no limit."""
        return None

    def architecture(self, context_length: int | None = None) -> Architecture:
        """The manifest's shape numbers, with the KV cache at `context_length`."""
        c = self.config
        longest = self.longest_context()
        ctx = context_length or min(DEFAULT_CONTEXT, longest)
        if ctx > longest:
            raise ExportError(f"context length {ctx} exceeds what this model supports ({longest})")
        rope = rope_parameters(c) if self.positions == "rope" else None
        sd = self.model.state_dict()
        return Architecture(
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            vocab_size=self.model.get_input_embeddings().weight.shape[0],
            context_length=ctx,
            rms_norm_eps=self.eps,
            rope_theta=float(rope.get("rope_theta", 10000.0)) if rope else 0.0,
            rope_scaling=None if not rope or rope.get("rope_type", "default") == "default" else
            {k: v for k, v in rope.items() if k != "rope_theta"},
            attention_bias=any(f"{self.decoder_layers}.0.{path}.bias" in sd
                               for path, reads in self.linears.items() if reads == "attn_in"),
            tie_word_embeddings=is_tied(self.model),
            positions=self.positions,
        )

    # -- the description ----------------------------------------------------------------------

    def describe(self, weights: dict, arch: Architecture) -> Decoder:
        """The decoder for the graph builder, from `weights` (state_dict names -> fp32 arrays or
        quantized weights) and the shape numbers `arch`."""
        self.w, self.arch = weights, arch
        tables = self.rotary(arch.context_length)
        self.head_order = self._head_order(tables)
        rotary = {key: Rotary(*pad_rotary(cos, sin, self.head_size), long=long and pad_rotary(*long, self.head_size),
                              switch_at=switch)
                  for key, (cos, sin, long, switch) in tables.items()}
        head = self.w.get(f"{self.lm_head}.weight")  # absent when tied: fp32_weights drops the duplicate
        return Decoder(
            arch=arch, embed=self.w[f"{self.embed_tokens}.weight"], embed_name=self.embed_tokens,
            layers=[self.layer(i) for i in range(arch.num_layers)],
            final_norm=self.final_layer_norm(),
            lm_head=None if head is None else Linear(head, self.w.get(f"{self.lm_head}.bias")),
            tied_lm_head_bias=self.w.get(f"{self.lm_head}.bias") if head is None else None,
            rotary=rotary, head_order=self.head_order,
        )

    def final_layer_norm(self) -> Norm | None:
        return self.norm(self.final_norm)

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(attention=self.attention(i), mlp=self.mlp(i), attn_norm=self.norm(f"{p}.input_layernorm"),
                     mlp_norm=self.norm(f"{p}.post_attention_layernorm"))

    def attention(self, i: int) -> Attention:
        q, k, v = self.qkv(i)
        q_norm, k_norm = self.qk_norms(i)
        if self.head_order is not None:  # partial or interleaved rotary: heads into rotate-half order
            q, k = take_linear(q, per_head(self.head_order, self.num_heads)), \
                take_linear(k, per_head(self.head_order, self.num_kv_heads))
            q_norm, k_norm = (_reorder_norm(nm, self.head_order, self.head_size) for nm in (q_norm, k_norm))
        p = f"{self.decoder_layers}.{i}.{self.attention_module}"
        return Attention(
            qkv=stack_linears([q, k, v]), o_proj=self.linear(f"{p}.{self.o_proj}"),
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
            scale=float(self.head_size ** -0.5), rotary=self.rotary_key(i), window=self.window(i),
            q_norm=q_norm, k_norm=k_norm,
        )

    def qkv(self, i: int) -> list[Linear]:
        """q, k and v as the checkpoint lays them out (heads in order, each head's dims as trained)."""
        p = f"{self.decoder_layers}.{i}.{self.attention_module}"
        return [self.linear(f"{p}.{k}_proj") for k in "qkv"]

    def qk_norms(self, i: int) -> tuple[Norm | None, Norm | None]:
        return None, None

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return MLP(gate=self.linear(f"{p}.gate_proj"), up=self.linear(f"{p}.up_proj"),
                   down=self.linear(f"{p}.down_proj"), act=ACTIVATION_OF[self.hidden_act(self.config)])

    def window(self, i: int) -> int | None:
        """The sliding window of layer i: all layers (Mistral), or those layer_types marks as sliding."""
        c = self.config
        types = getattr(c, "layer_types", None)
        if not getattr(c, "use_sliding_window", True) or types is not None and types[i] != "sliding_attention":
            return None
        window = getattr(c, "sliding_window", None)
        return window if window and window < self.arch.context_length else None

    def rotary_key(self, i: int) -> str | None:
        """Which rotary table layer i uses (None: no rotary)."""
        return "default"

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        """key -> (cos, sin, long tables or None, switch position): (positions, rotary_dim / 2) each, from
        the model's own rotary module, so every rope scaling comes out exactly as transformers has it."""
        return {"default": self.rotary_from_module(context_length)}

    @torch.no_grad()
    def rotary_from_module(self, context_length: int, **kwargs) -> RotaryTables:
        module = self.model.get_submodule(self.rotary_module)
        rope = rope_parameters(self.config, kwargs.get("layer_type")) or {}

        def tables(n: int) -> tuple[np.ndarray, np.ndarray]:
            cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None, :], **kwargs)
            return _half(cos[0].numpy()), _half(sin[0].numpy())

        original = rope.get("original_max_position_embeddings") or 0
        if rope.get("rope_type") == "longrope" and context_length > original:
            # transformers uses the short factors while a run stays within the original length and the
            # long ones for the whole run after; rows past `original` are only read under the long tables
            long = tables(context_length)
            short = tables(original)
            cos = np.concatenate([short[0], long[0][original:]])
            sin = np.concatenate([short[1], long[1][original:]])
            return cos, sin, long, original
        cos, sin = tables(context_length)
        return cos, sin, None, 0

    def _head_order(self, tables: dict[str, RotaryTables]) -> np.ndarray | None:
        """The per-head dim order that puts partial or interleaved rotary pairs where GQA rotates."""
        widths = {2 * t[0].shape[1] for t in tables.values()}
        if not widths:
            return None
        assert len(widths) == 1, f"rotary tables of different widths: {widths}"
        rotary_dim = widths.pop()
        if rotary_dim == self.head_size and not self.rotary_interleaved:
            return None
        if (self.head_size - rotary_dim) % 2:
            raise ExportError(f"{self.config.model_type}: rotary on {rotary_dim} of {self.head_size} dims per head "
                              "leaves an odd number unrotated, which the graph's rotary layout cannot pair")
        return rotate_half_order(self.head_size, rotary_dim, self.rotary_interleaved)

    # -- reading weights ------------------------------------------------------------------------

    def linear(self, path: str) -> Linear:
        return Linear(self.w[f"{path}.weight"], self.w.get(f"{path}.bias"))

    def norm(self, path: str, eps: float | None = None) -> Norm:
        weight = self.w.get(f"{path}.weight")  # absent: a LayerNorm without elementwise affine (some OPTs)
        weight = np.ones(self.config.hidden_size, np.float32) if weight is None else np.asarray(weight, np.float32)
        if self.norm_offset:
            weight = weight + np.float32(self.norm_offset)
        return Norm(path, weight, self.w.get(f"{path}.bias"), self.eps if eps is None else eps, rms=self.rms_norm)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_parameters(config, layer_type: str | None = None) -> dict | None:
    """{"rope_type", "rope_theta", ...} from a transformers 5 (or 4) config; None without rotary."""
    rp = getattr(config, "rope_parameters", None)
    if rp:
        rp = dict(rp)
        if layer_type is not None or all(isinstance(v, dict) for v in rp.values()):  # per layer type (Gemma 3)
            rp = dict(rp.get(layer_type) or next(iter(rp.values())))
        return rp
    rp = dict(getattr(config, "rope_scaling", None) or {})
    rp.setdefault("rope_type", rp.pop("type", "default"))
    rp["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rp


def is_tied(model: CausalLM) -> bool:
    """lm_head and the embedding are one tensor."""
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _half(table: np.ndarray) -> np.ndarray:
    """transformers' (positions, rotary_dim) rotate-half table repeats each frequency twice: one copy."""
    half = table.shape[-1] // 2
    assert np.allclose(table[:, :half], table[:, half:]), "expected a rotate_half layout cos/sin"
    return table[:, :half].astype(np.float32)


def _reorder_norm(norm: Norm | None, order: np.ndarray, head_size: int) -> Norm | None:
    """A q/k norm's weight in the permuted head order (per head, or over every head)."""
    if norm is None:
        return None
    w = norm.weight
    index = order if w.shape[-1] == head_size else per_head(order, w.shape[-1] // head_size)  # last axis: dims
    return Norm(norm.name, w[..., index], None if norm.bias is None else norm.bias[..., index], norm.eps, norm.rms)


assert set(ACTIVATION_OF.values()) <= set(ACTIVATIONS)
