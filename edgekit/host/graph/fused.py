"""The fused flavour: onnxruntime's contrib operators for decoder LLMs (the default).

The operator set onnxruntime's own LLM tooling emits, so its CPU and CUDA kernels apply:

    RMSNorm / LayerNorm   SimplifiedLayerNormalization / LayerNormalization, and their Skip
                          forms (com.microsoft) that also add the residual
    Linear                MatMul (fp32), MatMulNBits (int4/int8 weights), DynamicQuantizeMatMul
                          or MatMulInteger (W8A8)
    embedding             Gather (fp32), GatherBlockQuantized (int8 table of quantized bundles)
    attention             GroupQueryAttention: rotary embedding, the causal (or sliding-window)
                          mask, softcap, an additive bias (ALiBi) and the KV cache update in one
                          kernel

How the features GroupQueryAttention has no attribute for are expressed, and why:
- partial and interleaved rotary: the family permutes each q/k head so that the rotated pairs
  sit where GQA's rotate-half rotary expects them, and pads the cos/sin tables with 1/0 for the
  rest (host/decoder.py). The rotary then stays inside GQA's kernel, where it costs nothing,
  instead of two RotaryEmbedding nodes per layer.
- q/k norms: SimplifiedLayerNormalization on q and k before GQA (GQA's own q/k-norm inputs
  exist only in recent onnxruntime releases; a device may run an older one).
- ALiBi: GQA's attention_bias input, slope * key position for every head, computed once per
  run and shared by all layers.
- LongRoPE (Phi-3): an If node picks the short or the long cos/sin tables by the run's total
  length, as transformers switches between its factors.

Graph inputs and outputs (B = batch, S = new tokens, P = past length, T = P + S):

    input_ids               int64   (B, S)
    seqlens_k               int32   (B,)     T - 1 for each row
    total_sequence_length   int32   ()       T
    num_logits_to_keep      int64   (1,)     logits for the last N positions only
    past_key_values.{i}.key|value   float32 (B, kv_heads, P, head_size)
    logits                  float32 (B, N, vocab)
    present.{i}.key|value   float32 (B, kv_heads, T, head_size)

When past and present are bound to the same buffer of the context length
(device/generate.py does), P = T = context length and the cache never moves.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgekit.errors import ExportError
from edgekit.host.decoder import Attention, Decoder, Norm
from edgekit.host.graph.proto import MS_DOMAIN, OPSET, Graph, branch_of, int64
from edgekit.host.quant.nbits import NBitsWeight, W8A8Weight

NAME = "fused"


class Fused:
    graph_name = "edgekit_decoder"
    opsets = {"": OPSET, MS_DOMAIN: 1}

    def __init__(self, g: Graph, decoder: Decoder):
        self.g = g
        self.decoder = decoder
        self.tables: dict[str, tuple[str, str]] = {}  # rotary key -> cos, sin cache names

    @staticmethod
    def check(decoder: Decoder) -> None:
        """What onnxruntime's kernels need of the model, refused before any work."""
        hd = decoder.arch.head_size
        if hd % 16:
            raise ExportError(f"head size {hd} is not a multiple of 16, which onnxruntime's GroupQueryAttention "
                              "(the fused graph) needs; export the portable graph instead: --flavour portable")

    def inputs(self) -> list:
        return [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
        ]

    def begin(self) -> None:
        """The rotary tables, which every layer's GroupQueryAttention reads."""
        for key, rot in self.decoder.rotary.items():
            suffix = "" if key == "default" else f".{key}"
            cos, sin = self.g.const(f"cos_cache{suffix}", rot.cos), self.g.const(f"sin_cache{suffix}", rot.sin)
            if rot.long is not None:
                cos, sin = self._longrope(suffix, cos, sin, rot.long, rot.switch_at)
            self.tables[key] = (cos, sin)

    def _longrope(self, suffix: str, cos: str, sin: str, long: tuple, switch_at: int) -> tuple[str, str]:
        """The long tables once the run's total length passes `switch_at`, else the short ones.

            total_sequence_length ──► Greater(switch_at) ──► If ─► then: long cos, sin
                                                                └► else: short cos, sin
        """
        g, n = self.g, f"/model/rotary{suffix}"
        long_cos, long_sin = g.const(f"cos_cache{suffix}.long", long[0]), g.const(f"sin_cache{suffix}.long", long[1])
        (cond,) = g.op("Greater", ["total_sequence_length", g.const(f"{n}/switch_at", np.array(switch_at, np.int32))],
                       f"{n}/Greater")
        cos, sin = g.op("If", [cond], f"{n}/If", outputs=2, then_branch=branch_of(f"{n}/long", long_cos, long_sin),
                        else_branch=branch_of(f"{n}/short", cos, sin))
        return cos, sin

    def positions(self) -> str:
        """(1, S) int64 positions of the new tokens: T - S .. T - 1."""
        g, n = self.g, "/model/positions"
        total = self._total()
        new = g.shared_op("Gather", [self._ids_shape(), g.shared("/model/const/one", np.array(1, np.int64))],
                          "/model/input_ids/Gather")  # S, a scalar
        start = g.shared_op("Sub", [total, new], f"{n}/Sub")
        pos = g.shared_op("Range", [start, total, g.shared("/model/const/one", np.array(1, np.int64))], f"{n}/Range")
        return g.shared_op("Unsqueeze", [pos, g.shared("/model/const/axes_0", int64(0))], f"{n}/Unsqueeze")

    def _total(self) -> str:
        """T as an int64 scalar."""
        return self.g.shared_op("Cast", ["total_sequence_length"], "/model/total/Cast", to=TensorProto.INT64)

    def _ids_shape(self) -> str:
        return self.g.shared_op("Shape", ["input_ids"], "/model/input_ids/Shape")

    # -- operators ------------------------------------------------------------------------

    def norm(self, name: str, norm: Norm, x: str, residual: str | None = None,
             keep_sum: bool = True) -> tuple[str, str | None]:
        """norm(x), or norm(x + residual) in one Skip node that also returns the sum."""
        g = self.g
        inputs = [g.const(f"{norm.name}.weight", norm.weight)]
        if norm.bias is not None:
            inputs.append(g.const(f"{norm.name}.bias", norm.bias))
        eps = float(norm.eps)
        if residual is None:
            op = "SimplifiedLayerNormalization" if norm.rms else "LayerNormalization"
            (y,) = g.op(op, [x, *inputs], f"{name}/LayerNorm", axis=-1, epsilon=eps, stash_type=1)
            return y, None
        op = "SkipSimplifiedLayerNormalization" if norm.rms else "SkipLayerNormalization"
        if keep_sum:
            y, _, _, total = g.op(op, [x, residual, *inputs], f"{name}/SkipLayerNorm", outputs=4, domain=MS_DOMAIN,
                                  epsilon=eps)
            return y, total
        (y,) = g.op(op, [x, residual, *inputs], f"{name}/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)
        return y, None

    def matmul(self, name: str, x: str, weight) -> str:
        """x @ W.T for a Linear weight W (out, in): fp32, MatMulNBits or W8A8."""
        g = self.g
        if isinstance(weight, np.ndarray):
            (y,) = g.op("MatMul", [x, g.const(f"{name}.weight", weight.T)], f"{name}/MatMul")
            return y
        if isinstance(weight, NBitsWeight):
            return _matmul_nbits(g, name, x, weight)
        assert isinstance(weight, W8A8Weight), type(weight)
        return _matmul_w8a8(g, name, x, weight)

    def gather(self, name: str, table_name: str, table: NBitsWeight) -> str:
        """input_ids (B, S) ──► GatherBlockQuantized(codes (V, H * bits / 8), scales, zero points) ──► (B, S, H)

        The codes, scales and zero points of MatMulNBits' layout, one row per token: the kernel
        dequantizes only the rows it gathers.
        """
        assert table.codes.shape[1] == table.in_features, "a padded last block would be gathered too"
        b, scales, zp = table.packed()
        rows = table.out_features
        inputs = [self.g.const(f"{table_name}_Q{table.bits}", b.reshape(rows, -1)), "input_ids",
                  self.g.const(f"{table_name}_scales", scales.reshape(rows, -1))]
        if zp is not None:
            inputs.append(self.g.const(f"{table_name}_zero_points", zp.reshape(rows, -1)))
        (h,) = self.g.op("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain=MS_DOMAIN,
                         bits=table.bits, block_size=table.block_size, gather_axis=0, quantize_axis=1)
        return h

    def gelu(self, name: str, x: str, tanh: bool) -> str:
        """com.microsoft Gelu (erf) or FastGelu (tanh): CPU and CUDA kernels (ONNX's own Gelu has no CUDA one)."""
        op = "FastGelu" if tanh else "Gelu"
        (y,) = self.g.op(op, [x], f"{name}/{op}", domain=MS_DOMAIN)
        return y

    def attention(self, n: str, i: int, att: Attention, q: str, k: str = "", v: str = "") -> str:
        """GroupQueryAttention over packed qkv (k, v empty) or separate q, k, v (B, S, heads * head_size).

            qkv ──► GroupQueryAttention(rotary, causal/window, softcap, bias; past ──► present) ──► out
        """
        cos, sin = self.tables[att.rotary] if att.rotary else ("", "")
        bias = self._alibi(att.alibi) if att.alibi is not None else ""
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                  "total_sequence_length", cos, sin, "", bias]
        while inputs[-1] == "":  # trailing optional inputs left out
            inputs.pop()
        out, _, _ = self.g.op(
            "GroupQueryAttention", inputs, f"{n}/attn/GroupQueryAttention",
            outputs=[f"{n}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, num_heads=att.num_heads, kv_num_heads=att.num_kv_heads,
            do_rotary=int(att.rotary is not None), rotary_interleaved=0, scale=float(att.scale),
            local_window_size=att.window or -1, softcap=att.softcap)
        return out

    def _alibi(self, table: np.ndarray) -> str:
        """GQA's attention_bias (1, heads, S, T): the ALiBi table's first T positions, shared by every layer.

            table (heads, ctx) ──► Slice[:, :T] ──► Unsqueeze (1, heads, 1, T) ──► Expand (1, heads, S, T)
        """
        g, n = self.g, "/model/alibi"
        heads = table.shape[0]
        total = g.shared_op("Unsqueeze", [self._total(), g.shared("/model/const/axes_0", int64(0))], f"{n}/Unsqueeze")
        rows = g.shared_op("Slice", [g.shared("alibi_table", table.astype(np.float32)),
                                     g.shared("/model/const/zero_1d", int64(0)), total,
                                     g.shared("/model/const/one_1d", int64(1))], f"{n}/Slice")  # (heads, T)
        bias = g.shared_op("Unsqueeze", [rows, g.shared(f"{n}/axes_0_2", int64(0, 2))], f"{n}/Unsqueeze_1")
        new = g.shared_op("Slice", [self._ids_shape(), g.shared("/model/const/one_1d", int64(1)),
                                    g.shared(f"{n}/two_1d", int64(2))], f"{n}/Slice_1")  # (1,): S
        shape = g.shared_op("Concat", [g.shared(f"{n}/lead", int64(1, heads)), new, total], f"{n}/Concat", axis=0)
        return g.shared_op("Expand", [bias, shape], f"{n}/Expand")


def _matmul_nbits(g: Graph, name: str, x: str, w: NBitsWeight) -> str:
    """x (..., K) ──► MatMulNBits ──► (..., N)"""
    b, scales, zp = w.packed()
    inputs = [x, g.const(f"{name}.weight_Q{w.bits}", b), g.const(f"{name}.weight_scales", scales)]
    if zp is not None:
        inputs.append(g.const(f"{name}.weight_zero_points", zp))
    (y,) = g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN,
                K=w.in_features, N=w.out_features, bits=w.bits, block_size=w.block_size,
                accuracy_level=w.accuracy_level)
    return y


def _matmul_w8a8(g: Graph, name: str, x: str, w: W8A8Weight) -> str:
    """Int8 weights, int8 activations quantized at run time.

    The int8 codes are stored as uint8 with zero point 128. Why: on x86 without VNNI,
    onnxruntime's u8 x s8 kernels sum pairs of products in int16 (vpmaddubsw), which
    saturates for full-range int8 weights (measured: 7% output error on random data);
    its u8 x u8 kernel widens to int32 first and is exact.
    """
    n = w.out_features
    w_u8 = g.const(f"{name}.weight_uint8", np.ascontiguousarray((w.codes.astype(np.int16) + 128).astype(np.uint8).T))
    w_scale = g.const(f"{name}.weight_scale", w.scales.astype(np.float32))
    w_zero = g.const(f"{name}.weight_zero_point", np.full(n, 128, np.uint8))
    if w.activations == "per_tensor":
        # x (..., K) ──► DynamicQuantizeMatMul(x to uint8 with one scale, W per column) ──► (..., N)
        (y,) = g.op("DynamicQuantizeMatMul", [x, w_u8, w_scale, w_zero], f"{name}/DynamicQuantizeMatMul",
                    domain=MS_DOMAIN)
        return y
    assert w.activations == "per_token", w.activations
    # one scale per token, symmetric, as uint8 around 128 (so the exact u8 x u8 kernel runs):
    #
    #   x ─► Abs ─► ReduceMax(K) ─► Div 127 ─► Max eps ──► s_x (..., 1) ───────────────┐
    #   └──────────────────────────────────► Div s_x ─► Round ─► Add 128 ─► Clip ─► Cast u8
    #        ─► MatMulInteger(W u8, zero points 128) ─► Cast f32 ─► Mul s_x ─► Mul s_w ─► y
    k = f"{name}/act_quant"
    (a,) = g.op("Abs", [x], f"{k}/Abs")
    (m,) = g.op("ReduceMax", [a, g.const(f"{k}/axes", np.array([-1], np.int64))], f"{k}/ReduceMax", keepdims=1)
    (s,) = g.op("Div", [m, g.const(f"{k}/qmax", np.array(127.0, np.float32))], f"{k}/Div")
    (s,) = g.op("Max", [s, g.const(f"{k}/eps", np.array(1e-12, np.float32))], f"{k}/Max")  # an all-zero token
    (q,) = g.op("Div", [x, s], f"{k}/Div_1")
    (q,) = g.op("Round", [q], f"{k}/Round")
    (q,) = g.op("Add", [q, g.const(f"{k}/offset", np.array(128.0, np.float32))], f"{k}/Add")
    (q,) = g.op("Clip", [q, g.const(f"{k}/lo", np.array(1.0, np.float32)),
                         g.const(f"{k}/hi", np.array(255.0, np.float32))], f"{k}/Clip")
    (q,) = g.op("Cast", [q], f"{k}/Cast", to=TensorProto.UINT8)
    (acc,) = g.op("MatMulInteger", [q, w_u8, g.const(f"{k}/zero_point", np.array(128, np.uint8)), w_zero],
                  f"{name}/MatMulInteger")  # int32 (..., N)
    (y,) = g.op("Cast", [acc], f"{name}/Cast", to=TensorProto.FLOAT)
    (y,) = g.op("Mul", [y, s], f"{name}/Mul")
    (y,) = g.op("Mul", [y, w_scale], f"{name}/Mul_1")
    return y
