"""StableLM 2 (`stablelm`): LayerNorm with bias, rotary on a fraction of each head
(partial_rotary_factor, 1/4 in the released models), optional q/k bias (use_qkv_bias),
optional per-head q/k LayerNorm (qk_layernorm, a weight per head) and optional parallel
residual, where the MLP reads the same normalized input as attention:

    sequential   h = h + attn(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))
    parallel     h = h + attn(input_layernorm(h)) + mlp(input_layernorm(h))
"""

from __future__ import annotations

import numpy as np

from edgekit.host.decoder import Layer, Norm
from edgekit.host.families.llama import Llama, ScaleGroup

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


class StableLm(Llama):
    model_types = ("stablelm",)
    rms_norm = False
    reads_head_dim = False

    def __init__(self, model):
        super().__init__(model)
        if self.config.use_parallel_residual:  # one norm feeds attention and the MLP
            self.scale_groups = (
                ScaleGroup("input_layernorm", (*ATTN_IN, "mlp.gate_proj", "mlp.up_proj"), ("self_attn", "mlp")),
                ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ("self_attn.o_proj",), smooth=False),
                ScaleGroup("mlp.up_proj", ("mlp.down_proj",), ("mlp.down_proj",)),
            )
            self.linears = {**{p: "attn_in" for p in ATTN_IN}, "self_attn.o_proj": "o_in",
                            "mlp.gate_proj": "attn_in", "mlp.up_proj": "attn_in", "mlp.down_proj": "down_in"}

    @property
    def eps(self) -> float:
        return float(self.config.layer_norm_eps)

    def layer(self, i: int) -> Layer:
        if not self.config.use_parallel_residual:
            return super().layer(i)
        return Layer(attention=self.attention(i), mlp=self.mlp(i),
                     attn_norm=self.norm(f"{self.decoder_layers}.{i}.input_layernorm"), mlp_norm=None, parallel=True)

    def qk_norms(self, i: int) -> tuple[Norm | None, Norm | None]:
        if not self.config.qk_layernorm:
            return None, None
        p = f"{self.decoder_layers}.{i}.self_attn"
        return self._per_head(f"{p}.q_layernorm", self.num_heads), self._per_head(f"{p}.k_layernorm", self.num_kv_heads)

    def _per_head(self, path: str, heads: int) -> Norm:
        """StableLmLayerNormPerHead: a LayerNorm (no bias) of its own for each head -> weight (heads, head_size)."""
        weight = np.stack([np.asarray(self.w[f"{path}.norms.{h}.weight"], np.float32) for h in range(heads)])
        return Norm(path, weight, None, self.eps, rms=False)
