"""ONNX graphs of a decoder (host/decoder.py): one skeleton, two flavours of operators.

    skeleton.py   the decoder's shape, for every family
    fused.py      onnxruntime's contrib operators (GroupQueryAttention, MatMulNBits, ...)
    portable.py   standard ONNX operators only (for TensorRT and runtimes without the contrib ops)
    proto.py      collecting nodes and initializers into a ModelProto
"""

from edgekit.host.graph.proto import OPSET
from edgekit.host.graph.skeleton import FLAVOURS, build

__all__ = ["FLAVOURS", "OPSET", "build"]
