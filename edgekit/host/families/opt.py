"""OPT (`opt`): OPT-125m to 66b and their fine-tunes.

What differs from Llama: learned absolute positions added to the embeddings (OPT stores them
from row 2: its offset), LayerNorm with bias (or without an affine part), a ReLU MLP without a
gate (fc1, fc2), biases on every Linear, q scaled by head_size^-0.5, the lm_head tied to the
embedding. Two variants:
- do_layer_norm_before=False (OPT-350m): norms after the residual add, h = norm(h + sublayer(h)),
  and no final norm;
- word_embed_proj_dim != hidden_size (OPT-350m): project_in after the embedding, project_out
  before the lm_head.
"""

from __future__ import annotations

from edgekit.host.decoder import MLP, Decoder, Layer, Linear, Norm
from edgekit.host.families.llama import ACTIVATION_OF, Llama, RotaryTables, ScaleGroup

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OFFSET = 2  # OPTLearnedPositionalEmbedding: position p reads row p + 2


class Opt(Llama):
    model_types = ("opt",)
    decoder_layers = "model.decoder.layers"
    embed_tokens = "model.decoder.embed_tokens"
    final_norm = "model.decoder.final_layer_norm"
    o_proj = "out_proj"
    positions = "learned"
    linears = {**{p: "attn_in" for p in ATTN_IN}, "self_attn.out_proj": "o_in", "fc1": "mlp_in", "fc2": "down_in"}
    no_clip = ("self_attn.q_proj", "self_attn.k_proj")
    rms_norm = False
    grouped_kv = False
    reads_head_dim = False

    def __init__(self, model):
        super().__init__(model)
        # post-LN (OPT-350m): a norm's output is also the residual stream, so no scale folds into it
        norms = (ScaleGroup("self_attn_layer_norm", ATTN_IN, ("self_attn",)),
                 ScaleGroup("final_layer_norm", ("fc1",), ("fc1",))) if self.config.do_layer_norm_before else ()
        self.scale_groups = (
            *norms,
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), ("self_attn.out_proj",), smooth=False),
            ScaleGroup("fc1", ("fc2",), ("fc2",)),  # ReLU(x / s) = ReLU(x) / s for s > 0
        )

    @staticmethod
    def hidden_act(config) -> str:
        return config.activation_function

    @property
    def eps(self) -> float:
        return 1e-5  # nn.LayerNorm's default: OPT's config has no epsilon

    def longest_forward(self) -> int | None:
        return self.config.max_position_embeddings  # the learned position table's rows

    def describe(self, weights: dict, arch) -> Decoder:
        d = super().describe(weights, arch)
        table = self.w["model.decoder.embed_positions.weight"]
        d.positions = table[OFFSET:OFFSET + arch.context_length]
        if "model.decoder.project_in.weight" in self.w:
            # no bias in OPT's checkpoints; a merged LoRA with lora_bias gives them one
            d.project_in = Linear(self.w["model.decoder.project_in.weight"],
                                  self.w.get("model.decoder.project_in.bias"))
            d.project_out = Linear(self.w["model.decoder.project_out.weight"],
                                   self.w.get("model.decoder.project_out.bias"))
        return d

    def final_layer_norm(self) -> Norm | None:
        # absent after post-LN layers (OPT-350m) and in the checkpoints that removed it
        return None if self.model.get_submodule("model.decoder").final_layer_norm is None else \
            self.norm(self.final_norm)

    def rotary(self, context_length: int) -> dict[str, RotaryTables]:
        return {}

    def rotary_key(self, i: int) -> str | None:
        return None

    def layer(self, i: int) -> Layer:
        p = f"{self.decoder_layers}.{i}"
        return Layer(self.attention(i), self.mlp(i), attn_norm=self.norm(f"{p}.self_attn_layer_norm"),
                     mlp_norm=self.norm(f"{p}.final_layer_norm"), post_norm=not self.config.do_layer_norm_before)

    def mlp(self, i: int) -> MLP:
        p = f"{self.decoder_layers}.{i}"
        return MLP(up=self.linear(f"{p}.fc1"), down=self.linear(f"{p}.fc2"),
                   act=ACTIVATION_OF[self.hidden_act(self.config)])
