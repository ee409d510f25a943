"""Falcon (`falcon`): Falcon-7B/40B and their fine-tunes, Falcon-RW (ALiBi).

Three attention layouts, read by `qkv` from the fused query_key_value:

    new_decoder_architecture   rows (kv_heads, [group q heads | k | v], head_size): grouped kv, and two
                               LayerNorms (ln_attn, ln_mlp) feeding attention and the MLP in parallel
    multi_query                rows [q heads | k | v]: one kv head; one LayerNorm, parallel (Falcon-7B)
    neither                    rows (heads, [q | k | v], head_size); parallel_attn chooses the arrangement

Rotary (rotate-half) or ALiBi (Falcon-RW): transformers adds the ALiBi term before scaling,
(q·k + alibi) / sqrt(head_size), with its slopes and products in bfloat16; the table here is
that term exactly as transformers computes it, divided by sqrt(head_size).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgekit.host.decoder import MLP, Attention, Layer, Linear, take_linear
from edgekit.host.families.bloom import ALIBI_CONTEXT
from edgekit.host.families.gpt_neox import split_per_head
from edgekit.host.families.llama import ACTIVATION_OF, Llama, RotaryTables, ScaleGroup


class Falcon(Llama):
    model_types = ("falcon",)
    decoder_layers = "transformer.h"
    embed_tokens = "transformer.word_embeddings"
    final_norm = "transformer.ln_f"
    rotary_module = "transformer.rotary_emb"
    attention_module = "self_attention"
    o_proj = "dense"
    linears = {"self_attention.query_key_value": "attn_in", "self_attention.dense": "o_in",
               "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "down_in"}
    no_clip = ("self_attention.query_key_value",)
    rms_norm = False

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.positions = "alibi" if c.alibi else "rope"
        two_norms = c.new_decoder_architecture and (c.num_ln_in_parallel_attn or 2) == 2
        if two_norms:
            self.scale_groups = (ScaleGroup("ln_attn", ("self_attention.query_key_value",), ("self_attention",)),
                                 ScaleGroup("ln_mlp", ("mlp.dense_h_to_4h",), ("mlp",)))
        elif c.parallel_attn or c.new_decoder_architecture:  # one norm feeds both
            self.linears = {**self.linears, "mlp.dense_h_to_4h": "attn_in"}
            self.scale_groups = (ScaleGroup("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
                                            ("self_attention", "mlp")),)
        else:
            self.scale_groups = (
                ScaleGroup("input_layernorm", ("self_attention.query_key_value",), ("self_attention",)),
                ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), ("mlp",)))

    @staticmethod
    def hidden_act(config) -> str:
        return getattr(config, "activation", None) or "gelu"

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        if c.new_decoder_architecture:
            return c.num_kv_heads
        return 1 if c.multi_query else self.num_heads

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_epsilon)

    def longest_context(self) -> int:
        return ALIBI_CONTEXT if self.config.alibi else super().longest_context()

    def layer(self, i: int) -> Layer:
        c, p = self.config, f"{self.decoder_layers}.{i}"
        att, mlp = self.attention(i), self.mlp(i)
        if c.new_decoder_architecture and (c.num_ln_in_parallel_attn or 2) == 2:
            return Layer(att, mlp, attn_norm=self.norm(f"{p}.ln_attn"), mlp_norm=self.norm(f"{p}.ln_mlp"),
                         parallel=True)
        if c.parallel_attn or c.new_decoder_architecture:
            return Layer(att, mlp, attn_norm=self.norm(f"{p}.input_layernorm"), mlp_norm=None, parallel=True)
        return Layer(att, mlp, attn_norm=self.norm(f"{p}.input_layernorm"),
                     mlp_norm=self.norm(f"{p}.post_attention_layernorm"))

    def qkv(self, i: int) -> list[Linear]:
        c = self.config
        lin = self.linear(f"{self.decoder_layers}.{i}.self_attention.query_key_value")
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_size
        if c.new_decoder_architecture:
            group = nh // nkv
            rows = np.arange(nkv * (group + 2) * hd).reshape(nkv, group + 2, hd)
            return [take_linear(lin, rows[:, :group].reshape(-1)), take_linear(lin, rows[:, group].reshape(-1)),
                    take_linear(lin, rows[:, group + 1].reshape(-1))]
        if c.multi_query:
            q = nh * hd
            return [take_linear(lin, np.arange(q)), take_linear(lin, np.arange(q, q + hd)),
                    take_linear(lin, np.arange(q + hd, q + 2 * hd))]
        return split_per_head(lin, nh, hd)

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        if self.config.alibi:
            att.rotary, att.alibi = None, self.alibi
        return att

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return MLP(up=self.linear(f"{p}.dense_h_to_4h"), down=self.linear(f"{p}.dense_4h_to_h"),
                   act=ACTIVATION_OF[self.hidden_act(self.config)])

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        if self.config.alibi:
            from transformers.models.falcon.modeling_falcon import build_alibi_tensor

            ones = torch.ones(1, context_length, dtype=torch.long)
            table = build_alibi_tensor(ones, self.num_heads, torch.float32)[:, 0, :].numpy()  # (heads, ctx)
            self.alibi = (table * np.float32(1 / math.sqrt(self.head_size))).astype(np.float32)
            return {}
        return super().rotary(context_length)

    def rotary_key(self, i: int) -> str | None:
        return None if self.config.alibi else "default"
