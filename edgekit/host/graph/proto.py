"""Collecting nodes and initializers, and wrapping them into the decoder's ModelProto.

Node names follow onnxruntime-genai's model builder: `/model/layers.{i}/attn/qkv_proj/MatMul`,
read as a path to the node; a node's outputs are `{name}/output_{k}`.
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
    _shared: set = field(default_factory=set)

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> list[str]:
        """Add a node named `name`; its outputs are `{name}/output_{k}` unless given."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)  # a 0-d array stays a scalar (ascontiguousarray would make it 1-d)
        self.initializers.append(numpy_helper.from_array(array if array.ndim == 0 else np.ascontiguousarray(array),
                                                         name))
        return name

    def shared(self, name: str, array: np.ndarray) -> str:
        """A constant that several nodes use: stored once, on first use."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, array)
        return name

    def shared_op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """A one-output node that several nodes read (a mask, a table lookup): emitted once."""
        if name not in self._shared:
            self._shared.add(name)
            self.op(op_type, inputs, name, **attrs)
        return f"{name}/output_0"


def branch_of(name: str, *values: str) -> onnx.GraphProto:
    """A subgraph (an If branch) that returns tensors of the outer graph as they are."""
    outs = [helper.make_tensor_value_info(f"{name}/output_{k}", TensorProto.FLOAT, None) for k in range(len(values))]
    nodes = [helper.make_node("Identity", [v], [o.name], name=f"{name}/Identity_{k}")
             for k, (v, o) in enumerate(zip(values, outs, strict=True))]
    return helper.make_graph(nodes, name.replace("/", "_"), [], outs)


def int64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


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
