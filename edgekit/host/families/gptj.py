"""GPT-J (`gptj`): Dolly v1, GPT4All-J.

What differs from Llama: one LayerNorm (with bias) feeds attention and the MLP in parallel,
h = h + attn(ln_1(h)) + mlp(ln_1(h)); rotary on the first rotary_dim dims of each head with
interleaved pairs (2i, 2i + 1), from GPT-J's own sinusoid table; a GELU (tanh) MLP without a
gate (fc_in, fc_out, with bias); no bias on q/k/v/out_proj; a bias on the untied lm_head.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekit.host.decoder import MLP, Layer
from edgekit.host.families.llama import ACTIVATION_OF, Llama, RotaryTables, ScaleGroup

ATTN_IN = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


class GptJ(Llama):
    model_types = ("gptj",)
    decoder_layers = "transformer.h"
    embed_tokens = "transformer.wte"
    final_norm = "transformer.ln_f"
    rotary_module = "transformer.rotary_emb"
    attention_module = "attn"
    o_proj = "out_proj"
    rotary_interleaved = True
    linears = {**{p: "attn_in" for p in ATTN_IN}, "attn.out_proj": "o_in", "mlp.fc_in": "attn_in",
               "mlp.fc_out": "down_in"}
    scale_groups = (
        ScaleGroup("ln_1", (*ATTN_IN, "mlp.fc_in"), ("attn", "mlp")),
        ScaleGroup("attn.v_proj", ("attn.out_proj",), ("attn.out_proj",), smooth=False),
    )
    no_clip = ("attn.q_proj", "attn.k_proj")
    rms_norm = False
    grouped_kv = False
    reads_head_dim = False

    @staticmethod
    def hidden_act(config) -> str:
        return config.activation_function

    def longest_forward(self) -> int | None:
        return self.config.n_positions  # transformers' sin/cos table has this many rows

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_epsilon)

    def layer(self, i: int) -> Layer:
        return Layer(attention=self.attention(i), mlp=self.mlp(i),
                     attn_norm=self.norm(f"{self.decoder_layers}.{i}.ln_1"), mlp_norm=None, parallel=True)

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return MLP(up=self.linear(f"{p}.fc_in"), down=self.linear(f"{p}.fc_out"),
                   act=ACTIVATION_OF[self.hidden_act(self.config)])

    @torch.no_grad()
    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        """GPT-J's module returns (sin, cos), one value per frequency already."""
        module = self.model.get_submodule(self.rotary_module)
        sin, cos = module(torch.zeros(1, dtype=torch.float32), torch.arange(context_length)[None, :])
        half = min(cos.shape[-1], self.head_size // 2)
        return {"default": (cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32),
                            None, 0)}
