"""The portable flavour: standard ONNX operators only (opset 21 of the default domain).

For runtimes without onnxruntime's contrib operators (TensorRT, and onnxruntime builds
without them):

    RMSNorm          Mul, ReduceMean, Add, Sqrt, Div, Mul          (no SimplifiedLayerNormalization)
    LayerNorm        LayerNormalization (standard since opset 17)
    rotary           Gather of the cos/sin tables by position, Split, Neg, Concat
    attention        MatMul, Softmax and an additive causal (or sliding-window) mask, grouped heads
                     by broadcasting; softcap as Div, Tanh, Mul; ALiBi as one more additive term
    KV cache         Concat(past, new): present grows by S each run (no shared buffer)
    int4/int8        blocked DequantizeLinear (opset 21) + MatMul; onnxruntime's CPU EP fuses
                     the pair back into MatMulNBits, TensorRT builds a weight-only int4 GEMM

Graph inputs and outputs (B = batch, S = new tokens, P = past length, T = P + S):

    input_ids               int64   (B, S)
    position_ids            int64   (B, S)   P, P + 1, ... P + S - 1
    num_logits_to_keep      int64   (1,)     logits for the last N positions only
    past_key_values.{i}.key|value   float32 (B, kv_heads, P, head_size)
    logits                  float32 (B, N, vocab)
    present.{i}.key|value   float32 (B, kv_heads, T, head_size)

The runtime (device/generate.py) feeds past and takes present each step. The cache
holds positions 0..T-1 in order, which the causal mask relies on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.host.decoder import Attention, Decoder, Norm
from edgekit.host.graph.proto import OPSET, Graph, branch_of, int64
from edgekit.host.quant.nbits import NBitsWeight, W8A8Weight

NAME = "portable"
AXES_LAST = "/model/const/axes_last"


class Portable:
    graph_name = "edgekit_decoder_portable"
    opsets = {"": OPSET}

    def __init__(self, g: Graph, decoder: Decoder):
        self.g = g
        self.decoder = decoder
        self.tables: dict[str, tuple[str, str]] = {}  # rotary key -> full (positions, head_size) cos, sin

    @staticmethod
    def check(decoder: Decoder) -> None:
        """Standard operators express every part of the description."""

    def inputs(self) -> list:
        return [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
        ]

    def begin(self) -> None:
        """Constants every layer reads, and the rotary tables in transformers' full-width layout."""
        g = self.g
        g.shared(AXES_LAST, int64(-1))
        g.shared("/model/const/axes_2", int64(2))
        for key, rot in self.decoder.rotary.items():
            suffix = "" if key == "default" else f".{key}"

            def full(t: np.ndarray) -> np.ndarray:  # rotate-half: each frequency twice
                return np.concatenate([t, t], axis=-1).astype(np.float32)

            cos, sin = g.const(f"cos_table{suffix}", full(rot.cos)), g.const(f"sin_table{suffix}", full(rot.sin))
            if rot.long is not None:
                cos, sin = self._longrope(suffix, cos, sin, full(rot.long[0]), full(rot.long[1]), rot.switch_at)
            self.tables[key] = (cos, sin)

    def _longrope(self, suffix: str, cos: str, sin: str, long_cos: np.ndarray, long_sin: np.ndarray,
                  switch_at: int) -> tuple[str, str]:
        """The long tables once the run reaches past `switch_at` positions (max position + 1 > switch_at).

            position_ids ──► ReduceMax ──► GreaterOrEqual(switch_at) ──► If ─► long | short tables
        """
        g, n = self.g, f"/model/rotary{suffix}"
        lc, ls = g.const(f"cos_table{suffix}.long", long_cos), g.const(f"sin_table{suffix}.long", long_sin)
        (top,) = g.op("ReduceMax", ["position_ids"], f"{n}/ReduceMax", keepdims=0)
        (cond,) = g.op("GreaterOrEqual", [top, g.const(f"{n}/switch_at", np.array(switch_at, np.int64))],
                       f"{n}/GreaterOrEqual")
        cos, sin = g.op("If", [cond], f"{n}/If", outputs=2, then_branch=branch_of(f"{n}/long", lc, ls),
                        else_branch=branch_of(f"{n}/short", cos, sin))
        return cos, sin

    def positions(self) -> str:
        return "position_ids"

    # -- operators ------------------------------------------------------------------------

    def norm(self, name: str, norm: Norm, x: str, residual: str | None = None,
             keep_sum: bool = True) -> tuple[str, str | None]:
        """norm(x), or norm(x + residual) and the sum."""
        g = self.g
        total = None
        if residual is not None:
            (x,) = g.op("Add", [residual, x], f"{name}/residual/Add")
            total = x
        weight = g.const(f"{norm.name}.weight", norm.weight.astype(np.float32))
        if not norm.rms:
            inputs = [x, weight] + ([g.const(f"{norm.name}.bias", norm.bias.astype(np.float32))]
                                    if norm.bias is not None else [])
            (y,) = g.op("LayerNormalization", inputs, f"{name}/LayerNorm", axis=-1, epsilon=float(norm.eps))
            return y, total
        return _rms_norm(g, name, x, weight, float(norm.eps)), total

    def matmul(self, name: str, x: str, weight) -> str:
        """x @ W.T with standard operators, for an fp32 weight W (out, in) or a quantized one.

            fp32:                   x ──► MatMul(W.T) ──► y
            int4/int8 blocked:      codes (K, N), scales (K/block, N) ──► DequantizeLinear(axis 0) ─┐
                                    x ──────────────────────────────────────────────► MatMul ◄──┘
            int8 per channel (W8A8 weights, run weight-only here): DequantizeLinear(axis 1) ──► MatMul
        """
        g = self.g
        if isinstance(weight, np.ndarray):
            w = g.const(f"{name}.weight", weight.astype(np.float32).T)
        elif isinstance(weight, NBitsWeight):
            w = _dequantize_blocked(g, name, weight)
        else:
            assert isinstance(weight, W8A8Weight), type(weight)
            codes = np.ascontiguousarray(np.asarray(weight.codes, dtype=np.int8).T)  # (K, N)
            (w,) = g.op("DequantizeLinear", [g.const(f"{name}.weight_int8", codes),
                                             g.const(f"{name}.weight_scale", weight.scales.astype(np.float32))],
                        f"{name}/DequantizeLinear", axis=1)
        (y,) = g.op("MatMul", [x, w], f"{name}/MatMul")
        return y

    def gelu(self, name: str, x: str, tanh: bool) -> str:
        """ONNX Gelu (opset 20), erf or tanh."""
        (y,) = self.g.op("Gelu", [x], f"{name}/Gelu", approximate="tanh" if tanh else "none")
        return y

    def attention(self, n: str, i: int, att: Attention, q: str, k: str = "", v: str = "") -> str:
        """Grouped-query attention over packed qkv (k, v empty) or separate q, k, v.

            q (B,S,nh,hd), k, v (B,S,nkv,hd) ──► rotary(q, k) ──► q: (B,nkv,g,S,hd)
            k, v ──► Transpose (B,nkv,S,hd) ──► Concat(past, ·, axis 2) ──► present (B,nkv,T,hd)
            q @ k^T (B,nkv,g,S,T) ──► × scale ──► [softcap] ──► [+ ALiBi] ──► + mask ──► Softmax ──► @ v
            ──► (B,S,nh*hd)
        """
        g = self.g
        nh, nkv, hd = att.num_heads, att.num_kv_heads, att.head_size
        group = nh // nkv
        c = "/model/const"
        if not k:
            split = g.shared(f"{c}/qkv_split", int64(nh * hd, nkv * hd, nkv * hd))
            q, k, v = g.op("Split", [q, split], f"{n}/attn/Split", outputs=3, axis=-1)
        (q,) = g.op("Reshape", [q, g.shared(f"{c}/q_heads", int64(0, 0, nh, hd))], f"{n}/attn/q/Reshape")
        (k,) = g.op("Reshape", [k, g.shared(f"{c}/kv_shape", int64(0, 0, nkv, hd))], f"{n}/attn/k/Reshape")
        (v,) = g.op("Reshape", [v, f"{c}/kv_shape"], f"{n}/attn/v/Reshape")
        if att.rotary:
            cos, sin = self._rotary_at_positions(att.rotary)
            q = _rotary(g, f"{n}/attn/q_rotary", q, cos, sin)
            k = _rotary(g, f"{n}/attn/k_rotary", k, cos, sin)
        (q,) = g.op("Reshape", [q, g.shared(f"{c}/q_shape", int64(0, 0, nkv, group, hd))], f"{n}/attn/q/Reshape_1")
        (q,) = g.op("Transpose", [q], f"{n}/attn/q/Transpose", perm=[0, 2, 3, 1, 4])  # (B,nkv,g,S,hd)
        (k,) = g.op("Transpose", [k], f"{n}/attn/k/Transpose", perm=[0, 2, 1, 3])  # (B,nkv,S,hd)
        (v,) = g.op("Transpose", [v], f"{n}/attn/v/Transpose", perm=[0, 2, 1, 3])
        (k_all,) = g.op("Concat", [f"past_key_values.{i}.key", k], f"{n}/attn/k/Concat",
                        outputs=[f"present.{i}.key"], axis=2)  # (B,nkv,T,hd)
        (v_all,) = g.op("Concat", [f"past_key_values.{i}.value", v], f"{n}/attn/v/Concat",
                        outputs=[f"present.{i}.value"], axis=2)
        (kt,) = g.op("Transpose", [k_all], f"{n}/attn/k/Transpose_1", perm=[0, 1, 3, 2])  # (B,nkv,hd,T)
        (kt,) = g.op("Unsqueeze", [kt, "/model/const/axes_2"], f"{n}/attn/k/Unsqueeze")  # (B,nkv,1,hd,T)
        (vu,) = g.op("Unsqueeze", [v_all, "/model/const/axes_2"], f"{n}/attn/v/Unsqueeze")  # (B,nkv,1,T,hd)
        (scores,) = g.op("MatMul", [q, kt], f"{n}/attn/qk/MatMul")  # (B,nkv,g,S,T)
        (scores,) = g.op("Mul", [scores, g.const(f"{n}/attn/qk/scale", np.array(att.scale, np.float32))],
                         f"{n}/attn/qk/Mul")
        if att.softcap:
            cap = g.const(f"{n}/attn/softcap/cap", np.array(att.softcap, np.float32))
            (scores,) = g.op("Div", [scores, cap], f"{n}/attn/softcap/Div")
            (scores,) = g.op("Tanh", [scores], f"{n}/attn/softcap/Tanh")
            (scores,) = g.op("Mul", [scores, cap], f"{n}/attn/softcap/Mul")
        if att.alibi is not None:
            (scores,) = g.op("Add", [scores, self._alibi(att.alibi, nkv, group)], f"{n}/attn/alibi/Add")
        (scores,) = g.op("Add", [scores, self._causal_mask(att.window)], f"{n}/attn/mask/Add")
        (probs,) = g.op("Softmax", [scores], f"{n}/attn/Softmax", axis=-1)
        (ctx,) = g.op("MatMul", [probs, vu], f"{n}/attn/pv/MatMul")  # (B,nkv,g,S,hd)
        (ctx,) = g.op("Transpose", [ctx], f"{n}/attn/out/Transpose", perm=[0, 3, 1, 2, 4])  # (B,S,nkv,g,hd)
        (ctx,) = g.op("Reshape", [ctx, g.shared(f"{c}/attn_out_shape", int64(0, 0, nh * hd))],
                      f"{n}/attn/out/Reshape")  # (B,S,nh*hd)
        return ctx

    def _rotary_at_positions(self, key: str) -> tuple[str, str]:
        """cos, sin of table `key` at the run's positions, (B, S, 1, head_size); once per table."""
        g = self.g
        cos, sin = self.tables[key]
        n = "/model/rotary" + ("" if key == "default" else f".{key}")
        c = g.shared_op("Gather", [cos, "position_ids"], f"{n}/Gather")
        s = g.shared_op("Gather", [sin, "position_ids"], f"{n}/Gather_1")
        return (g.shared_op("Unsqueeze", [c, "/model/const/axes_2"], f"{n}/Unsqueeze"),
                g.shared_op("Unsqueeze", [s, "/model/const/axes_2"], f"{n}/Unsqueeze_1"))

    def _total(self) -> str:
        """T = P + S, an int64 scalar: the past's length from its shape, plus the new tokens.

            past (B,nkv,P,hd) ──► Shape[2] = P ──► + S
        """
        g, n = self.g, "/model/attn_mask"
        past_shape = g.shared_op("Shape", ["past_key_values.0.key"], f"{n}/Shape")
        past_len = g.shared_op("Gather", [past_shape, g.shared(f"{n}/idx2", np.array(2, np.int64))], f"{n}/Gather")
        ids_shape = g.shared_op("Shape", ["input_ids"], f"{n}/Shape_1")
        new_len = g.shared_op("Gather", [ids_shape, g.shared(f"{n}/idx1", np.array(1, np.int64))], f"{n}/Gather_1")
        return g.shared_op("Add", [past_len, new_len], f"{n}/Add")

    def _key_positions(self) -> str:
        """0..T-1 (T,): the cache holds every position in order."""
        g, n = self.g, "/model/attn_mask"
        return g.shared_op("Range", [g.shared(f"{n}/zero", np.array(0, np.int64)), self._total(),
                                     g.shared(f"{n}/one", np.array(1, np.int64))], f"{n}/Range")

    def _causal_mask(self, window: int | None) -> str:
        """Additive mask (B, 1, 1, S, T): 0 where key position <= query position (and within the
        sliding window), the most negative float elsewhere; one per window size.

            position_ids (B,S) ──► Unsqueeze(-1) (B,S,1) ──► key_pos <= q_pos ──► Where(0, -max) ──► Unsqueeze
        """
        g = self.g
        n = "/model/attn_mask" + (f"/window_{window}" if window else "")
        key_pos = self._key_positions()
        q_pos = g.shared_op("Unsqueeze", ["position_ids", AXES_LAST], "/model/attn_mask/Unsqueeze")  # (B,S,1)
        allowed = g.shared_op("LessOrEqual", [key_pos, q_pos], "/model/attn_mask/LessOrEqual")  # (B,S,T)
        if window:
            lo = g.shared_op("Sub", [q_pos, g.shared(f"{n}/window", np.array(window, np.int64))], f"{n}/Sub")
            recent = g.shared_op("Greater", [key_pos, lo], f"{n}/Greater")
            allowed = g.shared_op("And", [allowed, recent], f"{n}/And")
        zero = g.shared("/model/attn_mask/zero_f", np.array(0.0, np.float32))
        lowest = g.shared("/model/attn_mask/min_f", np.array(np.finfo(np.float32).min, np.float32))
        mask = g.shared_op("Where", [allowed, zero, lowest], f"{n}/Where")
        return g.shared_op("Unsqueeze", [mask, g.shared("/model/attn_mask/axes_1_2", int64(1, 2))], f"{n}/Unsqueeze_1")

    def _alibi(self, table: np.ndarray, kv_heads: int, group: int) -> str:
        """(1, nkv, g, 1, T): the ALiBi table's first T positions, in the grouped score layout.

            table (heads, ctx) ──► Slice[:, :T] ──► Reshape (1, nkv, g, 1, T)
        """
        g, n = self.g, "/model/alibi"
        total = g.shared_op("Unsqueeze", [self._total(), g.shared("/model/const/axes_0", int64(0))], f"{n}/Unsqueeze")
        rows = g.shared_op("Slice", [g.shared("alibi_table", table.astype(np.float32)),
                                     g.shared("/model/const/zero_1d", int64(0)), total,
                                     g.shared("/model/const/one_1d", int64(1))], f"{n}/Slice")  # (heads, T)
        return g.shared_op("Reshape", [rows, g.shared(f"{n}/shape", int64(1, kv_heads, group, 1, -1))], f"{n}/Reshape")


def _rms_norm(g: Graph, name: str, x: str, weight: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis, as transformers' LlamaRMSNorm.

        x ─┬─► Mul(x, x) ──► ReduceMean(-1) ──► Add eps ──► Sqrt ─┐
           └──────────────────────────────────────────────────► Div ──► Mul weight ──► y
    """
    (sq,) = g.op("Mul", [x, x], f"{name}/Mul")
    (ms,) = g.op("ReduceMean", [sq, AXES_LAST], f"{name}/ReduceMean", keepdims=1)
    (ms,) = g.op("Add", [ms, g.const(f"{name}/eps", np.array(eps, np.float32))], f"{name}/Add")
    (rms,) = g.op("Sqrt", [ms], f"{name}/Sqrt")
    (y,) = g.op("Div", [x, rms], f"{name}/Div")
    (y,) = g.op("Mul", [y, weight], f"{name}/Mul_1")
    return y


def _rotary(g: Graph, name: str, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin on (B, S, heads, head_size), cos/sin (B, S, 1, head_size).

        x ──► Split(2, last axis) ──► x1, x2 ──► Concat(-x2, x1) ──► Mul sin ──┐
        x ──► Mul cos ────────────────────────────────────────────────────► Add ──► y
    """
    x1, x2 = g.op("Split", [x], f"{name}/Split", outputs=2, axis=-1, num_outputs=2)
    (neg,) = g.op("Neg", [x2], f"{name}/Neg")
    (rot,) = g.op("Concat", [neg, x1], f"{name}/Concat", axis=-1)
    (a,) = g.op("Mul", [x, cos], f"{name}/Mul")
    (b,) = g.op("Mul", [rot, sin], f"{name}/Mul_1")
    (y,) = g.op("Add", [a, b], f"{name}/Add")
    return y


def _dequantize_blocked(g: Graph, name: str, weight: NBitsWeight) -> str:
    """An NBitsWeight (N, K) as opset 21 blocked DequantizeLinear producing W.T (K, N).

    Symmetric weights (no zero points) become signed int4/int8 codes without a zero point,
    which is what TensorRT accepts (its DequantizeLinear needs a zero zero-point);
    asymmetric ones stay unsigned with their zero points.
    """
    k, bits, block = weight.in_features, weight.bits, weight.block_size
    codes = weight.codes[:, :k]  # (N, K) uint8 in [0, 2^bits); drop the padding of the last block
    scales = np.ascontiguousarray(weight.scales.astype(np.float32).T)  # (K_blocks, N)
    if weight.zeros is None:
        signed = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        q = _int_tensor(f"{name}.weight_q{bits}", np.ascontiguousarray(signed.T), bits, signed=True)
        g.initializers.append(q)
        inputs = [q.name, g.const(f"{name}.weight_scales", scales)]
    else:
        q = _int_tensor(f"{name}.weight_q{bits}", np.ascontiguousarray(codes.T), bits, signed=False)
        zp = _int_tensor(f"{name}.weight_zero_points", np.ascontiguousarray(weight.zeros.T), bits, signed=False)
        g.initializers += [q, zp]
        inputs = [q.name, g.const(f"{name}.weight_scales", scales), zp.name]
    (w,) = g.op("DequantizeLinear", inputs, f"{name}/DequantizeLinear", axis=0, block_size=block)
    return w


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """An int4/uint4/int8/uint8 initializer. 4-bit tensors are packed two per byte, the
    first element in the low nibble (ONNX's layout, also TensorRT's)."""
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    assert bits == 4, bits
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4 if signed else TensorProto.UINT4
    t.dims.extend(values.shape)
    t.raw_data = packed.tobytes()
    return t
