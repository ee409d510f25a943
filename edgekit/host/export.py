"""The export pipeline: model in, bundle out.

    load ──► merge adapters ──► quantize ──► build graph ──► write bundle

Each stage is a plain function call below; a stage that has nothing to do for the
given options returns its input. The bundle is written to a temporary folder beside
`out` and renamed into place only when complete, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import edgekit
from edgekit.device.bundle import MANIFEST, Manifest, write_manifest
from edgekit.host import chat_format
from edgekit.host.graph import OPSET, build_decoder
from edgekit.host.load import ExportError, LoadedModel, architecture, fp32_weights, load, rotary_tables, sliding_window

# The device profile used until targets/ profiles are chosen explicitly.
DEFAULT_TARGET = {"name": "x86-avx2", "arch": "x86_64", "execution_providers": ["CPUExecutionProvider"]}
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ExportOptions:
    context_length: int | None = None  # KV cache length; default min(2048, the model's maximum)
    target: dict = field(default_factory=lambda: dict(DEFAULT_TARGET))
    adapters: list[str] = field(default_factory=list)  # "[name=]path[:weight]" specs (host/adapters.py)
    # quantization (host/quant/); None means the method's or the target's default
    quant: str | None = None  # none | rtn | gptq | awq | smoothquant
    bits: int | None = None
    group_size: int | None = None
    calib: str | None = None  # a .txt or .jsonl file; None: the built-in default text
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    seed: int = 0


def export(source: str | Path, out: str | Path, options: ExportOptions | None = None,
           progress: Callable[[str], None] | None = None) -> Path:
    """Export `source` (shipped name, HF folder or .gguf) to a bundle folder `out`.

    Returns the bundle's path. Raises ExportError for unusable input; `out` is then untouched.
    """
    options = options or ExportOptions()
    say = progress or _stderr
    out = Path(out)
    _check_out(out)

    t = time.perf_counter()
    say(f"[1/3] loading {source}")
    loaded = load(source)
    say(f"      {loaded.model.config.model_type}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M "
        f"parameters ({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    say("[2/3] building the fused ONNX graph")
    arch = architecture(loaded.model, options.context_length)
    model_proto = build_decoder(arch, fp32_weights(loaded.model, arch.tie_word_embeddings),
                                *rotary_tables(loaded.model, arch.context_length),
                                sliding_window=sliding_window(loaded.model, arch.context_length))
    say(f"      {len(model_proto.graph.node)} nodes, context length {arch.context_length} "
        f"({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    say(f"[3/3] writing the bundle to {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_bundle(tmp, loaded, arch, model_proto, options)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    say(f"      {size:.1f} MB ({time.perf_counter() - t:.1f}s)")
    return out


def write_bundle(folder: Path, loaded: LoadedModel, arch, model_proto: onnx.ModelProto,
                 options: ExportOptions, quantization: dict | None = None, adapters: list | None = None) -> None:
    onnx.save_model(model_proto, folder / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    tok = loaded.tokenizer
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    chat = chat_format.derive(tok)
    if chat is not None:
        (folder / "chat_template.jinja").write_text(tok.chat_template)
    manifest = Manifest(
        architecture=arch,
        quantization=quantization or {"method": "none", "dtype": "float32"},
        target=options.target,
        graph={
            "flavour": "fused",
            "opset": OPSET,
            "opset_com_microsoft": 1,
            "kv_layout": "BNSH",
            "past_present_share_buffer": True,
            "inputs": [i.name for i in model_proto.graph.input][:4],
        },
        generation=generation_defaults(loaded),
        chat=chat,
        source={"spec": loaded.source.spec, "gguf_file": loaded.source.gguf_file,
                "name_or_path": getattr(loaded.model.config, "_name_or_path", "")},
        adapters=adapters or [],
        edgekit_version=edgekit.__version__,
    )
    write_manifest(folder, manifest)


def generation_defaults(loaded: LoadedModel) -> dict:
    """The model's own generation_config, as the runtime's defaults (greedy unless it samples)."""
    gc = loaded.model.generation_config
    eos = gc.eos_token_id if gc.eos_token_id is not None else loaded.tokenizer.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    sampling = bool(gc.do_sample)
    return {
        "eos_token_ids": eos_ids,
        "bos_token_id": loaded.tokenizer.bos_token_id,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "temperature": float(gc.temperature or 1.0) if sampling else 0.0,
        "top_k": int(gc.top_k or 0) if sampling else 0,
        "top_p": float(gc.top_p or 1.0) if sampling else 1.0,
        "repetition_penalty": float(gc.repetition_penalty or 1.0),
    }


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).exists())):
        raise ExportError(f"{out} exists and is not a bundle; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
