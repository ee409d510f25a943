"""The decoder's shape, once for every family and both flavours.

    input_ids ──► embed ──► layers ──► final norm ──► keep the last N positions ──► lm_head ──► logits

A family (host/families/) says what each part is (host/decoder.py); a flavour (fused.py,
portable.py) says which operators compute a norm, a matmul and attention. This module
only wires the parts together in the order the description gives.

The residual stream is carried as `Stream(base, pending)`: h = base + pending. The add is
left pending so that the flavour can fuse it into the next norm (the fused flavour's
SkipSimplifiedLayerNormalization adds and normalizes in one node and returns both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.host.decoder import Attention, Decoder, Layer, Linear, Norm, scale_rows
from edgekit.host.graph.fused import Fused
from edgekit.host.graph.portable import Portable
from edgekit.host.graph.proto import Graph, decoder_model, int64
from edgekit.host.quant.nbits import NBitsWeight

FLAVOURS: dict[str, type[Fused] | type[Portable]] = {"fused": Fused, "portable": Portable}


@dataclass
class Stream:
    base: str
    pending: str | None = None  # not yet added to base


def build(decoder: Decoder, flavour: str = "fused") -> onnx.ModelProto:
    """The ONNX graph of `decoder` in `flavour` ("fused" or "portable")."""
    arch = decoder.arch
    assert flavour in FLAVOURS, flavour
    assert len(decoder.layers) == arch.num_layers, (len(decoder.layers), arch.num_layers)
    for key, rot in decoder.rotary.items():  # positions beyond the table would read garbage
        assert rot.cos.shape == (arch.context_length, arch.head_size // 2), (key, rot.cos.shape)
    FLAVOURS[flavour].check(decoder)
    g = Graph()
    f = FLAVOURS[flavour](g, decoder)
    b = _Builder(g, f)
    f.begin()
    s = Stream(b.embed(decoder))
    for i, layer in enumerate(decoder.layers):
        s = b.layer(i, layer, s)
    h = b.final(decoder, s)
    b.lm_head(decoder, h)
    return decoder_model(g, arch, f.graph_name, f.inputs(), f.opsets)


class _Builder:
    def __init__(self, g: Graph, f: Fused | Portable):
        self.g, self.f = g, f

    # -- parts ------------------------------------------------------------------------------

    def linear(self, name: str, x: str, lin: Linear) -> str:
        """x ──► MatMul (the flavour's, fp32 or quantized) ──► [Add bias] ──► y"""
        y = self.f.matmul(name, x, lin.weight)
        if lin.bias is not None:
            (y,) = self.g.op("Add", [y, self.g.const(f"{name}.bias", lin.bias.astype(np.float32))], f"{name}/Add")
        return y

    def normed(self, name: str, norm: Norm | None, s: Stream) -> tuple[str, Stream]:
        """norm(h) and the stream with its pending add done (fused into the norm when there is one)."""
        if norm is None:
            h = self.materialize(name, s)
            return h, Stream(h)
        if s.pending is None:
            y, _ = self.f.norm(name, norm, s.base)
            return y, s
        y, total = self.f.norm(name, norm, s.pending, residual=s.base)
        assert total is not None  # a norm with a residual returns the sum unless keep_sum=False
        return y, Stream(total)

    def materialize(self, name: str, s: Stream) -> str:
        if s.pending is None:
            return s.base
        (h,) = self.g.op("Add", [s.base, s.pending], f"{name}/residual/Add")
        return h

    def embed(self, d: Decoder) -> str:
        """input_ids (B, S) ──► Gather [Cast fp16] or GatherBlockQuantized ──► [× scale] ──► [project_in]
        ──► [+ positions] ──► [norm]"""
        g, n = self.g, "/model/embed_tokens"
        table = d.embed
        if isinstance(table, NBitsWeight) and isinstance(self.f, Fused) and table.codes.shape[1] == table.in_features:
            h = self.f.gather(n, f"{d.embed_name}.weight", table)
        else:  # standard operators only, or a table whose last block is padded: dequantized to fp16 here
            if isinstance(table, NBitsWeight):
                table = table.dequantize().astype(np.float16)
            (h,) = g.op("Gather", [g.const(f"{d.embed_name}.weight", table), "input_ids"], f"{n}/Gather")
            if table.dtype == np.float16:
                (h,) = g.op("Cast", [h], f"{n}/Cast", to=TensorProto.FLOAT)
        if d.embed_scale != 1.0:
            (h,) = g.op("Mul", [h, g.const(f"{n}/scale", np.array(d.embed_scale, np.float32))], f"{n}/Mul")
        if d.project_in is not None:
            h = self.linear("/model/project_in", h, d.project_in)
        if d.positions is not None:
            positions = g.const("model.embed_positions.weight", d.positions)
            (p,) = g.op("Gather", [positions, self.f.positions()], "/model/embed_positions/Gather")
            (h,) = g.op("Add", [h, p], "/model/embed_positions/Add")
        if d.embed_norm is not None:
            h, _ = self.f.norm("/model/embed_norm", d.embed_norm, h)
        return h

    def layer(self, i: int, layer: Layer, s: Stream) -> Stream:
        """One layer in its arrangement (host/decoder.py Layer)."""
        n = f"/model/layers.{i}"
        if layer.post_norm:  # h = norm(h + attention(h)); h = norm(h + mlp(h))
            assert layer.attn_norm is not None and layer.mlp_norm is not None  # OPT's post-LN layers have both
            h = self.materialize(n, s)
            h, _ = self.f.norm(f"{n}/input_layernorm", layer.attn_norm, self.attention(n, i, layer.attention, h),
                               residual=h, keep_sum=False)
            h, _ = self.f.norm(f"{n}/post_attention_layernorm", layer.mlp_norm, self.mlp(n, layer.mlp, h),
                               residual=h, keep_sum=False)
            return Stream(h)

        x, s = self.normed(f"{n}/input_layernorm", layer.attn_norm, s)
        if layer.parallel:  # h + attention(norm(h)) + mlp(mlp_norm(h) or the same norm(h))
            y = x if layer.mlp_norm is None else self.f.norm(f"{n}/post_attention_layernorm", layer.mlp_norm,
                                                             s.base)[0]
            a = self.attention(n, i, layer.attention, x)
            m = self.mlp(n, layer.mlp, y)
            (both,) = self.g.op("Add", [a, m], f"{n}/parallel/Add")
            return Stream(s.base, both)

        a = self.attention(n, i, layer.attention, x)
        if layer.attn_out_norm is not None:
            a, _ = self.f.norm(f"{n}/attn/out_norm", layer.attn_out_norm, a)
        x, s = self.normed(f"{n}/post_attention_layernorm", layer.mlp_norm, Stream(s.base, a))
        m = self.mlp(n, layer.mlp, x)
        if layer.mlp_out_norm is not None:
            m, _ = self.f.norm(f"{n}/mlp/out_norm", layer.mlp_out_norm, m)
        return Stream(s.base, m)

    def attention(self, n: str, i: int, att: Attention, x: str) -> str:
        """x ──► qkv_proj ──► [Clip] ──► [Split, q_norm, k_norm] ──► attention (flavour) ──► o_proj"""
        g = self.g
        qkv = self.linear(f"{n}/attn/qkv_proj", x, att.qkv)
        if att.clip_qkv:
            c = np.float32(att.clip_qkv)
            (qkv,) = g.op("Clip", [qkv, g.const(f"{n}/attn/clip/min", np.array(-c)),
                                   g.const(f"{n}/attn/clip/max", np.array(c))], f"{n}/attn/clip/Clip")
        if att.q_norm is None and att.k_norm is None:
            out = self.f.attention(n, i, att, qkv)
        else:
            nh, nkv, hd = att.num_heads, att.num_kv_heads, att.head_size
            q, k, v = g.op("Split", [qkv, g.shared("/model/const/qkv_split", int64(nh * hd, nkv * hd, nkv * hd))],
                           f"{n}/attn/qkv/Split", outputs=3, axis=-1)
            q = self.qk_norm(f"{n}/attn/q_norm", att.q_norm, q, nh, hd)
            k = self.qk_norm(f"{n}/attn/k_norm", att.k_norm, k, nkv, hd)
            out = self.f.attention(n, i, att, q, k, v)
        return self.linear(f"{n}/attn/o_proj", out, att.o_proj)

    def qk_norm(self, name: str, norm: Norm | None, x: str, heads: int, head_size: int) -> str:
        """A norm over each head (one weight of head_size, or one per head) or over the whole projection.

            x (B, S, heads * hd) ──► Reshape (B, S, heads, hd) ──► norm ──► [Mul per-head weights] ──► Reshape back
        """
        if norm is None:
            return x
        if norm.weight.shape[-1] != head_size:
            return self.f.norm(name, norm, x)[0]
        g = self.g
        (x4,) = g.op("Reshape", [x, g.shared(f"/model/const/heads_{heads}", int64(0, 0, heads, head_size))],
                     f"{name}/Reshape")  # (batch, seq, heads, head_size)
        if norm.weight.ndim == 1:
            y, _ = self.f.norm(name, norm, x4)
        else:  # a weight per head (heads, head_size): normalize with unit weight, then scale
            assert norm.bias is None and norm.weight.shape == (heads, head_size), norm.weight.shape
            y, _ = self.f.norm(name, Norm(norm.name, np.ones(head_size, np.float32), None, norm.eps, norm.rms), x4)
            (y,) = g.op("Mul", [y, g.const(f"{norm.name}.per_head_weight", norm.weight)], f"{name}/Mul")
        (y,) = g.op("Reshape", [y, g.shared("/model/const/flat_heads", int64(0, 0, -1))], f"{name}/Reshape_1")
        return y

    def mlp(self, n: str, mlp, x: str) -> str:
        """Gated: down(act(gate(x)) * up(x)); plain: down(act(up(x))).

            x ─┬─► gate_proj ──► act ──► Mul ──► down_proj
               └─► up_proj ─────────────┘
        """
        g = self.g
        if mlp.gate is None:
            return self.linear(f"{n}/mlp/down_proj", self.activation(f"{n}/mlp/act_fn",
                                                                      self.linear(f"{n}/mlp/up_proj", x, mlp.up),
                                                                      mlp.act), mlp.down)
        gate, up = self.linear(f"{n}/mlp/gate_proj", x, mlp.gate), self.linear(f"{n}/mlp/up_proj", x, mlp.up)
        (prod,) = g.op("Mul", [self.activation(f"{n}/mlp/act_fn", gate, mlp.act), up], f"{n}/mlp/Mul")
        return self.linear(f"{n}/mlp/down_proj", prod, mlp.down)

    def activation(self, name: str, x: str, act: str) -> str:
        """silu as x * Sigmoid(x) (what onnxruntime fuses), relu as Relu, GELU as the flavour has it."""
        g = self.g
        if act == "silu":
            (sig,) = g.op("Sigmoid", [x], f"{name}/Sigmoid")
            (y,) = g.op("Mul", [x, sig], f"{name}/Mul")
            return y
        if act == "relu":
            (y,) = g.op("Relu", [x], f"{name}/Relu")
            return y
        assert act in ("gelu", "gelu_tanh"), act
        return self.f.gelu(name, x, tanh=act == "gelu_tanh")

    def final(self, d: Decoder, s: Stream) -> str:
        """final norm (adds the last pending output) ──► Slice[-N:] ──► [project_out]"""
        g = self.g
        if d.final_norm is None:
            h = self.materialize("/model/norm", s)
        else:
            h, _ = self.f.norm("/model/norm", d.final_norm, s.pending or s.base,
                               residual=s.base if s.pending else None, keep_sum=False)
        (start,) = g.op("Neg", ["num_logits_to_keep"], "/model/logits_to_keep/Neg")
        g.const("/model/logits_to_keep/ends", np.array([np.iinfo(np.int64).max], np.int64))
        g.const("/model/logits_to_keep/axes", np.array([1], np.int64))
        (h,) = g.op("Slice", [h, start, "/model/logits_to_keep/ends", "/model/logits_to_keep/axes"],
                    "/model/logits_to_keep/Slice")
        if d.project_out is not None:
            h = self.linear("/model/project_out", h, d.project_out)
        return h

    def lm_head(self, d: Decoder, h: str) -> None:
        """lm_head, then × logits_scale and softcap. When it is tied to the embedding, reuse that one
        initializer through Gemm(transB=1) instead of storing a transposed copy (49152 x 576 x 4 B =
        113 MB for SmolLM2).

            h (B, N, H) ─► Reshape (B*N, H) ─► Gemm(transB, alpha=scale, [C bias]) ─► Reshape (B, N, V)
                                                                                     ─► [softcap] ─► logits
        """
        g = self.g
        out = "/lm_head/output" if d.logits_softcap else "logits"
        if d.lm_head is not None:
            head = d.lm_head
            if d.logits_scale != 1.0:
                head = Linear(scale_rows(head.weight, d.logits_scale),
                              None if head.bias is None else head.bias * np.float32(d.logits_scale))
            y = self.linear("/lm_head", h, head)
            # made without a domain field, as edgekit 0.1 did, so that its bundles stay byte-identical
            g.nodes.append(helper.make_node("Identity", [y], [out], name="/lm_head/Identity"))
        else:
            assert isinstance(d.embed, np.ndarray)  # quantized bundles have their own lm_head
            vocab, hidden = d.embed.shape
            (shape,) = g.op("Shape", [h], "/lm_head/Shape", start=0, end=2)
            g.const("/lm_head/flat_shape", np.array([-1, hidden], np.int64))
            (flat,) = g.op("Reshape", [h, "/lm_head/flat_shape"], "/lm_head/Reshape")
            alpha = None if d.logits_scale == 1.0 else float(d.logits_scale)
            inputs = [flat, f"{d.embed_name}.weight"]
            if d.tied_lm_head_bias is not None:  # Gemm's C (GPT-J): alpha scales A B only, so scaled here
                inputs.append(g.const("lm_head.bias", (d.tied_lm_head_bias * d.logits_scale).astype(np.float32)))
            (y,) = g.op("Gemm", inputs, "/lm_head/Gemm", transB=1, alpha=alpha)
            g.const("/lm_head/vocab", np.array([vocab], np.int64))
            (out_shape,) = g.op("Concat", [shape, "/lm_head/vocab"], "/lm_head/Concat", axis=0)
            g.op("Reshape", [y, out_shape], "/lm_head/Reshape_1", outputs=[out])
        if d.logits_softcap:  # logits = cap * tanh(logits / cap)
            cap = g.const("/lm_head/softcap/cap", np.array(d.logits_softcap, np.float32))
            (y,) = g.op("Div", [out, cap], "/lm_head/softcap/Div")
            (y,) = g.op("Tanh", [y], "/lm_head/softcap/Tanh")
            g.op("Mul", [y, cap], "/lm_head/softcap/Mul", outputs=["logits"])
