"""BLOOM and BLOOMZ (`bloom`).

What differs from Llama: ALiBi instead of rotary (score += slope_h * key position, slopes from
transformers' own function), a LayerNorm on the embeddings (word_embeddings_layernorm),
LayerNorm with bias everywhere, q/k/v packed per head in query_key_value (heads, [q | k | v],
head_size), a GELU (tanh) MLP without a gate, biases on every Linear, the lm_head tied to the
embedding. ALiBi extrapolates past the training length, so the context may be longer than 2048.
"""

from __future__ import annotations

import torch

from edgekit.errors import ExportError
from edgekit.host.decoder import MLP, Attention, Decoder, Layer, Linear
from edgekit.host.families.gpt_neox import split_per_head
from edgekit.host.families.llama import Llama, RotaryTables, ScaleGroup

ALIBI_CONTEXT = 8192  # the longest context accepted: ALiBi has no table of positions to run out of


class Bloom(Llama):
    model_types = ("bloom",)
    decoder_layers = "transformer.h"
    embed_tokens = "transformer.word_embeddings"
    final_norm = "transformer.ln_f"
    attention_module = "self_attention"
    o_proj = "dense"
    positions = "alibi"
    linears = {"self_attention.query_key_value": "attn_in", "self_attention.dense": "o_in",
               "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "down_in"}
    scale_groups = (
        ScaleGroup("input_layernorm", ("self_attention.query_key_value",), ("self_attention",)),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), ("mlp",)),
    )
    no_clip = ("self_attention.query_key_value",)
    rms_norm = False
    grouped_kv = False
    reads_head_dim = False

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.apply_residual_connection_post_layernorm:
            raise ExportError("bloom with apply_residual_connection_post_layernorm=True is not supported (no released "
                              "BLOOM model uses it); supported: the pre-LayerNorm residual")

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_epsilon)

    def longest_context(self) -> int:
        return ALIBI_CONTEXT

    def describe(self, weights: dict, arch) -> Decoder:
        d = super().describe(weights, arch)
        d.embed_norm = self.norm("transformer.word_embeddings_layernorm")
        return d

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(self.attention(i), self.mlp(i), attn_norm=self.norm(f"{p}.input_layernorm"),
                     mlp_norm=self.norm(f"{p}.post_attention_layernorm"))

    def qkv(self, i: int) -> list[Linear]:
        return split_per_head(self.linear(f"{self.decoder_layers}.{i}.self_attention.query_key_value"),
                              self.num_heads, self.head_size)

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        att.alibi = self.alibi
        return att

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return MLP(up=self.linear(f"{p}.dense_h_to_4h"), down=self.linear(f"{p}.dense_4h_to_h"), act="gelu_tanh")

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        slopes = _get_alibi_slopes(self.num_heads, torch.device("cpu"))
        self.alibi = (slopes[:, None] * torch.arange(context_length)).numpy()  # (heads, ctx), as transformers
        return {}

    def rotary_key(self, i: int) -> str | None:
        return None
