"""The bundle contract: what export writes, and what the runtime refuses."""

from __future__ import annotations

import json
import shutil

import pytest

from edgekit.device import BundleError, Model, read_manifest
from edgekit.device.bundle import FORMAT_VERSION, MANIFEST


def test_bundle_holds_the_files_the_design_names(tiny_bundle):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja", MANIFEST} <= names
    m = read_manifest(tiny_bundle)
    assert set(m.files) == names - {MANIFEST}
    a = m.architecture
    assert (a.model_type, a.num_layers, a.num_heads, a.num_kv_heads, a.head_size) == ("llama", 2, 4, 2, 16)
    assert a.vocab_size == 49152 and a.context_length == 256
    assert m.quantization["method"] == "none"
    assert m.graph["flavour"] == "fused" and m.graph["opset"] == 21
    assert m.target["name"] == "x86-avx2"
    assert m.generation["eos_token_ids"] == [2] and m.generation["temperature"] == 0.0
    assert m.format_version == FORMAT_VERSION


def test_fused_graph_uses_contrib_kernels_not_hundreds_of_small_ops(tiny_bundle):
    import onnx

    graph = onnx.load(tiny_bundle / "model.onnx", load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers = 2
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("SimplifiedLayerNormalization") == 1
    assert not {"Transpose", "Cast", "Softmax"} & set(ops)
    assert len(ops) <= 12 * layers + 12
    assert "/model/layers.0/attn/qkv_proj/MatMul" in {n.name for n in graph.node}


def test_an_altered_file_is_refused_naming_the_file(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    with open(bundle / "model.onnx.data", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        Model(bundle)


def test_a_missing_file_is_refused_naming_the_file(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        Model(bundle)


def test_a_bundle_from_a_newer_format_is_refused(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    raw = json.loads((bundle / MANIFEST).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (bundle / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="newer than this runtime reads"):
        Model(bundle)


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        Model(tmp_path)


def test_a_bundle_is_written_with_the_users_umask(tiny_folder, tmp_path):
    """Readable by a service user and by whoever the bundle is copied to, as any file the user makes."""
    import os
    import stat

    from edgekit.host import export

    old = os.umask(0o022)
    try:
        bundle = export(tiny_folder, tmp_path / "b", progress=lambda _: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in bundle.iterdir()} == \
        {p.name: 0o644 for p in bundle.iterdir()}
