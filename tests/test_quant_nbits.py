"""The integer layouts agree with onnxruntime's own kernels.

Each case builds a one-node graph (MatMulNBits or DynamicQuantizeMatMul) from a quantized
random weight and compares the kernel's output with x @ dequantize(W).T computed in numpy.
Tolerance: MatMulNBits with accuracy_level=4 quantizes x to int8 per block inside the
kernel, so the output differs from the fp32 reference by about 1% of its scale; we allow
3e-2 relative to max|y|. A wrong packing (nibble order, scale order, zero points) gives
errors of the order of 100%.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgekit.host.graph.fused import Fused
from edgekit.host.graph.proto import Graph
from edgekit.host.quant.nbits import NBitsWeight, W8A8Weight
from edgekit.host.quant.rtn import QuantSpec, quantize_dequantize, rtn
from edgekit.host.quant.w8a8 import quantize_w8a8

REL_TOL = 3e-2


def run_one_node(weight, x: np.ndarray) -> np.ndarray:
    g = Graph()
    y = Fused(g, decoder=None).matmul("/test/proj", "x", weight)  # the operator the fused graph emits
    n = weight.out_features
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [*x.shape[:-1], n])],
                              initializer=g.initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("bits,group_size,sym", [
    (4, 32, False), (4, 64, True), (4, 128, False), (4, 128, True), (4, 0, False),
    (8, 128, False), (8, 0, True), (8, 0, False),
])
@pytest.mark.parametrize("k", [256, 576])  # 576 = SmolLM2's hidden size, not a multiple of 128
def test_matmulnbits_kernel_matches_dequantized_weight(bits, group_size, sym, k):
    torch.manual_seed(0)
    w = torch.randn(96, k)
    x = np.random.default_rng(0).standard_normal((2, 5, k)).astype(np.float32)
    q = rtn(w, QuantSpec(bits, group_size, sym))
    w_hat = q.dequantize()
    assert np.allclose(w_hat, quantize_dequantize(w, QuantSpec(bits, group_size, sym)).numpy(), atol=1e-6)
    got = run_one_node(q, x)
    assert rel_err(got, x @ w_hat.T) < REL_TOL
    # and the quantization itself is as fine as the bits promise
    assert np.abs(w_hat - w.numpy()).max() <= q.scales.max() * (0.5 if not sym else 1.0) + 1e-6


def test_stacked_rows_keep_each_weights_scales():
    torch.manual_seed(1)
    ws = [torch.randn(n, 128) * (i + 1) for i, n in enumerate((64, 32, 32))]
    spec = QuantSpec(4, 32, False)
    packed = NBitsWeight.stack([rtn(w, spec) for w in ws])
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    want = np.concatenate([x @ rtn(w, spec).dequantize().T for w in ws], axis=-1)
    assert rel_err(run_one_node(packed, x), want) < REL_TOL


def test_dynamic_quantize_matmul_matches_int8_weight():
    torch.manual_seed(2)
    w = torch.randn(80, 576)
    q = quantize_w8a8(w)
    assert isinstance(q, W8A8Weight) and q.codes.dtype == np.int8
    x = np.random.default_rng(2).standard_normal((1, 7, 576)).astype(np.float32)
    # activations are rounded to uint8 per tensor: error about max|x| / 255 per element
    assert rel_err(run_one_node(q, x), x @ q.dequantize().T) < REL_TOL
    assert np.abs(q.dequantize() - w.numpy()).max() <= q.scales.max() / 2 + 1e-6


def test_nbits_weight_bytes_are_what_the_bits_promise():
    q = rtn(torch.randn(576, 576), QuantSpec(4, 128, False))
    b, scales, zp = q.packed()
    assert b.shape == (576, 5, 64) and b.dtype == np.uint8  # 576 / 128 -> 5 blocks, 128 * 4 bits = 64 B
    assert scales.shape == (576 * 5,) and zp.shape == (576 * 3,)  # 5 zero points packed in 3 bytes per row
    assert isinstance(q, NBitsWeight)


def test_per_token_w8a8_matches_int8_reference():
    """Per-token activation scales: each row of x is rounded to int8 with its own max |x|."""
    torch.manual_seed(3)
    w = torch.randn(80, 576)
    q = quantize_w8a8(w, activations="per_token")
    x = np.random.default_rng(3).standard_normal((1, 7, 576)).astype(np.float32)
    x[0, 0] *= 50  # one outlier token: per-tensor scaling would blur all the others
    s = np.abs(x).max(-1, keepdims=True) / 127
    x_hat = np.clip(np.round(x / s), -127, 127) * s
    got = run_one_node(q, x)
    assert np.abs(got - x_hat @ q.dequantize().T).max() < 1e-3 * np.abs(got).max()
    for t in range(1, 7):  # the ordinary tokens keep their precision despite the outlier
        assert rel_err(got[0, t], (x @ q.dequantize().T)[0, t]) < 2e-2  # per tensor: ~50x worse


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([4, 8]), group_size=st.sampled_from([0, 16, 32, 64]), sym=st.booleans(),
       k=st.sampled_from([64, 96, 576]), rows=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_quantized_embedding_gathers_exactly_the_dequantized_rows(bits, group_size, sym, k, rows, seed):
    """GatherBlockQuantized reads MatMulNBits' codes, scales and zero points row by row: the rows it
    returns are the dequantized table's, to the float (the quantized bundles' embedding, host/quant)."""
    torch.manual_seed(seed)
    table = rtn(torch.randn(rows, k), QuantSpec(bits, group_size, sym))
    assume(k % table.block_size == 0)  # the graph builder dequantizes a padded table instead (skeleton.embed)
    g = Graph()
    y = Fused(g, decoder=None).gather("/model/embed_tokens", "model.embed_tokens.weight", table)
    ids = np.random.default_rng(seed).integers(0, rows, (1, 7))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 7])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 7, k])],
                              initializer=g.initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input_ids": ids})[0], table.dequantize()[ids])
