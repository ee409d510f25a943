"""The device profile at export time: its defaults, its operators, its memory.

The profiles themselves are data (targets/*.json, read by device/targets.py); this
module applies one to an export and checks the graph against it (device/check.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from edgekit.device.bundle import FLAVOUR_INPUTS, Architecture, GraphInfo
from edgekit.errors import ExportError
from edgekit.host.graph.proto import OPSET
from edgekit.host.options import ExportPlan


def graph_manifest(model: onnx.ModelProto, flavour: str) -> GraphInfo:
    """What a bundle's manifest records about the graph: the flavour's inputs and cache scheme and
    every operator it uses and the weights' bytes (`edgekit check` reads them on the device, where onnx is
    not installed, and sizes memory as export did)."""
    ops = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})
    fused = flavour == "fused"
    return GraphInfo(flavour=flavour, opset=OPSET, opset_com_microsoft=1 if fused else None,
                     past_present_share_buffer=fused, inputs=list(FLAVOUR_INPUTS[flavour]), operators=ops,
                     weight_bytes=initializer_bytes(model))


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Set every MatMulNBits node's accuracy_level to the target's (the compute type that
    suits its ISA). Returns how many nodes changed."""
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
                    break
            else:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
            changed += 1
    return changed


def accuracy_level(model: onnx.ModelProto) -> int | None:
    """The accuracy_level of the graph's MatMulNBits nodes (one for all of them), or None without any."""
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(levels) <= 1, f"MatMulNBits nodes at several accuracy levels: {levels}"
    return levels.pop() if levels else None


def initializer_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every initializer, as stored (4-bit tensors packed two per byte)."""
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def check_target_fit(model: onnx.ModelProto, arch: Architecture, plan: ExportPlan, say) -> None:
    """At export time: every operator runs on the target's execution providers, and the
    bundle fits in its memory (device/check.py). Fallbacks are reported; an operator no
    provider implements, or a bundle that cannot fit, raises ExportError."""
    from edgekit.device import check

    target, flavour = plan.target, plan.flavour
    if plan.profile is None:  # the built-in default, not a targets/ profile: nothing to check against
        return
    ops = graph_manifest(model, flavour).operators
    report = check.check_operators(ops, target["execution_providers"])
    for line in report.lines():
        say(f"      {line}")
    if report.unsupported:
        raise ExportError(f"target {target['name']}: {report.summary()}; choose another graph flavour or target")
    quantized = plan.quant is not None
    level = target.get("matmulnbits_accuracy_level", 4)
    est = check.estimate_memory(arch, initializer_bytes(model), flavour, quantized=quantized,
                                accuracy_level=level)
    budget = check.available_mb(target)
    say(f"      memory on {target['name']}: {est.describe()} of {budget:.0f} MB available")
    if est.total_mb > budget and plan.options.fit_context:
        # the graph does not depend on the context length beyond its rotary table, which may be longer:
        # a shorter KV cache is only the manifest's number
        n = check.largest_context(arch, initializer_bytes(model), flavour, budget, quantized, level)
        if n is None:
            raise ExportError(f"target {target['name']}: the weights alone do not fit in {budget:.0f} MB; "
                              "quantize to fewer bits or choose a larger target")
        say(f"      --fit-context: context length {arch.context_length} -> {n} to fit in {budget:.0f} MB")
        arch.context_length = n
    elif est.total_mb > budget:
        raise ExportError(
            f"target {target['name']}: needs about {est.total_mb:.0f} MB at context length {arch.context_length} "
            f"but {budget:.0f} MB are available; lower --context-length, pass --fit-context, or quantize to fewer bits")
