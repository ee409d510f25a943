"""The export pipeline: model in, bundle out.

    load ──► merge adapters ──► quantize ──► build graph ──► write bundle

Each stage is a plain function call below; a stage that has nothing to do for the
given options returns its input. The bundle is written to a temporary folder beside
`out` and renamed into place only when complete, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

import edgekit
from edgekit.device.bundle import (
    MANIFEST,
    Generation,
    Manifest,
    Prefix,
    Quantization,
    Source,
    TargetInfo,
    from_record,
    write_manifest,
)
from edgekit.errors import ExportError
from edgekit.host import chat_format, graph
from edgekit.host.adapters import apply_adapters
from edgekit.host.families import family_of
from edgekit.host.load import SHIPPED, LoadedModel, fp32_weights, load
from edgekit.host.options import ExportOptions, ExportPlan, plan_export
from edgekit.host.target_fit import accuracy_level, check_target_fit, graph_manifest, set_accuracy_level

__all__ = ["ExportOptions", "export", "write_bundle"]


def export(source: str | Path, out: str | Path, options: ExportOptions | None = None,
           progress: Callable[[str], None] | None = None) -> Path:
    """Export `source` (shipped name, HF folder or .gguf) to a bundle folder `out`.

    Returns the bundle's path. Raises ExportError for unusable input; `out` is then untouched.
    """
    plan = plan_export(options or ExportOptions())  # every setting checked before the model loads
    target = plan.target
    say = progress or _stderr
    out = Path(out)
    _check_out(out)
    if plan.options.chat_template:
        chat_format.template_text(plan.options.chat_template)  # an unknown format fails before the model loads

    t = time.perf_counter()
    say(f"[1/3] loading {source}")
    loaded = load(source)
    say(f"      {loaded.model.config.model_type}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M "
        f"parameters ({time.perf_counter() - t:.1f}s)")
    # adapters merge into the fp32 weights here, so calibration and quantization see the adapted model
    adapter_records, prefix = apply_adapters(loaded, plan.options.adapters, say)

    t = time.perf_counter()
    flavour = plan.flavour
    say(f"[2/3] building the {flavour} ONNX graph")
    family = family_of(loaded.model)
    arch = family.architecture(plan.options.context_length)
    weights = fp32_weights(loaded.model)
    quant_record = None
    if plan.quant is not None:
        from edgekit.host.quant import quantize  # imported only when asked for

        tq = time.perf_counter()
        say(f"      quantizing: {plan.quant.method.name}")
        weights, quant_record = quantize(loaded, family, arch, weights, plan.quant, say)
        say(f"      quantized ({time.perf_counter() - tq:.1f}s)")
    decoder = family.describe(weights, arch)
    model_proto = graph.build(decoder, flavour)
    if prefix is not None and decoder.head_order is not None:  # the cache holds keys in the graph's head order
        prefix[:, 0] = prefix[:, 0][..., decoder.head_order]
    if "matmulnbits_accuracy_level" in target:  # the compute type that suits the target's ISA
        set_accuracy_level(model_proto, target["matmulnbits_accuracy_level"])
    if quant_record is not None:  # the manifest says what the graph does, read from the graph itself
        quant_record["accuracy_level"] = accuracy_level(model_proto)
        if flavour == "portable":  # standard ONNX: every quantized weight is a DequantizeLinear, weight-only
            quant_record.update(operator="DequantizeLinear + MatMul", activations="float32")
    say(f"      {len(model_proto.graph.node)} nodes, context length {arch.context_length} "
        f"({time.perf_counter() - t:.1f}s)")
    check_target_fit(model_proto, arch, plan, say)  # operators and memory on the device (device/check.py)

    t = time.perf_counter()
    say(f"[3/3] writing the bundle to {out}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        write_bundle(tmp, loaded, arch, model_proto, plan, quantization=quant_record, adapters=adapter_records,
                     prefix=prefix)
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    say(f"      {size:.1f} MB ({time.perf_counter() - t:.1f}s)")
    return out


def write_bundle(folder: Path, loaded: LoadedModel, arch, model_proto: onnx.ModelProto, plan: ExportPlan,
                 quantization: dict | None = None, adapters: list | None = None,
                 prefix: np.ndarray | None = None) -> None:
    """Write the bundle's files and manifest into `folder`; `prefix` (layers, 2, kv_heads, P, head_size)
    is a prefix-tuning adapter's keys and values, saved as prefix_kv.npz for the runtime's cache."""
    onnx.save_model(model_proto, folder / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    tok = loaded.tokenizer
    if plan.options.chat_template:
        tok.chat_template = chat_format.template_text(plan.options.chat_template)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    chat = chat_format.derive(tok)
    if chat is not None:
        (folder / "chat_template.jinja").write_text(tok.chat_template)
    manifest = Manifest(
        architecture=arch,
        quantization=from_record(Quantization, quantization or {"method": "none", "dtype": "float32"}),
        target=from_record(TargetInfo, plan.target),
        graph=graph_manifest(model_proto, plan.flavour),
        generation=generation_defaults(loaded),
        chat=chat,
        source=Source(spec=loaded.source.spec, gguf_file=loaded.source.gguf_file,
                      name_or_path=getattr(loaded.model.config, "_name_or_path", "")),
        adapters=adapters or [],
        prefix=_write_prefix(folder, arch, prefix),
        edgekit_version=edgekit.__version__,
    )
    write_manifest(folder, manifest)


def _write_prefix(folder: Path, arch, prefix: np.ndarray | None) -> Prefix | None:
    if prefix is None:
        return None
    layers, two, kv_heads, length, head_size = prefix.shape  # (layers, 2, kv_heads, P, head_size)
    assert (layers, two, kv_heads, head_size) == (arch.num_layers, 2, arch.num_kv_heads, arch.head_size)
    if length >= arch.context_length:
        raise ExportError(f"the prefix-tuning adapter's {length} virtual tokens leave no room in context length "
                          f"{arch.context_length}; export with a larger --context-length")
    np.savez(folder / "prefix_kv.npz", **{f"{kind}.{i}": prefix[i, k] for i in range(layers)
                                          for k, kind in enumerate(("key", "value"))})
    return Prefix(file="prefix_kv.npz", length=int(length))


def generation_defaults(loaded: LoadedModel) -> Generation:
    """The model's own generation_config (generation_config.json), as the runtime's defaults: greedy
    unless it samples. A shipped model's GGUF has none: its model card's settings stand in."""
    gc = loaded.model.generation_config
    eos = gc.eos_token_id if gc.eos_token_id is not None else loaded.tokenizer.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    shipped = next((m for m in SHIPPED.values() if m.file == loaded.source.gguf_file), None)  # by name or by path
    sampling = bool(gc.do_sample)
    defaults = Generation(
        eos_token_ids=eos_ids,
        bos_token_id=loaded.tokenizer.bos_token_id,
        # a setting the config leaves out takes transformers' default (top_k 50), as its generate() does
        temperature=float(1.0 if gc.temperature is None else gc.temperature) if sampling else 0.0,
        top_k=int(50 if gc.top_k is None else gc.top_k) if sampling else 0,
        top_p=float(1.0 if gc.top_p is None else gc.top_p) if sampling else 1.0,
        min_p=float(gc.min_p or 0.0) if sampling else 0.0,
        repetition_penalty=float(gc.repetition_penalty or 1.0),
    )
    if isinstance(gc.max_new_tokens, int) and gc.max_new_tokens > 0:
        defaults = replace(defaults, max_new_tokens=gc.max_new_tokens)
    return replace(defaults, **shipped.generation) if shipped is not None else defaults


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).exists())):
        raise ExportError(f"{out} exists and is not a bundle; choose another --out or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create its folder ({e.strerror})") from None


def _apply_umask(folder: Path) -> None:
    """Give the bundle the permissions of a folder the user made: mkdtemp makes it 0700 and some
    writers 0600, which a service user (or a copy to the device) could not read."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
