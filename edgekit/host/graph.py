"""Build the fused ONNX graph of a Llama-family decoder.

The operator set is the one onnxruntime's own LLM tooling emits, so its CPU and CUDA
kernels apply: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization for
RMSNorm (the Skip form also adds the residual), one packed q/k/v MatMul per layer,
GroupQueryAttention doing rotary embedding, the causal mask and the KV cache
update in one kernel. Node names follow onnxruntime-genai's model builder:
`/model/layers.{i}/attn/qkv_proj/MatMul`.

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

Linear layers take either an fp32 weight (out, in) as transformers stores it, or a
quantized weight (host/quant): `emit_linear` is the one place that tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.device.bundle import Architecture

OPSET = 21
MS_DOMAIN = "com.microsoft"


@dataclass
class Graph:
    """Nodes and initializers being collected for one onnx.GraphProto."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> list[str]:
        """Add a node named `name`; its outputs are `{name}/output_{k}` unless given."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def emit_linear(g: Graph, name: str, x: str, weight, bias: np.ndarray | None = None) -> str:
    """y = x @ W.T + b for a transformers Linear weight W (out, in), fp32 or quantized.

        x ──► MatMul ──► [Add bias] ──► y
    """
    if isinstance(weight, np.ndarray):
        (y,) = g.op("MatMul", [x, g.const(f"{name}.weight", weight.T)], f"{name}/MatMul")
    else:
        y = weight.emit(g, name, x)  # a quantized weight knows its own operator (host/quant)
    if bias is not None:
        (y,) = g.op("Add", [y, g.const(f"{name}.bias", bias)], f"{name}/Add")
    return y


def rotary_caches(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' (positions, head_size) cos/sin, which repeat each frequency twice
    (rotate_half layout), to GroupQueryAttention's (positions, head_size / 2)."""
    half = cos.shape[-1] // 2
    assert np.allclose(cos[:, :half], cos[:, half:]), "expected rotate_half layout cos/sin"
    return cos[:, :half].astype(np.float32), sin[:, :half].astype(np.float32)


def build_decoder(arch: Architecture, weights: dict, cos: np.ndarray, sin: np.ndarray,
                  sliding_window: int | None = None) -> onnx.ModelProto:
    """The fused graph for `arch` with `weights` keyed by transformers' state_dict names.

    `cos`, `sin` are (context_length, head_size) rotary tables as the model's own
    rotary embedding computes them (so every rope scaling variant comes out right).
    """
    L, nh, nkv, hd = arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_size
    assert nh % nkv == 0, "num_heads must be a multiple of num_kv_heads"
    assert hd % 16 == 0, "GroupQueryAttention's rotary needs head_size to be a multiple of 16"
    assert cos.shape == (arch.context_length, hd), f"rotary table {cos.shape} != ({arch.context_length}, {hd})"
    g = Graph()
    cos_cache, sin_cache = rotary_caches(cos, sin)
    g.const("cos_cache", cos_cache)
    g.const("sin_cache", sin_cache)
    w = weights.__getitem__
    eps = float(arch.rms_norm_eps)

    # embeddings: (B, S) -> (B, S, H)
    embed = g.const("model.embed_tokens.weight", w("model.embed_tokens.weight"))
    (h,) = g.op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    if w("model.embed_tokens.weight").dtype == np.float16:  # quantized bundles store it in fp16 (host/quant)
        (h,) = g.op("Cast", [h], "/model/embed_tokens/Cast", to=TensorProto.FLOAT)

    residual, x_in = h, None
    for i in range(L):
        p = f"model.layers.{i}"
        n = f"/model/layers.{i}"
        # input_layernorm; from layer 1 on it also adds the previous MLP output to the residual
        ln = g.const(f"{p}.input_layernorm.weight", w(f"{p}.input_layernorm.weight"))
        if x_in is None:
            (x,) = g.op("SimplifiedLayerNormalization", [residual, ln], f"{n}/input_layernorm/LayerNorm",
                        axis=-1, epsilon=eps, stash_type=1)
        else:
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [x_in, residual, ln],
                                     f"{n}/input_layernorm/SkipLayerNorm", outputs=4, domain=MS_DOMAIN, epsilon=eps)

        # attention: one MatMul for q, k, v packed as (B, S, (nh + 2 nkv) * hd)
        #
        #   x ──► qkv_proj ──► GroupQueryAttention(rotary, causal, past ──► present) ──► o_proj
        qkv_w = pack_qkv(weights, p)
        qkv_b = None
        if arch.attention_bias:
            qkv_b = np.concatenate([w(f"{p}.self_attn.{k}_proj.bias") for k in "qkv"])
        qkv = emit_linear(g, f"{n}/attn/qkv_proj", x, qkv_w, qkv_b)
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            f"{n}/attn/GroupQueryAttention",
            outputs=[f"{n}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
            scale=float(hd ** -0.5), local_window_size=sliding_window or -1,
        )
        o = emit_linear(g, f"{n}/attn/o_proj", attn, w(f"{p}.self_attn.o_proj.weight"),
                        weights.get(f"{p}.self_attn.o_proj.bias"))

        # post_attention_layernorm, adding the attention output to the residual
        ln = g.const(f"{p}.post_attention_layernorm.weight", w(f"{p}.post_attention_layernorm.weight"))
        x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, ln],
                                 f"{n}/post_attention_layernorm/SkipLayerNorm", outputs=4, domain=MS_DOMAIN,
                                 epsilon=eps)

        x_in = emit_mlp(g, n, p, x, weights)

    # final norm (adds the last MLP output), keep the last N positions, lm_head
    #
    #   mlp_out, residual ──► SkipLayerNorm ──► Slice[-N:] ──► lm_head ──► logits
    ln = g.const("model.norm.weight", w("model.norm.weight"))
    (hn,) = g.op("SkipSimplifiedLayerNormalization", [x_in, residual, ln], "/model/norm/SkipLayerNorm",
                 domain=MS_DOMAIN, epsilon=eps)
    (start,) = g.op("Neg", ["num_logits_to_keep"], "/model/logits_to_keep/Neg")
    g.const("/model/logits_to_keep/ends", np.array([np.iinfo(np.int64).max], np.int64))
    g.const("/model/logits_to_keep/axes", np.array([1], np.int64))
    (hl,) = g.op("Slice", [hn, start, "/model/logits_to_keep/ends", "/model/logits_to_keep/axes"],
                 "/model/logits_to_keep/Slice")
    _emit_lm_head(g, arch, weights, hl)

    return _model(g, arch)


def emit_mlp(g: Graph, n: str, p: str, x: str, weights: dict, linear=emit_linear) -> str:
    """Layer `p`'s MLP, down(silu(gate(x)) * up(x)); `linear` emits each projection.

        x ─┬─► gate_proj ──► Sigmoid ─► Mul ──► Mul ──► down_proj
           │            └─────────────────┘      ▲
           └─► up_proj ──────────────────────────┘
    """
    def proj(name: str, inp: str) -> str:
        return linear(g, f"{n}/mlp/{name}", inp, weights[f"{p}.mlp.{name}.weight"], weights.get(f"{p}.mlp.{name}.bias"))

    gate, up = proj("gate_proj", x), proj("up_proj", x)
    (sig,) = g.op("Sigmoid", [gate], f"{n}/mlp/act_fn/Sigmoid")
    (act,) = g.op("Mul", [gate, sig], f"{n}/mlp/act_fn/Mul")
    (prod,) = g.op("Mul", [act, up], f"{n}/mlp/Mul")
    return proj("down_proj", prod)


def pack_qkv(weights: dict, p: str):
    """Layer `p`'s q, k and v projections as one weight (out_q + 2 out_kv, in): fp32 ones are
    concatenated here, quantized ones come packed from host/quant as `{p}.self_attn.qkv_proj.weight`."""
    q, k, v = (weights[f"{p}.self_attn.{k}_proj.weight"] for k in "qkv")
    if isinstance(q, np.ndarray):
        return np.concatenate([q, k, v], axis=0)  # (out_q + 2 out_kv, in)
    packed = weights.get(f"{p}.self_attn.qkv_proj.weight")
    assert packed is not None, f"quantized q/k/v of {p} must be packed as {p}.self_attn.qkv_proj.weight"
    return packed


def _emit_lm_head(g: Graph, arch: Architecture, weights: dict, h: str) -> None:
    """lm_head. When it is tied to the embedding, reuse that one initializer through
    Gemm(transB=1) instead of storing a transposed copy (49152 x 576 x 4 B = 113 MB for SmolLM2).

        h (B, N, H) ──► Reshape (B*N, H) ──► Gemm(transB) ──► Reshape (B, N, V) ──► logits
    """
    head = weights.get("lm_head.weight")  # absent when tied: the loader drops the duplicate
    if head is not None:
        y = emit_linear(g, "/lm_head", h, head)
        g.nodes.append(helper.make_node("Identity", [y], ["logits"], name="/lm_head/Identity"))
        return
    (shape,) = g.op("Shape", [h], "/lm_head/Shape", start=0, end=2)
    g.const("/lm_head/flat_shape", np.array([-1, arch.hidden_size], np.int64))
    (flat,) = g.op("Reshape", [h, "/lm_head/flat_shape"], "/lm_head/Reshape")
    (y,) = g.op("Gemm", [flat, "model.embed_tokens.weight"], "/lm_head/Gemm", transB=1)
    g.const("/lm_head/vocab", np.array([arch.vocab_size], np.int64))
    (out_shape,) = g.op("Concat", [shape, "/lm_head/vocab"], "/lm_head/Concat", axis=0)
    g.op("Reshape", [y, out_shape], "/lm_head/Reshape_1", outputs=["logits"])


def _model(g: Graph, arch: Architecture) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
    ]
    return decoder_model(g, arch, "edgekit_decoder", inputs, {"": OPSET, MS_DOMAIN: 1})


def decoder_model(g: Graph, arch: Architecture, name: str, inputs: list, opsets: dict[str, int]) -> onnx.ModelProto:
    """The ModelProto around `g`: the given inputs, then past_key_values.{i}.key|value; outputs
    logits and present.{i}.key|value, each (batch, kv_heads, seq, head_size)."""
    nkv, hd = arch.num_kv_heads, arch.head_size
    inputs = list(inputs)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "logits_length", arch.vocab_size])]
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", nkv, "past_sequence_length", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", nkv, "total_sequence_length", hd]))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="edgekit")
    model.ir_version = 10
    return model
