"""GLM-4 (`glm`: GLM-4-9B; `glm4`: GLM-4-0414): Llama with packed gate/up, q/k/v bias, and
rotary on half of each head with interleaved pairs (2i, 2i + 1), which the head order in
llama.py turns into GroupQueryAttention's rotate-half layout. `glm4` adds a norm after
attention and one after the MLP:

    h = h + post_self_attn_layernorm(attn(input_layernorm(h)))
    h = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))
"""

from __future__ import annotations

from edgekit.host.decoder import MLP, Layer
from edgekit.host.families.llama import ACTIVATION_OF, Llama, ScaleGroup
from edgekit.host.families.phi3 import gate_up_mlp

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class Glm(Llama):
    model_types = ("glm",)
    rotary_interleaved = True
    linears = {**{p: "attn_in" for p in ATTN_IN}, "self_attn.o_proj": "o_in", "mlp.gate_up_proj": "mlp_in",
               "mlp.down_proj": "down_in"}
    scale_groups = (
        ScaleGroup("input_layernorm", ATTN_IN, ("self_attn",)),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ("self_attn.o_proj",), smooth=False),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), ("mlp",)),
    )

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}.mlp"
        return gate_up_mlp(self.linear(f"{p}.gate_up_proj"), self.linear(f"{p}.down_proj"),
                           ACTIVATION_OF[self.hidden_act(self.config)])


class Glm4(Glm):
    model_types = ("glm4",)

    def layer(self, i: int) -> Layer:
        layer = super().layer(i)
        p = f"{self.decoder_layers}.{i}"
        layer.attn_out_norm = self.norm(f"{p}.post_self_attn_layernorm")
        layer.mlp_out_norm = self.norm(f"{p}.post_mlp_layernorm")
        return layer
