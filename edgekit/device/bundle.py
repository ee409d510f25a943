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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

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


@dataclass
class Manifest:
    architecture: Architecture
    quantization: dict  # {"method": "none"} or the method and its parameters
    target: dict  # the device profile the bundle was built for
    graph: dict  # flavour, opset, input and output names
    generation: dict  # defaults: eos ids, max_new_tokens, sampling settings
    chat: dict | None = None  # the chat format derived from the template, see device/chat.py
    source: dict = field(default_factory=dict)  # where the weights came from
    adapters: list = field(default_factory=list)
    # prefix tuning baked in: {"file": "prefix_kv.npz", "length": P}; the npz holds key.{i} and
    # value.{i}, each (kv_heads, P, head_size), loaded into cache positions [0, P) of every sequence
    prefix: dict | None = None
    files: dict = field(default_factory=dict)  # file name -> sha256
    format_version: int = FORMAT_VERSION
    edgekit_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in `d`, checked field by field; unknown fields (from a newer edgekit of the same
        format version) are ignored. Raises ValueError naming the first field that is wrong."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name, kind in _MANIFEST_FIELDS.items():
            _expect(d, name, kind, "")
        arch = d["architecture"]
        a_known = {f.name for f in fields(Architecture)}
        for name, kind in _ARCH_FIELDS.items():
            _expect(arch, name, kind, "architecture.")
        for name in _POSITIVE:
            if arch[name] < 1:
                raise ValueError(f"architecture.{name} must be at least 1, got {arch[name]}")
        if arch["num_heads"] % arch["num_kv_heads"]:
            raise ValueError(f"architecture.num_heads ({arch['num_heads']}) is not a multiple of num_kv_heads "
                             f"({arch['num_kv_heads']})")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in d["files"].items()):
            raise ValueError("files must map file names to sha256 strings")
        d = dict(d, architecture=Architecture(**{k: v for k, v in arch.items() if k in a_known}))
        return cls(**d)


def _expect(d: dict, name: str, kind, where: str) -> None:
    if name not in d:
        raise ValueError(f"{where}{name} is missing")
    value = d[name]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if not ok:
        raise ValueError(f"{where}{name} must be {_KIND_NAMES.get(kind, kind)}, got {json.dumps(value)[:60]}")


_KIND_NAMES = {int: "an integer", (int, float): "a number", str: "a string", dict: "an object", list: "a list",
               bool: "true or false"}
_MANIFEST_FIELDS = {"architecture": dict, "quantization": dict, "target": dict, "graph": dict, "generation": dict,
                    "files": dict, "format_version": int}
_ARCH_FIELDS = {"model_type": str, "num_layers": int, "hidden_size": int, "intermediate_size": int, "num_heads": int,
                "num_kv_heads": int, "head_size": int, "vocab_size": int, "context_length": int,
                "rms_norm_eps": (int, float), "rope_theta": (int, float)}
_POSITIVE = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_size", "vocab_size", "context_length")


def check_graph(folder: Path, manifest: Manifest, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """The graph's inputs and outputs (name -> shape, a dim an int or a name) are the ones `manifest`
    describes: its flavour's inputs, one key/value cache pair per layer of (kv_heads, head_size),
    logits over the vocabulary. Raises BundleError naming what differs."""
    a = manifest.architecture
    where = f"{folder}: model.onnx does not match {MANIFEST}"
    flavour = manifest.graph.get("flavour", "fused")
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: the manifest is not a JSON object; the bundle is damaged: export it again")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: manifest has no integer format_version")
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
    for name, digest in manifest.files.items():
        if Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{folder}: {MANIFEST} lists {name!r}, which is not a file of the bundle folder")
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
