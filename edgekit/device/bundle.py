"""The bundle: the one thing that crosses from host to device.

A bundle is a folder:

    model.onnx            the graph (weights inline, or in model.onnx.data when large)
    model.onnx.data       external weights, when present
    tokenizer.json        a Hugging Face `tokenizers` file
    chat_template.jinja   the model's own chat template, when it has one
    edgekit.json          this manifest: what the graph is, how to run it, sha256 of every file

Both sides import this module; it imports nothing but the standard library (and edgekit.errors).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.quantization import METHODS

FORMAT_VERSION = 1
MANIFEST = "edgekit.json"


class BundleError(EdgekitError):
    """A bundle that cannot be used: missing, altered, damaged, inconsistent, or from a newer edgekit."""


@dataclass
class Architecture:
    """The shape numbers of a decoder-only transformer (Llama vocabulary)."""

    model_type: str  # as in the Hugging Face config: llama, mistral, qwen2, gemma2, gpt_neox, ...
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int  # the KV cache is allocated at this length
    rms_norm_eps: float  # the epsilon of the model's norms (RMSNorm or LayerNorm)
    rope_theta: float  # 0 when the model has no rotary embedding
    rope_scaling: dict | None = None
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    tie_word_embeddings: bool = False
    positions: str = "rope"  # rope | alibi | learned


# The manifest's other sections. Each keeps the keys it does not know in `extra` and writes them
# back: a bundle from a newer edgekit of the same format version reads, and round-trips, unchanged.


@dataclass
class GraphInfo:
    """How the graph was built: what the runtime feeds it and which operators it needs."""

    flavour: str = "fused"  # fused (onnxruntime's contrib operators) | portable (standard ONNX only)
    opset: int = 21
    opset_com_microsoft: int | None = None  # None: no contrib operators (portable)
    kv_layout: str = "BNSH"  # (batch, kv_heads, positions, head_size)
    past_present_share_buffer: bool = True  # fused: the cache is written in place
    inputs: list = field(default_factory=list)
    operators: list = field(default_factory=list)  # "domain::Op", for `edgekit check` on a device without onnx
    weight_bytes: int | None = None  # the initializers' bytes export sized memory by; None: older bundles
    extra: dict = field(default_factory=dict)


@dataclass
class Quantization:
    """What quantization made of the weights ({"method": "none"}: fp32)."""

    method: str = "none"  # none | a name of edgekit/quantization.py's METHODS
    bits: int | None = None
    group_size: int | None = None  # weights per scale; 0: per output channel
    symmetric: bool | None = None
    accuracy_level: int | None = None  # MatMulNBits' compute type: 4 int8 activations, 1 fp32
    extra: dict = field(default_factory=dict)  # the method's own record: operator, calibration, lm_head, ...

    @property
    def label(self) -> str:
        """The method in a few words, as tables print it: "none", "rtn int4 g32", "gptq int4 per-channel sym",
        "smoothquant"."""
        if self.method == "none":
            return "none"
        row = METHODS.get(self.method)
        if row is not None and row.int8_activations:  # int8 weights per channel, int8 activations
            return self.method
        groups = "per-channel" if self.group_size == 0 else f"g{self.group_size}"
        return f"{self.method} int{self.bits} {groups}{' sym' if self.symmetric else ''}"


@dataclass
class TargetInfo:
    """The device profile the bundle was built for (targets/<name>.json as the export read it)."""

    name: str | None = None
    arch: str | None = None  # x86_64 | aarch64
    threads: int | None = None  # the most onnxruntime intra-op threads (device/threads.py); None: one per physical core
    execution_providers: list = field(default_factory=list)  # in preference order; empty: CPU
    session_config: dict = field(default_factory=dict)  # onnxruntime session config entries
    matmulnbits_accuracy_level: int = 4
    extra: dict = field(default_factory=dict)  # description, cpu, ram_gb, ...: what `edgekit targets` shows


DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    """The runtime's defaults for this model: its end tokens and its generation_config's sampling."""

    eos_token_ids: list = field(default_factory=list)
    bos_token_id: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    extra: dict = field(default_factory=dict)


@dataclass
class Source:
    """Where the weights came from."""

    spec: str = ""  # what export was given: a shipped name, a folder or a .gguf file
    gguf_file: str | None = None
    name_or_path: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Prefix:
    """Prefix tuning baked in: `file` (an npz) holds key.{i} and value.{i}, each (kv_heads, length,
    head_size), loaded into cache positions [0, length) of every sequence."""

    file: str
    length: int


@dataclass
class Manifest:
    architecture: Architecture
    quantization: Quantization
    target: TargetInfo
    graph: GraphInfo
    generation: Generation
    chat: dict | None = None  # the chat format derived from the template, see device/chat.py
    source: Source = field(default_factory=Source)
    adapters: list = field(default_factory=list)  # what was merged or baked in, one record each
    prefix: Prefix | None = None
    files: dict = field(default_factory=dict)  # file name -> sha256
    format_version: int = FORMAT_VERSION
    edgekit_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_record(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in `d`, every section checked field by field against its dataclass; unknown fields
        (from a newer edgekit of the same format version) are kept aside. Raises ValueError naming the
        first field that is wrong."""
        m = from_record(cls, d, "")
        arch = m.architecture
        for name in _POSITIVE:
            if getattr(arch, name) < 1:
                raise ValueError(f"architecture.{name} must be at least 1, got {getattr(arch, name)}")
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(f"architecture.num_heads ({arch.num_heads}) is not a multiple of num_kv_heads "
                             f"({arch.num_kv_heads})")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.files.items()):
            raise ValueError("files must map file names to sha256 strings")
        if m.generation.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be at least 1, got {m.generation.max_new_tokens}")
        if m.chat is not None:
            _check_chat(m.chat)
        if m.prefix is not None and not is_plain_name(m.prefix.file):
            raise ValueError(f"prefix.file must name a file of the bundle folder, got {json.dumps(m.prefix.file)[:60]}")
        return m

    def read_files(self) -> list[str]:
        """The files of the bundle the runtime reads, each of which must have its sha256 in `files`."""
        template = (self.chat or {}).get("template")
        return ["model.onnx", "tokenizer.json", *([template] if template else []),
                *([self.prefix.file] if self.prefix else [])]


def is_plain_name(name: Any) -> bool:
    """`name` is the name of a file in the bundle folder itself (no path: not '../x' or '/etc/x')."""
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")


def _check_chat(chat: dict) -> None:
    """The chat section: a template file of the bundle (or edgekit 0.1's tables), and special tokens
    the template refers to; ValueError naming what is wrong."""
    if "template" in chat and not is_plain_name(chat["template"]):
        raise ValueError("chat.template must name a file of the bundle folder, got "
                         f"{json.dumps(chat['template'])[:60]}")
    for table in ("special_tokens", "start", "joint", "generation", "end"):  # name -> text
        value = chat.get(table, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"chat.{table} must map names to strings, got {json.dumps(value)[:60]}")


_SECTIONS = {"architecture": Architecture, "quantization": Quantization, "target": TargetInfo, "graph": GraphInfo,
             "generation": Generation, "source": Source, "prefix": Prefix}
_POSITIVE = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_size", "vocab_size", "context_length")
# a field's annotation -> the JSON values it accepts (an int is a number; a bool is neither)
_KINDS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool,
                                              "dict": dict, "list": list, "None": type(None)}
_KIND_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "an object", "list": "a list", "None": "null"}


def from_record(cls, d: Any, where: str = ""):
    """`cls` from the JSON object `d`, each field checked against its annotation (a section's dataclass
    read the same way); a missing field takes its default, or is an error when it has none; unknown
    keys go to `extra` when `cls` has one, else are dropped."""
    if not isinstance(d, dict):
        raise ValueError(f"{where.rstrip('.') or 'the manifest'} must be an object, got {json.dumps(d)[:60]}")
    known = {f.name: f for f in fields(cls) if f.name != "extra"}
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where}{name} is missing")
            continue
        section, value = _SECTIONS.get(name) if cls is Manifest else None, d[name]
        if section is not None and value is not None:
            values[name] = from_record(section, value, f"{name}.")
            continue
        kinds = [k.strip() for k in str(f.type).split("|")]
        if not any(isinstance(value, _KINDS[k]) and not (isinstance(value, bool) and k in ("int", "float"))
                   for k in kinds if k in _KINDS):
            want = " or ".join(_KIND_NAMES.get(k, "an object") for k in kinds)
            raise ValueError(f"{where}{name} must be {want}, got {json.dumps(value)[:60]}")
        values[name] = value
    if "extra" in {f.name for f in fields(cls)}:
        values["extra"] = {k: v for k, v in d.items() if k not in known}
    return cls(**values)


def to_record(value: Any) -> Any:
    """A section as the JSON object it is read from: its fields but those left None (their default),
    and its `extra` keys back at the top level."""
    if not is_dataclass(value):
        return value
    d = {f.name: getattr(value, f.name) for f in fields(value) if f.name != "extra"}
    return {**getattr(value, "extra", {}), **{k: v for k, v in d.items() if v is not None}}


def check_graph(folder: Path, manifest: Manifest, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """The graph's inputs and outputs (name -> shape, a dim an int or a name) are the ones `manifest`
    describes: its flavour's inputs, one key/value cache pair per layer of (kv_heads, head_size),
    logits over the vocabulary. Raises BundleError naming what differs."""
    a = manifest.architecture
    where = f"{folder}: model.onnx does not match {MANIFEST}"
    flavour = manifest.graph.flavour
    want = FLAVOUR_INPUTS.get(flavour)
    if want is None:
        raise BundleError(f"{folder}: {MANIFEST} names graph flavour {flavour!r}; this runtime knows "
                          f"{', '.join(FLAVOUR_INPUTS)}")
    missing = [n for n in want if n not in inputs]
    if missing:
        raise BundleError(f"{where}: the graph has no input {missing[0]} (a {flavour} graph needs {', '.join(want)})")
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    if layers != a.num_layers:
        raise BundleError(f"{where}: the graph caches keys for {layers} layers, the manifest says {a.num_layers}")
    for i in range(a.num_layers):
        for kind in ("key", "value"):
            for name, table in ((f"past_key_values.{i}.{kind}", inputs), (f"present.{i}.{kind}", outputs)):
                shape = table.get(name)
                if shape is None:
                    raise BundleError(f"{where}: the graph has no {name}")
                if len(shape) != 4 or shape[1] != a.num_kv_heads or shape[3] != a.head_size:
                    raise BundleError(f"{where}: {name} is {shape}, the manifest says (batch, {a.num_kv_heads} "
                                      f"kv heads, positions, {a.head_size})")
    logits = outputs.get("logits")
    if logits is None or len(logits) != 3 or logits[2] != a.vocab_size:
        raise BundleError(f"{where}: logits are {logits}, the manifest says a vocabulary of {a.vocab_size}")


FLAVOUR_INPUTS = {"fused": ("input_ids", "seqlens_k", "total_sequence_length", "num_logits_to_keep"),
                  "portable": ("input_ids", "position_ids", "num_logits_to_keep")}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def bundle_hash(manifest: Manifest) -> str:
    """A short identity for a bundle: the hash of its file hashes."""
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(manifest.files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Hash every file in `folder` (but the manifest) into `manifest.files` and write it."""
    manifest.files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(manifest.to_json())


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read a bundle's manifest; with `verify`, check every file against its sha256.

    Raises BundleError naming the file when one is missing, altered or unexpected,
    and when the bundle was written by a newer format than this runtime reads.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{folder}: not a bundle ({MANIFEST} is missing); make one with `edgekit export`")
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8, an integer of > 4300 digits
        raise BundleError(f"{path}: manifest is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: the manifest is not a JSON object; the bundle is damaged: export it again")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path}: manifest has no format_version of 1 or more")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format {version} is newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade edgekit on the device, or re-export with the edgekit version installed here"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path}: manifest does not match format {version}: {e}") from None
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists matches its sha256, and every file the runtime reads is listed."""
    for name in manifest.files:
        if not is_plain_name(name):
            raise BundleError(f"{folder}: {MANIFEST} lists {name!r}, which is not a file of the bundle folder")
    unlisted = [n for n in manifest.read_files() if n not in manifest.files]
    if (folder / "model.onnx.data").exists() and "model.onnx.data" not in manifest.files:
        unlisted.append("model.onnx.data")
    if unlisted:
        raise BundleError(f"{folder}: {MANIFEST} has no sha256 for {unlisted[0]}, which the runtime reads; the "
                          "manifest was altered or damaged: copy or export the bundle again")
    for name, digest in manifest.files.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{folder}: file {name} is missing (listed in {MANIFEST})")
        try:
            actual = sha256_file(p)
        except OSError as e:
            raise BundleError(f"{folder}: cannot read {name} ({e.strerror})") from None
        if actual != digest:
            raise BundleError(
                f"{folder}: file {name} does not match its sha256 in {MANIFEST}; "
                "the bundle was altered or damaged in transfer, copy it again"
            )
