"""Qwen3 (`qwen3`): Llama with q and k RMS-normalized per head before rotary."""

from __future__ import annotations

from edgekit.host.decoder import Norm
from edgekit.host.families.llama import Llama


class Qwen3(Llama):
    model_types = ("qwen3",)

    def qk_norms(self, i: int) -> tuple[Norm | None, Norm | None]:
        p = f"{self.decoder_layers}.{i}.self_attn"
        return self.norm(f"{p}.q_norm"), self.norm(f"{p}.k_norm")
