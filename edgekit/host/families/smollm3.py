"""SmolLM3 (`smollm3`): Llama whose layers skip rotary where no_rope_layers says 0 (NoPE)."""

from __future__ import annotations

from edgekit.host.families.llama import Llama


class SmolLM3(Llama):
    model_types = ("smollm3",)

    def rotary_key(self, i: int) -> str | None:
        return "default" if self.config.no_rope_layers[i] else None
