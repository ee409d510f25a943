"""The bundle contract: what export writes, and what the runtime refuses."""

from __future__ import annotations

import json
import shutil

import pytest

from edgekit.device import BundleError, Model, read_manifest
from edgekit.device.bundle import FORMAT_VERSION, MANIFEST, Manifest
from edgekit.errors import InputError


def test_bundle_holds_the_files_the_design_names(tiny_bundle):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja", MANIFEST} <= names
    m = read_manifest(tiny_bundle)
    assert set(m.files) == names - {MANIFEST}
    a = m.architecture
    assert (a.model_type, a.num_layers, a.num_heads, a.num_kv_heads, a.head_size) == ("llama", 2, 4, 2, 16)
    assert a.vocab_size == 49152 and a.context_length == 256
    assert m.quantization.method == "none"
    assert m.graph.flavour == "fused" and m.graph.opset == 21
    assert m.target.name == "x86-avx2"
    assert m.generation.eos_token_ids == [2] and m.generation.temperature == 0.0
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


# -- damaged bundles whose hashes were rewritten: every one is one line naming the file --------------


def rehash(bundle) -> None:
    """What a careless copy tool or a hand edit does: the files change and the manifest is re-hashed."""
    from edgekit.device.bundle import sha256_file

    raw = json.loads((bundle / MANIFEST).read_text())
    raw["files"] = {name: sha256_file(bundle / name) for name in raw["files"]}
    (bundle / MANIFEST).write_text(json.dumps(raw))


def _random_model(b):
    (b / "model.onnx").write_bytes(bytes(range(256)) * 40)


def _truncated_data(b):
    data = b / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _bad_tokenizer(b):
    (b / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _layers(b, n):
    raw = json.loads((b / MANIFEST).read_text())
    raw["architecture"]["num_layers"] = n
    (b / MANIFEST).write_text(json.dumps(raw))


def _manifest(b, text):
    (b / MANIFEST).write_text(text)


def _section(bundle, name, value):
    raw = json.loads((bundle / MANIFEST).read_text())
    raw[name] = value
    _manifest(bundle, json.dumps(raw))


def _field(bundle, section, name, value):
    raw = json.loads((bundle / MANIFEST).read_text())
    _section(bundle, section, {**raw[section], name: value})


DAMAGE = {  # damage -> what the one line must say
    "random model.onnx": (_random_model, "model.onnx: onnxruntime cannot load the graph"),
    "truncated model.onnx.data": (_truncated_data, "onnxruntime cannot load the graph"),
    "invalid tokenizer.json": (_bad_tokenizer, "tokenizer.json: not a tokenizers file"),
    "more layers than the graph": (lambda b: _layers(b, 3), "caches keys for 2 layers, the manifest says 3"),
    "manifest not an object": (lambda b: _manifest(b, "[1, 2, 3]"), "the manifest is not a JSON object"),
    "manifest without architecture": (lambda b: _manifest(b, '{"format_version": 1}'), "architecture is missing"),
    "kv heads as a string": (lambda b: _field(b, "architecture", "num_kv_heads", "2"),
                             "architecture.num_kv_heads must be an integer"),
    "a bool for the vocabulary": (lambda b: _field(b, "architecture", "vocab_size", True),
                                  "architecture.vocab_size must be an integer"),
    "a different vocabulary": (lambda b: _field(b, "architecture", "vocab_size", 1000), "a vocabulary of 1000"),
    "a different head size": (lambda b: _field(b, "architecture", "head_size", 32), "32)"),
    "a temperature as text": (lambda b: _field(b, "generation", "temperature", "hot"),
                              "generation.temperature must be a number"),
    "threads as a number with a fraction": (lambda b: _field(b, "target", "threads", 2.5),
                                            "target.threads must be an integer or null"),
    "the graph section a list": (lambda b: _section(b, "graph", []), "graph must be an object"),
    "a file outside the bundle": (lambda b: _manifest(b, (b / MANIFEST).read_text().replace(
        '"tokenizer.json"', '"../tokenizer.json"')), "not a file of the bundle folder"),
    "no file listed, the weights altered": (lambda b: (_section(b, "files", {}), _flip_byte(b / "model.onnx.data")),
                                            "has no sha256 for model.onnx,"),
    "the weights not listed": (lambda b: _section(b, "files", {n: h for n, h in json.loads(
        (b / MANIFEST).read_text())["files"].items() if n != "model.onnx.data"}), "no sha256 for model.onnx.data"),
    "a chat template outside the bundle": (lambda b: _field(b, "chat", "template", "/etc/hostname"),
                                           'chat.template must name a file of the bundle folder, got "/etc/hostname"'),
    "a chat template not UTF-8": (lambda b: (b / "chat_template.jinja").write_bytes(b"\xff{{ x }}"),
                                  "chat_template.jinja: not a readable chat template"),
    "special tokens as a list": (lambda b: _field(b, "chat", "special_tokens", ["<s>"]),
                                 "chat.special_tokens must map names to strings"),
    "no new tokens by default": (lambda b: _field(b, "generation", "max_new_tokens", 0),
                                 "generation.max_new_tokens must be at least 1, got 0"),
    "format version 0": (lambda b: _section(b, "format_version", 0), "no format_version of 1 or more"),
    "an integer of 5000 digits": (lambda b: _manifest(b, (b / MANIFEST).read_text().replace(
        '"format_version": 1', '"format_version": 1' + "0" * 5000)), "manifest is not valid JSON"),
}


def test_a_context_no_memory_holds_is_refused_in_one_line(tiny_bundle, tmp_path):
    from test_cli import assert_one_line_error, edgekit

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    _field(bundle, "architecture", "context_length", 10**13)  # petabytes of KV cache: beyond any address space
    with pytest.raises(InputError, match="pass a smaller context_length"):
        Model(bundle, verify=False)
    assert_one_line_error(edgekit("info", bundle), "the KV cache for a context of 10000000000000 tokens needs")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_bundle_is_refused_in_one_line_naming_the_file(damage, tiny_bundle, tmp_path):
    from test_cli import assert_one_line_error, edgekit

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    hurt, says = DAMAGE[damage]
    hurt(bundle)
    if damage in ("random model.onnx", "truncated model.onnx.data", "invalid tokenizer.json",
                  "a chat template not UTF-8"):
        rehash(bundle)  # the files changed and their hashes were rewritten to match
    with pytest.raises(BundleError, match=says.replace("(", r"\(").replace(")", r"\)")):
        Model(bundle)
    for command in (("info", bundle), ("generate", bundle, "hi")):
        assert_one_line_error(edgekit(*command), says)


def test_a_manifest_from_a_newer_edgekit_of_the_same_format_reads_and_keeps_what_it_adds(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    raw = json.loads((bundle / MANIFEST).read_text())
    raw["graph"]["kv_dtype"] = "float16"  # fields this runtime does not know, in a section and at the top
    raw["quantization"]["rotation"] = {"kind": "hadamard"}
    raw["telemetry"] = True
    (bundle / MANIFEST).write_text(json.dumps(raw))
    m = read_manifest(bundle)
    assert m.graph.flavour == "fused" and m.graph.extra == {"kv_dtype": "float16"}
    assert m.quantization.label == "none"
    written = json.loads(m.to_json())
    assert written["graph"]["kv_dtype"] == "float16" and written["quantization"]["rotation"] == {"kind": "hadamard"}
    assert Manifest.from_dict(written) == m


def test_settings_out_of_range_are_refused(tiny_bundle):
    for threads in (-1, 1025):
        with pytest.raises(ValueError, match=r"threads must be a whole number from 0 \(onnxruntime's choice\) to 1024"):
            Model(tiny_bundle, threads=threads)
    with pytest.raises(ValueError, match="context_length must be a whole number >= 2"):
        Model(tiny_bundle, context_length=0)


def test_sampling_the_model_config_leaves_out_takes_transformers_defaults(tiny_folder, tmp_path):
    """Llama 3.2 Instruct's generation_config names temperature and top_p, not top_k: transformers'
    generate() then samples with top_k 50, so the bundle does too."""
    from edgekit.host import export

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(
        {**config, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 77}))
    generation = Model(export(folder, tmp_path / "b", progress=lambda _: None)).manifest.generation
    assert (generation.temperature, generation.top_k, generation.top_p, generation.max_new_tokens) == \
        (0.6, 50, 0.9, 77)


def test_a_finished_stream_read_again_keeps_its_completion(tiny_bundle):
    stream = Model(tiny_bundle).stream("Robots", max_new_tokens=3, temperature=0)
    text = "".join(stream)
    assert list(stream) == [] and stream.completion is not None and stream.completion.text == text
