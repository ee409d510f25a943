"""Quantized export on tiny random models: every method yields a bundle that runs on
onnxruntime's integer kernels and stays close to the fp32 bundle.

Tolerances, on the logits of a 12-token prompt, relative to max |fp32 logit|:
4-bit weights 0.25 (random weights have no structure for the methods to exploit, so
this only checks the bundle is the same model, not how good the method is), 8-bit 0.05.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

from edgekit.device import Model
from edgekit.host import ExportOptions, export
from edgekit.host.families import family_of
from edgekit.host.load import ExportError, load
from edgekit.host.quant import layerwise
from edgekit.host.quant.calibration import calibration_ids
from edgekit.host.quant.gptq import gptq, hessian
from edgekit.host.quant.plan import LM_HEAD
from edgekit.host.quant.rtn import QuantSpec, rtn

PROMPT = "The robot arm lifted the red cube and placed it on the shelf"
CALIB = dict(calib_samples=4, calib_seq_len=64)  # the default text (CPython's docs), small for speed

CASES = {  # name -> (ExportOptions fields, relative tolerance, operator)
    "rtn4-g32-asym": (dict(quant="rtn", bits=4, group_size=32), 0.25, "MatMulNBits"),
    "rtn4-g64-sym": (dict(quant="rtn", bits=4, group_size=64, sym=True), 0.25, "MatMulNBits"),
    "gptq4-g32": (dict(quant="gptq", bits=4, group_size=32, **CALIB), 0.25, "MatMulNBits"),
    "awq4-g32": (dict(quant="awq", bits=4, group_size=32, **CALIB), 0.25, "MatMulNBits"),
    "gptq4-int4-lm-head": (dict(quant="gptq", bits=4, group_size=32, lm_head_bits=4, **CALIB), 0.25, "MatMulNBits"),
    "rtn8-per-channel": (dict(quant="rtn", bits=8), 0.05, "MatMulNBits"),
    "gptq8-g128": (dict(quant="gptq", bits=8, group_size=128, **CALIB), 0.05, "MatMulNBits"),
    "smoothquant": (dict(quant="smoothquant", **CALIB), 0.05, "MatMulInteger"),
    "w8a8": (dict(quant="w8a8"), 0.05, "DynamicQuantizeMatMul"),
}


@pytest.fixture(scope="module")
def tiny(make_tiny, tmp_path_factory):
    """A tiny tied-embedding Llama, its fp32 bundle and the fp32 logits of PROMPT."""
    folder, _ = make_tiny("llama", tie_word_embeddings=True)
    fp32 = export(folder, tmp_path_factory.mktemp("q") / "fp32", progress=lambda _: None)
    model = Model(fp32)
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    return folder, fp32, ids, model.forward(ids, 0, all_logits=True)


def ops(bundle) -> list:
    return list(onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("name", CASES)
def test_quantized_bundle_runs_integer_kernels_close_to_fp32(name, tiny, tmp_path):
    folder, _, ids, want = tiny
    fields, tol, op = CASES[name]
    bundle = export(folder, tmp_path / name, ExportOptions(**fields), progress=lambda _: None)

    got = Model(bundle).forward(ids, 0, all_logits=True)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"{name}: max |logits - fp32| is {err:.3f} of max |fp32| (> {tol})"

    nodes = ops(bundle)
    kinds = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMul", "Gemm")
    count = {t: sum(n.op_type == t for n in nodes) for t in kinds}
    # 2 layers x (qkv, o_proj, gate_proj, up_proj, down_proj), and lm_head always MatMulNBits
    assert count[op] == 10 + (op == "MatMulNBits")
    assert count["MatMulNBits"] >= 1 and count["MatMul"] == count["Gemm"] == 0, f"a Linear was left in fp32: {count}"
    assert all(a.i == 4 for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")
    record = json.loads((bundle / "edgekit.json").read_text())["quantization"]
    assert record["method"] == fields["quant"] and record["operator"] == op
    head = next(n for n in nodes if n.output[0].startswith("/lm_head/"))
    head_bits = {a.name: a.i for a in head.attribute}
    if fields.get("lm_head_bits") == 4:
        assert record["lm_head"].startswith("int4 g32 MatMulNBits, gptq")  # calibrated method: calibrated head
        assert (head_bits["bits"], head_bits["block_size"]) == (4, 32)
    else:
        assert record["lm_head"].startswith("int8 per-channel MatMulNBits") and head_bits["bits"] == 8


def test_calibrated_int4_lm_head_reproduces_the_logits_better_than_rtn(make_tiny):
    """A calibrated method's int4 lm_head is GPTQ on what enters the lm_head over the calibration
    samples (layerwise.head_inputs: the final norm's output); on those samples its logits are
    closer to fp32's than round-to-nearest's."""
    folder, _ = make_tiny("llama", seed=3, tie_word_embeddings=True)
    loaded = load(folder)
    calib = calibration_ids(loaded.tokenizer, None, 8, 64, seed=0)
    x = layerwise.head_inputs(loaded.model, calib.ids)
    with torch.no_grad():
        final = loaded.model(calib.ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
    assert x.shape == final.shape and torch.allclose(x, final, atol=1e-5)
    w = loaded.model.get_output_embeddings().weight.data
    flat = x.reshape(-1, x.shape[-1])

    def error(q):
        return float(torch.linalg.norm(flat @ (w - torch.from_numpy(q.dequantize())).T))

    assert error(gptq(w, hessian(x, 8.0), LM_HEAD[4])) < 0.9 * error(rtn(w, LM_HEAD[4]))


def test_gptq_reconstructs_a_layer_better_than_rtn(make_tiny):
    """||X W^T - X W_hat^T|| on the calibration inputs of each Linear of layer 0."""
    folder, _ = make_tiny("llama", seed=3)
    loaded = load(folder)
    calib = calibration_ids(loaded.tokenizer, None, 8, 64, seed=0)
    family = family_of(loaded.model)
    layer = loaded.model.get_submodule(family.decoder_layers)[0]
    hidden, kwargs = layerwise.first_layer_inputs(loaded.model, layer, calib.ids)
    feats, _ = layerwise.linear_inputs(layer, layerwise.inputs_of(family.linears), hidden, kwargs)
    spec = QuantSpec(4, 32, sym=False)
    for path, key in family.linears.items():
        w = layer.get_submodule(path).weight.data
        x = feats[key].reshape(-1, w.shape[1])

        def error(q, x=x, w=w):
            return torch.linalg.norm(x @ w.T - x @ torch.from_numpy(q.dequantize()).T).item()

        e_rtn, e_gptq = error(rtn(w, spec)), error(gptq(w, hessian(x), spec))
        assert e_gptq < 0.9 * e_rtn, f"{path}: GPTQ error {e_gptq:.4f} not below RTN's {e_rtn:.4f}"


def test_same_seed_same_bundle_bytes(tiny, tmp_path):
    folder = tiny[0]

    def files(out, seed):
        options = ExportOptions(quant="gptq", bits=4, group_size=32, seed=seed, **CALIB)
        return json.loads((export(folder, tmp_path / out, options, progress=lambda _: None)
                           / "edgekit.json").read_text())["files"]

    a, b, c = files("a", 0), files("b", 0), files("c", 1)
    assert a == b  # sha256 of every file, model.onnx.data included
    assert a["model.onnx.data"] != c["model.onnx.data"]  # another seed draws other calibration samples


@pytest.mark.parametrize("fields,message", [
    (dict(quant="rtn", bits=3), "--bits 3 is not supported; use 4 or 8"),
    (dict(quant="gptq", bits=4, group_size=100), "--group-size 100 is not supported"),
    (dict(quant="smoothquant", bits=4), "smoothquant quantizes weights and activations to 8 bits"),
    (dict(quant="gptq", calib_samples=500, calib_seq_len=512), "too short for 500 samples x 512 tokens"),
    (dict(quant="gptq", calib_samples=500, calib_seq_len=512),  # the default text: no --calib to lengthen
     "tokens; use fewer --calib-samples or a shorter --calib-seq-len (at most "),
    (dict(quant="awq", calib="/nonexistent/calib.txt"), "--calib /nonexistent/calib.txt: no such file"),
    (dict(quant="awq", damp=0.1), "--damp applies to --quant gptq, not awq"),
    (dict(quant="gptq", damp=0), r"--damp 0 is out of range"),
    (dict(quant="smoothquant", alpha=1.5), "--alpha 1.5 is out of range"),
    (dict(quant="awq", awq_grid=0), "--awq-grid 0 must be at least 1"),
    (dict(bits=4, act_order=False), "--bits, --no-act-order only apply when quantizing"),
    (dict(quant="rtn", lm_head_bits=2), "--lm-head-bits 2 is not supported; use 8 (default) or 4"),
    (dict(quant="rtn", calib_samples=8), "--calib-samples applies to calibrated methods (gptq, awq, smoothquant, "
                                         "int4-best), not rtn"),  # it was read and ignored
    (dict(quant="gptq", calib_samples=0), "calibration needs --calib-samples >= 1 and --calib-seq-len >= 16 "
                                          "(got 0, 512)"),  # 0 was taken for "not given": 32 samples
    (dict(quant="awq", calib_seq_len=0), "(got 32, 0)"),
    # 16 tokens for 64 inputs: the Hessian has rank 16, and 1e-9 of damping leaves it singular
    (dict(quant="gptq", damp=1e-9, calib_samples=1, calib_seq_len=16), "is not positive definite with --damp 1e-09"),
])
def test_wrong_use_says_what_to_do(fields, message, tiny, tmp_path):
    with pytest.raises(ExportError, match=re.escape(message)):
        export(tiny[0], tmp_path / "out", ExportOptions(**fields), progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_missing_calib_file_is_refused_before_the_model_loads(tmp_path):
    """The model path does not exist either: the --calib error coming first shows no load happened."""
    with pytest.raises(ExportError, match=re.escape("--calib /nonexistent/calib.txt: no such file")):
        options = ExportOptions(quant="int4-best", calib="/nonexistent/calib.txt")
        export(tmp_path / "no-model", tmp_path / "out", options, progress=lambda _: None)


def test_method_settings_reach_the_bundle(tiny, tmp_path):
    folder = tiny[0]
    default = export(folder, tmp_path / "default", ExportOptions(quant="gptq", group_size=32, **CALIB),
                     progress=lambda _: None)
    tuned = export(folder, tmp_path / "tuned", ExportOptions(quant="gptq", group_size=32, damp=0.1, act_order=False,
                                                             **CALIB), progress=lambda _: None)
    smooth = export(folder, tmp_path / "smooth", ExportOptions(quant="smoothquant", alpha=0.8, **CALIB),
                    progress=lambda _: None)

    def manifest(bundle):
        return json.loads((bundle / "edgekit.json").read_text())

    def gptq_settings(bundle):
        q = manifest(bundle)["quantization"]
        return q["percdamp"], q["act_order"]

    assert gptq_settings(default) == (0.01, True)
    assert gptq_settings(tuned) == (0.1, False)
    assert manifest(tuned)["files"]["model.onnx.data"] != manifest(default)["files"]["model.onnx.data"]
    assert manifest(smooth)["quantization"]["alpha"] == 0.8


def test_method_that_cannot_apply_is_refused(make_tiny):
    from edgekit.host.quant import check_applicable

    folder, _ = make_tiny("llama")
    model = load(folder).model
    del model.model.layers[0].mlp.gate_proj  # not a Llama MLP any more
    with pytest.raises(ExportError, match="awq cannot apply to this llama model: its layers have no mlp.gate_proj"):
        check_applicable(family_of(model), "awq")


def test_a_text_is_tokenized_once_per_tokenizer_and_its_ids_cannot_be_changed(smol_tokenizer):
    from tokenizers import Tokenizer

    from edgekit.host.quant.calibration import token_ids

    text = "The arm picks up the red cube. " * 50
    want = smol_tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    first = token_ids(smol_tokenizer, text)
    assert first.tolist() == want and token_ids(smol_tokenizer, text) is first  # the second call is remembered
    assert token_ids(smol_tokenizer, text + "!") is not first
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 0
    # another tokenizer is another entry, even for the same text: here one with a token added
    other = Tokenizer.from_str(smol_tokenizer.backend_tokenizer.to_str())
    other.add_tokens(["picks up the red"])

    class Wrapped:
        backend_tokenizer = other

    assert token_ids(Wrapped(), text).tolist() == other.encode(text, add_special_tokens=False).ids != want


def test_calibration_from_jsonl_is_seeded(smol_tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Sentence number {i} about robots and rivers."})
                              for i in range(400)))
    a = calibration_ids(smol_tokenizer, path, 6, 32, seed=7)
    b = calibration_ids(smol_tokenizer, path, 6, 32, seed=7)
    c = calibration_ids(smol_tokenizer, path, 6, 32, seed=8)
    assert a.ids.shape == (6, 32) and torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert "robots" in smol_tokenizer.decode(a.ids[0])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ExportError, match="line 2 is not JSON"):
        calibration_ids(smol_tokenizer, tmp_path / "bad.jsonl", 1, 16, 0)
