"""The bundle: the one thing that crosses from host to device.

A bundle is a folder:

    model.onnx            the graph (weights inline, or in model.onnx.data when large)
    model.onnx.data       external weights, when present
    tokenizer.json        a Hugging Face `tokenizers` file
    chat_template.jinja   the model's own chat template, when it has one
    edgekit.json          this manifest: what the graph is, how to run it, sha256 of every file

Both sides import this module; it imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "edgekit.json"


class BundleError(Exception):
    """A bundle that cannot be used: missing, altered, or from a newer edgekit."""


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
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["architecture"] = Architecture(**d["architecture"])
        return cls(**d)


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: manifest has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format {version} is newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade edgekit on the device, or re-export with the edgekit version installed here"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except TypeError as e:
        raise BundleError(f"{path}: manifest does not match format {version}: {e}") from None
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: Manifest) -> None:
    for name, digest in manifest.files.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{folder}: file {name} is missing (listed in {MANIFEST})")
        if sha256_file(p) != digest:
            raise BundleError(
                f"{folder}: file {name} does not match its sha256 in {MANIFEST}; "
                "the bundle was altered or damaged in transfer, copy it again"
            )
