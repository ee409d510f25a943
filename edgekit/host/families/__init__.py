"""Model families: one small file each, saying only what differs from Llama (llama.py).

    transformers model ──► family.describe(weights, arch) ──► host/decoder.py Decoder ──► host/graph/

A family names its checkpoint's modules (for quantization and adapters), refuses settings
the graph does not implement with one line, and reads the weights into the description.
Adding a family is adding a file here and its line below, with its parity tests
(tests/test_families.py).
"""

from __future__ import annotations

from edgekit.errors import ExportError
from edgekit.host.families.bloom import Bloom
from edgekit.host.families.falcon import Falcon
from edgekit.host.families.gemma import Gemma, Gemma2, Gemma3
from edgekit.host.families.glm import Glm, Glm4
from edgekit.host.families.gpt_neox import GptNeoX
from edgekit.host.families.gptj import GptJ
from edgekit.host.families.granite import Granite
from edgekit.host.families.llama import Llama
from edgekit.host.families.mpt import Mpt
from edgekit.host.families.olmo2 import Olmo2
from edgekit.host.families.opt import Opt
from edgekit.host.families.phi3 import Phi3
from edgekit.host.families.qwen3 import Qwen3
from edgekit.host.families.smollm3 import SmolLM3
from edgekit.host.families.stablelm import StableLm

FAMILIES: dict[str, type[Llama]] = {
    t: cls for cls in (Llama, Phi3, Gemma, Gemma2, Gemma3, Qwen3, SmolLM3, Granite, Olmo2, StableLm, Glm, Glm4,
                       GptNeoX, GptJ, Falcon, Bloom, Opt, Mpt)
    for t in cls.model_types
}
SUPPORTED = tuple(sorted(FAMILIES))


def family_class(config) -> type[Llama]:
    """The family of `config`, after checking its settings; ExportError when unsupported."""
    model_type = getattr(config, "model_type", None)
    cls = FAMILIES.get(model_type) if model_type is not None else None
    if cls is None:
        raise ExportError(f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    cls.check(config)
    return cls


def family_of(model) -> Llama:
    """The family describing `model` (a transformers causal LM)."""
    return family_class(model.config)(model)
