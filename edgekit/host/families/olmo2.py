"""OLMo 2 (`olmo2`): norms after attention and the MLP instead of before, and q/k norms over the
whole projection (not per head):

    h = h + post_attention_layernorm(attn(h))        attn: q = q_norm(q_proj(h)), k = k_norm(k_proj(h))
    h = h + post_feedforward_layernorm(mlp(h))

With no norm in front of q/k/v or gate/up, AWQ and SmoothQuant have no op to fold their scales
into there: they scale v_proj -> o_proj (one scale per value channel under GQA) and up_proj ->
down_proj only.
"""

from __future__ import annotations

from edgekit.host.decoder import Layer, Norm
from edgekit.host.families.llama import Llama, ScaleGroup


class Olmo2(Llama):
    model_types = ("olmo2",)
    scale_groups = (
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ("self_attn.o_proj",), smooth=False),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), ("mlp.down_proj",)),
    )

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(attention=self.attention(i), mlp=self.mlp(i), attn_norm=None, mlp_norm=None,
                     attn_out_norm=self.norm(f"{p}.post_attention_layernorm"),
                     mlp_out_norm=self.norm(f"{p}.post_feedforward_layernorm"))

    def qk_norms(self, i: int) -> tuple[Norm | None, Norm | None]:
        p = f"{self.decoder_layers}.{i}.self_attn"
        return self.norm(f"{p}.q_norm"), self.norm(f"{p}.k_norm")
