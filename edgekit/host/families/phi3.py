"""Phi-3, Phi-3.5, Phi-4-mini (`phi3`): Llama with q/k/v and gate/up packed in the checkpoint.

    qkv_proj (q rows, then k, then v)       gate_up_proj (gate rows, then up)

LongRoPE ("su"/"longrope" scaling): short factors while a run stays within
original_max_position_embeddings, long factors for the whole run after (llama.py's rotary
tables; the flavours switch on the run's length). Phi-4-mini rotates 3/4 of each head
(partial_rotary_factor), which the head order in llama.py handles.
"""

from __future__ import annotations

import numpy as np

from edgekit.host.decoder import MLP, Linear, out_features, take_linear
from edgekit.host.families.llama import ACTIVATION_OF, Llama, ScaleGroup


class Phi3(Llama):
    model_types = ("phi3",)
    linears = {"self_attn.qkv_proj": "attn_in", "self_attn.o_proj": "o_in", "mlp.gate_up_proj": "mlp_in",
               "mlp.down_proj": "down_in"}
    scale_groups = (
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), ("self_attn",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), ("mlp",)),
    )
    no_clip = ("self_attn.qkv_proj",)

    def qkv(self, i: int) -> list[Linear]:
        qkv = self.linear(f"{self.decoder_layers}.{i}.self_attn.qkv_proj")
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        return [take_linear(qkv, np.arange(lo, hi)) for lo, hi in ((0, q), (q, q + kv), (q + kv, q + 2 * kv))]

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return gate_up_mlp(self.linear(f"{p}.gate_up_proj"), self.linear(f"{p}.down_proj"),
                           ACTIVATION_OF[self.hidden_act(self.config)])


def gate_up_mlp(gate_up: Linear, down: Linear, act: str) -> MLP:
    """An MLP whose gate and up projections are one Linear, gate rows first (Phi-3, GLM)."""
    half = np.arange(out_features(gate_up.weight) // 2)
    return MLP(gate=take_linear(gate_up, half), up=take_linear(gate_up, half + len(half)), down=down, act=act)
