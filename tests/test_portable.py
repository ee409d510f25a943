"""The portable graph: standard ONNX operators only, same results as transformers and as the fused graph.

Tolerances: fp32 logits within 1e-4 of transformers (as tests/test_parity.py for the fused
graph); quantized weights within 1e-4 of the same weights run through MatMulNBits with
fp32 compute (both dequantize the same codes exactly).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_parity import ATOL, PROMPT, check_parity

from edgekit.device import Model
from edgekit.host import ExportOptions, export, graph
from edgekit.host.families import family_of
from edgekit.host.load import fp32_weights
from edgekit.host.quant.rtn import QuantSpec, rtn
from edgekit.host.target_fit import set_accuracy_level

FP32_PORTABLE = dict(target="jetson-orin-nano", quant="none")  # the portable flavour, weights left in fp32


def _ops(bundle) -> set[tuple[str, str]]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return {(n.domain, n.op_type) for n in model.graph.node}


@pytest.mark.parametrize("model_type, config", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 500000.0}}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 8}),
], ids=["llama-gqa-tied", "llama-mha-bias", "llama3-rope", "qwen2", "mistral-sliding-window"])
def test_portable_fp32_logits_match_transformers(make_tiny, smol_tokenizer, tmp_path, model_type, config):
    folder, hf = make_tiny(model_type, **config)
    bundle = export(folder, tmp_path / "portable", ExportOptions(**FP32_PORTABLE), progress=lambda _: None)

    assert Model(bundle).manifest.graph.flavour == "portable"
    assert {domain for domain, _ in _ops(bundle)} == {""}, "only the default ONNX domain"
    assert check_parity(bundle, hf, smol_tokenizer) < ATOL


def test_portable_generates_the_same_text_as_fused_on_a_tiny_model(make_tiny, tmp_path):
    folder, _ = make_tiny("llama", tie_word_embeddings=True)
    fused = Model(export(folder, tmp_path / "fused", progress=lambda _: None))
    portable = Model(export(folder, tmp_path / "portable", ExportOptions(**FP32_PORTABLE), progress=lambda _: None))

    a = fused.generate(PROMPT, max_new_tokens=24, temperature=0.0)
    b = portable.generate(PROMPT, max_new_tokens=24, temperature=0.0)
    assert a.token_ids == b.token_ids
    # the cache is reused across prompts that share a beginning, as in the fused path
    again = portable.generate(PROMPT + " again", max_new_tokens=4, temperature=0.0)
    assert again.stats.cached_tokens > 0
    assert again.token_ids == fused.generate(PROMPT + " again", max_new_tokens=4, temperature=0.0).token_ids


def _quantized_decoder(model, spec: QuantSpec):
    """`model` described for the graph with every Linear of its layers as RTN MatMulNBits weights."""
    family = family_of(model)
    arch = family.architecture(64)
    weights = fp32_weights(model)
    for i in range(arch.num_layers):
        for path in family.linears:
            name = f"{family.decoder_layers}.{i}.{path}.weight"
            weights[name] = rtn(torch.from_numpy(weights[name]), spec)
    return arch, family.describe(weights, arch)


def _prefill_logits(model: onnx.ModelProto, arch, ids: np.ndarray, portable: bool) -> np.ndarray:
    options = ort.SessionOptions()
    # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, by default with int8 compute (level 4)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    s = ids.shape[1]
    feeds = {"input_ids": ids, "num_logits_to_keep": np.array([s], np.int64)}
    if portable:
        feeds["position_ids"] = np.arange(s, dtype=np.int64)[None]
    else:
        feeds["seqlens_k"] = np.array([s - 1], np.int32)
        feeds["total_sequence_length"] = np.array(s, np.int32)
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, arch.num_kv_heads, 0, arch.head_size), np.float32)
    return sess.run(["logits"], feeds)[0]


def test_a_portable_bundle_computes_at_its_targets_accuracy_level(make_tiny, tmp_path):
    """rpi4 (no SDOT) computes in fp32: onnxruntime's fused MatMulNBits ran at its own default, int8."""
    folder, _ = make_tiny("llama", tie_word_embeddings=False)
    options = ExportOptions(target="rpi4", flavour="portable", quant="rtn", bits=4, group_size=32)
    bundle = export(folder, tmp_path / "rpi4-portable", options, progress=lambda _: None)
    manifest = Model(bundle).manifest
    assert manifest.target.matmulnbits_accuracy_level == 1
    assert manifest.quantization.extra["operator"] == "DequantizeLinear + MatMul" == " + ".join(
        sorted({op for domain, op in _ops(bundle) if op in ("DequantizeLinear", "MatMul")}))
    ids = np.random.default_rng(0).integers(0, 1000, 12).tolist()

    def logits(**session_config) -> np.ndarray:
        return Model(bundle, session_config=session_config).prefill(ids)[0]

    level = "session.qdq_matmulnbits_accuracy_level"
    assert np.array_equal(logits(), logits(**{level: "1"}))
    assert not np.array_equal(logits(), logits(**{level: "4"}))  # int8 compute is another computation
    # fp32 compute: a run over several tokens gives single steps' logits, so prompt lookup is on by default
    assert Model(bundle).exact_multi_token_runs
    assert not Model(bundle, session_config={level: "4"}).exact_multi_token_runs
    text = "the robot picks the red cube, the robot picks the red cube, the robot picks the"
    drafted, one_by_one = (Model(bundle).generate(text, max_new_tokens=24, temperature=0.0, prompt_lookup=lookup)
                           for lookup in (True, False))
    assert drafted.token_ids == one_by_one.token_ids


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)], ids=["int4-sym", "int4-zero-points", "int8"])
def test_blocked_dequantize_linear_matches_matmulnbits(make_tiny, bits, sym):
    _, hf = make_tiny("llama", tie_word_embeddings=False)
    arch, decoder = _quantized_decoder(hf, QuantSpec(bits=bits, group_size=32, sym=sym))

    fused = graph.build(decoder, "fused")
    set_accuracy_level(fused, 1)  # fp32 compute: the same arithmetic as DequantizeLinear + MatMul
    portable = graph.build(decoder, "portable")
    dq = [n for n in portable.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(n.domain == "" for n in portable.graph.node)
    assert {a.name: a.i for a in dq[0].attribute}["block_size"] == 32

    ids = np.random.default_rng(0).integers(0, arch.vocab_size, (1, 12))
    want = _prefill_logits(fused, arch, ids, portable=False)
    got = _prefill_logits(portable, arch, ids, portable=True)
    assert np.abs(got - want).max() < ATOL


@pytest.mark.slow
def test_smollm2_portable_gives_the_fused_greedy_tokens(smollm2_bundle, tmp_path):
    portable = export("smollm2-135m", tmp_path / "portable", ExportOptions(**FP32_PORTABLE), progress=lambda _: None)
    want = Model(smollm2_bundle).generate(PROMPT, max_new_tokens=16, temperature=0.0)
    got = Model(portable).generate(PROMPT, max_new_tokens=16, temperature=0.0)
    assert got.token_ids == want.token_ids
    assert len(got.token_ids) == 16
