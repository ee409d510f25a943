"""Gemma, Gemma 2, Gemma 3 (text) (`gemma`, `gemma2`, `gemma3_text`).

What differs from Llama:
- RMSNorm multiplies by (1 + weight); the embedding is scaled by sqrt(hidden_size) (the tied
  lm_head reads the unscaled table); the MLP's activation is GELU (tanh).
- Gemma 2 and 3 put a norm before and after both attention and the MLP:

      h = h + post_attention_layernorm(attn(input_layernorm(h)))
      h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

  scale q·k by query_pre_attn_scalar^-0.5, and alternate sliding-window (local) and global
  layers (layer_types). Gemma 2 soft-caps the attention scores and the final logits
  (cap * tanh(x / cap)): GroupQueryAttention's softcap attribute, and three nodes after lm_head.
  Gemma 3 caps the final logits only (transformers ignores its attn_logit_softcapping), and reads
  its activation from hidden_activation, as Gemma 2 does (Gemma 1: hidden_act).
- Gemma 3 normalizes q and k per head ((1 + w) RMSNorm) and gives its local and global layers
  rope tables of their own (rope_parameters per layer type), one GQA cos/sin cache each.
"""

from __future__ import annotations

from edgekit.errors import ExportError
from edgekit.host.decoder import Attention, Decoder, Layer, Norm
from edgekit.host.families.llama import Llama, RotaryTables, ScaleGroup


class Gemma(Llama):
    model_types = ("gemma",)
    norm_offset = 1.0

    def describe(self, weights: dict, arch) -> Decoder:
        d = super().describe(weights, arch)
        d.embed_scale = float(self.config.hidden_size ** 0.5)
        return d


class Gemma2(Gemma):
    model_types = ("gemma2",)
    scale_groups = (
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn",)),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ("self_attn.o_proj",), smooth=False),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), ("mlp",)),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), ("mlp.down_proj",)),
    )

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise ExportError(f"{config.model_type} with use_bidirectional_attention (an embedding model) is not "
                              "supported; edgekit exports causal language models")

    @staticmethod
    def hidden_act(config) -> str:  # Gemma 2 and 3 read hidden_activation (Google's configs carry hidden_act too)
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"

    def describe(self, weights: dict, arch) -> Decoder:
        d = super().describe(weights, arch)
        d.logits_softcap = getattr(self.config, "final_logit_softcapping", None)
        return d

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(attention=self.attention(i), mlp=self.mlp(i),
                     attn_norm=self.norm(f"{p}.input_layernorm"),
                     attn_out_norm=self.norm(f"{p}.post_attention_layernorm"),
                     mlp_norm=self.norm(f"{p}.pre_feedforward_layernorm"),
                     mlp_out_norm=self.norm(f"{p}.post_feedforward_layernorm"))

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        att.scale = float(self.config.query_pre_attn_scalar ** -0.5)
        att.softcap = getattr(self.config, "attn_logit_softcapping", None)
        return att


class Gemma3(Gemma2):
    model_types = ("gemma3_text",)

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        att.softcap = None  # transformers' Gemma 3 does not cap attention logits, whatever the config says
        return att

    def qk_norms(self, i: int) -> tuple[Norm | None, Norm | None]:
        p = f"{self.decoder_layers}.{i}.self_attn"
        return self.norm(f"{p}.q_norm"), self.norm(f"{p}.k_norm")

    def rotary_key(self, i: int) -> str | None:
        return self.config.layer_types[i]

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        return {t: self.rotary_from_module(context_length, layer_type=t) for t in sorted(set(self.config.layer_types))}
