"""Build the portable ONNX graph of a Llama-family decoder: standard operators only.

For runtimes without onnxruntime's contrib operators (TensorRT, and onnxruntime builds
without them). Everything is opset 21 of the default domain:

    RMSNorm          Mul, ReduceMean, Add, Sqrt, Div, Mul          (no SimplifiedLayerNormalization)
    rotary           Gather of the model's own cos/sin tables by position, Split, Neg, Concat
    attention        MatMul, Softmax and an additive causal mask, grouped heads by broadcasting
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

from edgekit.device.bundle import Architecture
from edgekit.host.graph import OPSET, Graph, decoder_model, emit_mlp, pack_qkv
from edgekit.host.load import ExportError

FLAVOUR = "portable"


# -- linear layers ---------------------------------------------------------------


def emit_linear_portable(g: Graph, name: str, x: str, weight, bias: np.ndarray | None = None) -> str:
    """y = x @ W.T + b with standard operators, for an fp32 weight W (out, in) or a quantized one.

        fp32:                   x ──► MatMul(W.T) ─────────────────────────► [Add bias] ──► y
        int4/int8 blocked:      codes (K, N), scales (K/block, N) ──► DequantizeLinear(axis 0) ─┐
                                x ──────────────────────────────────────────────► MatMul ◄──┘
        int8 per channel (W8A8 weights, run weight-only here): DequantizeLinear(axis 1) ──► MatMul
    """
    if isinstance(weight, np.ndarray):
        w = weight.T if weight.dtype == np.float32 else weight.astype(np.float32).T
        (y,) = g.op("MatMul", [x, g.const(f"{name}.weight", w)], f"{name}/MatMul")
    elif hasattr(weight, "block_size"):  # host/quant/nbits.py NBitsWeight
        w = _dequantize_blocked(g, name, weight)
        (y,) = g.op("MatMul", [x, w], f"{name}/MatMul")
    elif hasattr(weight, "codes") and hasattr(weight, "scales"):  # host/quant/nbits.py W8A8Weight
        codes = np.ascontiguousarray(np.asarray(weight.codes, dtype=np.int8).T)  # (K, N)
        (w,) = g.op("DequantizeLinear", [g.const(f"{name}.weight_int8", codes),
                                         g.const(f"{name}.weight_scale", weight.scales.astype(np.float32))],
                    f"{name}/DequantizeLinear", axis=1)
        (y,) = g.op("MatMul", [x, w], f"{name}/MatMul")
    else:
        raise ExportError(f"{name}: the portable graph cannot emit a weight of type {type(weight).__name__}")
    if bias is not None:
        (y,) = g.op("Add", [y, g.const(f"{name}.bias", bias.astype(np.float32))], f"{name}/Add")
    return y


def _dequantize_blocked(g: Graph, name: str, weight) -> str:
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
        inputs = [q, g.const(f"{name}.weight_scales", scales)]
        g.initializers.append(q)
    else:
        q = _int_tensor(f"{name}.weight_q{bits}", np.ascontiguousarray(codes.T), bits, signed=False)
        zp = _int_tensor(f"{name}.weight_zero_points", np.ascontiguousarray(weight.zeros.T), bits, signed=False)
        g.initializers += [q, zp]
        inputs = [q, g.const(f"{name}.weight_scales", scales), zp]
    inputs = [t if isinstance(t, str) else t.name for t in inputs]
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


# -- the decoder -------------------------------------------------------------------


def rms_norm(g: Graph, name: str, x: str, weight: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis, as transformers' LlamaRMSNorm.

        x ─┬─► Mul(x, x) ──► ReduceMean(-1) ──► Add eps ──► Sqrt ─┐
           └──────────────────────────────────────────────────► Div ──► Mul weight ──► y
    """
    (sq,) = g.op("Mul", [x, x], f"{name}/Mul")
    (ms,) = g.op("ReduceMean", [sq, "/model/const/axes_last"], f"{name}/ReduceMean", keepdims=1)
    (ms,) = g.op("Add", [ms, g.const(f"{name}/eps", np.array(eps, np.float32))], f"{name}/Add")
    (rms,) = g.op("Sqrt", [ms], f"{name}/Sqrt")
    (y,) = g.op("Div", [x, rms], f"{name}/Div")
    (y,) = g.op("Mul", [y, weight], f"{name}/Mul_1")
    return y


def rotary(g: Graph, name: str, x: str, cos: str, sin: str) -> str:
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


def build_portable(arch: Architecture, weights: dict, cos: np.ndarray, sin: np.ndarray,
                   sliding_window: int | None = None) -> onnx.ModelProto:
    """The portable graph for `arch`, same contract as host.graph.build_decoder: `weights`
    keyed by transformers' state_dict names (fp32 arrays or host/quant weights), `cos`,
    `sin` the model's own (context_length, head_size) rotary tables.

    Computes what transformers computes: fp32 logits match within 1e-4 (tests/test_portable.py).
    """
    L, nh, nkv, hd = arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_size
    if nh % nkv:
        raise ExportError(f"num_heads {nh} is not a multiple of num_kv_heads {nkv}")
    if cos.shape != (arch.context_length, hd):
        raise ExportError(f"rotary table {cos.shape} != ({arch.context_length}, {hd})")
    group = nh // nkv
    g = Graph()
    w = weights.__getitem__
    eps = float(arch.rms_norm_eps)
    g.const("/model/const/axes_last", np.array([-1], np.int64))
    g.const("/model/const/axes_2", np.array([2], np.int64))

    # embeddings: (B, S) -> (B, S, H)
    embed_w = w("model.embed_tokens.weight")
    embed = g.const("model.embed_tokens.weight", embed_w)
    (h,) = g.op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    if embed_w.dtype != np.float32:  # quantized bundles may store it in fp16 (host/quant)
        (h,) = g.op("Cast", [h], "/model/embed_tokens/Cast", to=TensorProto.FLOAT)

    # rotary tables by position, shared by every layer: (B, S) -> (B, S, 1, head_size)
    g.const("cos_table", cos.astype(np.float32))
    g.const("sin_table", sin.astype(np.float32))
    (c,) = g.op("Gather", ["cos_table", "position_ids"], "/model/rotary/Gather")
    (s,) = g.op("Gather", ["sin_table", "position_ids"], "/model/rotary/Gather_1")
    (cos_b,) = g.op("Unsqueeze", [c, "/model/const/axes_2"], "/model/rotary/Unsqueeze")
    (sin_b,) = g.op("Unsqueeze", [s, "/model/const/axes_2"], "/model/rotary/Unsqueeze_1")

    mask = _causal_mask(g, sliding_window)  # (B, 1, 1, S, T)
    scale = g.const("/model/const/attn_scale", np.array(hd ** -0.5, np.float32))
    g.const("/model/const/q_shape", np.array([0, 0, nkv, group, hd], np.int64))
    g.const("/model/const/kv_shape", np.array([0, 0, nkv, hd], np.int64))
    g.const("/model/const/attn_out_shape", np.array([0, 0, nh * hd], np.int64))
    qkv_split = g.const("/model/const/qkv_split", np.array([nh * hd, nkv * hd, nkv * hd], np.int64))

    for i in range(L):
        p = f"model.layers.{i}"
        n = f"/model/layers.{i}"
        ln = g.const(f"{p}.input_layernorm.weight", w(f"{p}.input_layernorm.weight"))
        x = rms_norm(g, f"{n}/input_layernorm", h, ln, eps)

        # attention
        #
        #   x ──► qkv_proj ──► Split ──► q (B,S,nh,hd), k, v (B,S,nkv,hd)
        #   q, k ──► rotary ──► q: Reshape (B,S,nkv,g,hd) ──► Transpose (B,nkv,g,S,hd)
        #   k, v ──► Transpose (B,nkv,S,hd) ──► Concat(past, ·, axis 2) ──► present (B,nkv,T,hd)
        #   q @ k^T (B,nkv,g,S,T) ──► * scale ──► + mask ──► Softmax ──► @ v ──► (B,S,nh*hd) ──► o_proj
        qkv_b = None
        if arch.attention_bias:
            qkv_b = np.concatenate([w(f"{p}.self_attn.{k}_proj.bias") for k in "qkv"])
        qkv = emit_linear_portable(g, f"{n}/attn/qkv_proj", x, pack_qkv(weights, p), qkv_b)
        q, k, v = g.op("Split", [qkv, qkv_split], f"{n}/attn/Split", outputs=3, axis=-1)
        (q,) = g.op("Reshape", [q, g.const(f"{n}/attn/q_heads", np.array([0, 0, nh, hd], np.int64))],
                    f"{n}/attn/q/Reshape")
        (k,) = g.op("Reshape", [k, "/model/const/kv_shape"], f"{n}/attn/k/Reshape")
        (v,) = g.op("Reshape", [v, "/model/const/kv_shape"], f"{n}/attn/v/Reshape")
        q = rotary(g, f"{n}/attn/q_rotary", q, cos_b, sin_b)
        k = rotary(g, f"{n}/attn/k_rotary", k, cos_b, sin_b)
        (q,) = g.op("Reshape", [q, "/model/const/q_shape"], f"{n}/attn/q/Reshape_1")  # (B,S,nkv,g,hd)
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
        (scores,) = g.op("Mul", [scores, scale], f"{n}/attn/qk/Mul")
        (scores,) = g.op("Add", [scores, mask], f"{n}/attn/mask/Add")
        (probs,) = g.op("Softmax", [scores], f"{n}/attn/Softmax", axis=-1)
        (ctx,) = g.op("MatMul", [probs, vu], f"{n}/attn/pv/MatMul")  # (B,nkv,g,S,hd)
        (ctx,) = g.op("Transpose", [ctx], f"{n}/attn/out/Transpose", perm=[0, 3, 1, 2, 4])  # (B,S,nkv,g,hd)
        (ctx,) = g.op("Reshape", [ctx, "/model/const/attn_out_shape"], f"{n}/attn/out/Reshape")  # (B,S,nh*hd)
        o = emit_linear_portable(g, f"{n}/attn/o_proj", ctx, w(f"{p}.self_attn.o_proj.weight"),
                                 weights.get(f"{p}.self_attn.o_proj.bias"))
        (h,) = g.op("Add", [h, o], f"{n}/attn/residual/Add")

        # mlp: down(silu(gate(x)) * up(x)), then the residual
        ln = g.const(f"{p}.post_attention_layernorm.weight", w(f"{p}.post_attention_layernorm.weight"))
        x = rms_norm(g, f"{n}/post_attention_layernorm", h, ln, eps)
        down = emit_mlp(g, n, p, x, weights, linear=emit_linear_portable)
        (h,) = g.op("Add", [h, down], f"{n}/mlp/residual/Add")

    # final norm, keep the last N positions, lm_head
    #
    #   h ──► RMSNorm ──► Slice[-N:] ──► lm_head ──► logits
    ln = g.const("model.norm.weight", w("model.norm.weight"))
    hn = rms_norm(g, "/model/norm", h, ln, eps)
    (start,) = g.op("Neg", ["num_logits_to_keep"], "/model/logits_to_keep/Neg")
    g.const("/model/logits_to_keep/ends", np.array([np.iinfo(np.int64).max], np.int64))
    g.const("/model/logits_to_keep/axes", np.array([1], np.int64))
    (hl,) = g.op("Slice", [hn, start, "/model/logits_to_keep/ends", "/model/logits_to_keep/axes"],
                 "/model/logits_to_keep/Slice")
    head = weights.get("lm_head.weight")  # absent when tied to the embedding
    if head is not None:
        y = emit_linear_portable(g, "/lm_head", hl, head)
        g.op("Identity", [y], "/lm_head/Identity", outputs=["logits"])
    else:
        # tied: reuse the embedding through MatMul with a transposed view, no second copy
        #   h (B, N, H) ──► MatMul(Transpose(E)) (B, N, V)
        table = embed
        if embed_w.dtype != np.float32:
            (table,) = g.op("Cast", [embed], "/lm_head/Cast", to=TensorProto.FLOAT)
        (et,) = g.op("Transpose", [table], "/lm_head/Transpose", perm=[1, 0])
        g.op("MatMul", [hl, et], "/lm_head/MatMul", outputs=["logits"])
    return _model(g, arch)


def _causal_mask(g: Graph, sliding_window: int | None) -> str:
    """Additive mask (B, 1, 1, S, T): 0 where key position <= query position (and within the
    sliding window), the most negative float elsewhere. Key positions are 0..T-1 because the
    cache holds every position in order; T comes from the past's shape.

        past (B,nkv,P,hd) ──► Shape[2] = P ──► + S ──► Range(0, T) = key_pos (T,)
        position_ids (B,S) ──► Unsqueeze(-1) (B,S,1) ──► key_pos <= q_pos ──► Where(0, -max) ──► Unsqueeze
    """
    n = "/model/attn_mask"
    (past_shape,) = g.op("Shape", ["past_key_values.0.key"], f"{n}/Shape")
    (past_len,) = g.op("Gather", [past_shape, g.const(f"{n}/idx2", np.array(2, np.int64))], f"{n}/Gather")
    (ids_shape,) = g.op("Shape", ["input_ids"], f"{n}/Shape_1")
    (new_len,) = g.op("Gather", [ids_shape, g.const(f"{n}/idx1", np.array(1, np.int64))], f"{n}/Gather_1")
    (total,) = g.op("Add", [past_len, new_len], f"{n}/Add")
    (key_pos,) = g.op("Range", [g.const(f"{n}/zero", np.array(0, np.int64)), total,
                                g.const(f"{n}/one", np.array(1, np.int64))], f"{n}/Range")  # (T,)
    (q_pos,) = g.op("Unsqueeze", ["position_ids", "/model/const/axes_last"], f"{n}/Unsqueeze")  # (B,S,1)
    (allowed,) = g.op("LessOrEqual", [key_pos, q_pos], f"{n}/LessOrEqual")  # (B,S,T)
    if sliding_window:
        (lo,) = g.op("Sub", [q_pos, g.const(f"{n}/window", np.array(sliding_window, np.int64))], f"{n}/Sub")
        (recent,) = g.op("Greater", [key_pos, lo], f"{n}/Greater")
        (allowed,) = g.op("And", [allowed, recent], f"{n}/And")
    (mask,) = g.op("Where", [allowed, g.const(f"{n}/zero_f", np.array(0.0, np.float32)),
                             g.const(f"{n}/min_f", np.array(np.finfo(np.float32).min, np.float32))], f"{n}/Where")
    (mask,) = g.op("Unsqueeze", [mask, g.const(f"{n}/axes_1_2", np.array([1, 2], np.int64))], f"{n}/Unsqueeze_1")
    return mask


def _model(g: Graph, arch: Architecture) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
    ]
    return decoder_model(g, arch, "edgekit_decoder_portable", inputs, {"": OPSET})
