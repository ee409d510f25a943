"""Granite 3 (`granite`): Llama with four multipliers, folded where they cost nothing.

    embedding_multiplier   × the embedding's output (one Mul; the tied lm_head reads the plain table)
    attention_multiplier   the scale of q·k (instead of head_size^-0.5)
    residual_multiplier    h = h + m * attn(...), h = h + m * mlp(...): folded into o_proj and down_proj
    logits_scaling         logits / s: folded into lm_head (or the tied Gemm's alpha)
"""

from __future__ import annotations

from edgekit.host.decoder import MLP, Attention, Decoder, Linear, scale_rows
from edgekit.host.families.llama import Llama


class Granite(Llama):
    model_types = ("granite",)

    def describe(self, weights: dict, arch) -> Decoder:
        d = super().describe(weights, arch)
        d.embed_scale = float(self.config.embedding_multiplier)
        d.logits_scale = 1.0 / float(self.config.logits_scaling)
        return d

    def attention(self, i: int) -> Attention:
        att = super().attention(i)
        att.scale = float(self.config.attention_multiplier)
        att.o_proj = _scaled(att.o_proj, self.config.residual_multiplier)
        return att

    def mlp(self, i: int) -> MLP:
        mlp = super().mlp(i)
        mlp.down = _scaled(mlp.down, self.config.residual_multiplier)
        return mlp


def _scaled(lin: Linear, factor: float) -> Linear:
    return Linear(scale_rows(lin.weight, factor), None if lin.bias is None else lin.bias * factor)
