"""GPT-NeoX (`gpt_neox`): Pythia, Dolly v2, Open Assistant's Pythia fine-tunes, StableLM-alpha.

What differs from Llama:
- LayerNorm with bias, GELU MLP without a gate (dense_h_to_4h, dense_4h_to_h), biases everywhere,
  an untied output embedding (embed_out in the checkpoint, lm_head once transformers loads it),
  rotary on rotary_pct of each head (rotate-half).
- q, k and v packed per head in query_key_value: rows (heads, [q | k | v], head_size).
- Parallel residual (the default): h = h + attn(input_layernorm(h)) + mlp(post_attention_layernorm(h));
  use_parallel_residual=False is Llama's sequential arrangement.
"""

from __future__ import annotations

import numpy as np

from edgekit.host.decoder import MLP, Layer, Linear, take_linear
from edgekit.host.families.llama import ACTIVATION_OF, Llama, ScaleGroup


class GptNeoX(Llama):
    model_types = ("gpt_neox",)
    decoder_layers = "gpt_neox.layers"
    embed_tokens = "gpt_neox.embed_in"
    final_norm = "gpt_neox.final_layer_norm"
    rotary_module = "gpt_neox.rotary_emb"
    attention_module = "attention"
    o_proj = "dense"
    linears = {"attention.query_key_value": "attn_in", "attention.dense": "o_in", "mlp.dense_h_to_4h": "mlp_in",
               "mlp.dense_4h_to_h": "down_in"}
    scale_groups = (  # GELU is not positively homogeneous: no scale folds through it into dense_4h_to_h
        ScaleGroup("input_layernorm", ("attention.query_key_value",), ("attention",)),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), ("mlp",)),
    )
    no_clip = ("attention.query_key_value",)
    rms_norm = False
    grouped_kv = False
    reads_head_dim = False

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_eps)

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(attention=self.attention(i), mlp=self.mlp(i), attn_norm=self.norm(f"{p}.input_layernorm"),
                     mlp_norm=self.norm(f"{p}.post_attention_layernorm"),
                     parallel=bool(self.config.use_parallel_residual))

    def qkv(self, i: int) -> list[Linear]:
        return split_per_head(self.linear(f"{self.decoder_layers}.{i}.attention.query_key_value"), self.num_heads,
                              self.head_size)

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return MLP(up=self.linear(f"{p}.dense_h_to_4h"), down=self.linear(f"{p}.dense_4h_to_h"),
                   act=ACTIVATION_OF[self.hidden_act(self.config)])


def split_per_head(qkv: Linear, heads: int, head_size: int) -> list[Linear]:
    """q, k, v from a Linear whose rows are (heads, [q | k | v], head_size) (GPT-NeoX, BLOOM, Falcon-RW)."""
    rows = np.arange(heads * 3 * head_size).reshape(heads, 3, head_size)
    return [take_linear(qkv, rows[:, j].reshape(-1)) for j in range(3)]
