"""MPT (`mpt`): MPT-7B and its instruct/chat fine-tunes.

What differs from Llama: ALiBi (slopes as transformers computes them for MPT), LayerNorm
without bias, no bias on any Linear (no_bias), q/k/v in one Wqkv ([q | k | v]) clamped to
[-clip_qkv, clip_qkv] when set, softmax_scale, a GELU (erf) MLP without a gate, the lm_head
tied to the embedding.
"""

from __future__ import annotations

import torch

from edgekit.errors import ExportError
from edgekit.host.decoder import MLP, Attention, Layer, Linear, take_linear
from edgekit.host.families.bloom import ALIBI_CONTEXT
from edgekit.host.families.llama import Llama, RotaryTables, ScaleGroup


class Mpt(Llama):
    model_types = ("mpt",)
    decoder_layers = "transformer.blocks"
    embed_tokens = "transformer.wte"
    final_norm = "transformer.norm_f"
    attention_module = "attn"
    o_proj = "out_proj"
    positions = "alibi"
    linears = {"attn.Wqkv": "attn_in", "attn.out_proj": "o_in", "ffn.up_proj": "mlp_in", "ffn.down_proj": "down_in"}
    scale_groups = (
        ScaleGroup("norm_1", ("attn.Wqkv",), ("attn",)),
        ScaleGroup("norm_2", ("ffn.up_proj",), ("ffn",)),
    )
    no_clip = ("attn.Wqkv",)
    rms_norm = False
    grouped_kv = False
    reads_head_dim = False

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        a = config.attn_config
        for key, why in (("qk_ln", "q/k LayerNorm"), ("prefix_lm", "prefix-LM attention")):
            if getattr(a, key, False):
                raise ExportError(f"mpt with attn_config.{key} ({why}) is not supported; supported: causal ALiBi "
                                  "attention with optional clip_qkv")
        if not getattr(a, "alibi", True):
            raise ExportError("mpt with attn_config.alibi=False is not supported; supported: ALiBi")

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_epsilon)

    def longest_context(self) -> int:
        return max(self.config.max_seq_len, ALIBI_CONTEXT)

    def longest_forward(self) -> int | None:
        return self.config.max_seq_len  # transformers' ALiBi bias is a buffer of this many positions

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(self.attention(i), self.mlp(i), attn_norm=self.norm(f"{p}.norm_1"),
                     mlp_norm=self.norm(f"{p}.norm_2"))

    def qkv(self, i: int) -> list[Linear]:
        lin = self.linear(f"{self.decoder_layers}.{i}.attn.Wqkv")
        h = self.config.hidden_size
        return [take_linear(lin, torch.arange(j * h, (j + 1) * h).numpy()) for j in range(3)]

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        a = self.config.attn_config
        att.scale = float(a.softmax_scale) if a.softmax_scale else float(self.head_size ** -0.5)
        att.clip_qkv = a.clip_qkv or None
        att.alibi = self.alibi
        return att

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.ffn"
        return MLP(up=self.linear(f"{p}.up_proj"), down=self.linear(f"{p}.down_proj"), act="gelu")

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        slopes = -build_mpt_alibi_tensor(self.num_heads, 2)[:, 0, 0]  # its value at key -1: -slope
        self.alibi = (slopes[:, None] * torch.arange(context_length)).numpy()  # (heads, ctx)
        return {}

    def rotary_key(self, i: int) -> str | None:
        return None
