"""The quantization methods edgekit offers: one table, read by `edgekit export --quant`, the
target profiles (targets/*.json "quantization"), the quantizer (host/quant/) and the bundle's
manifest ("quantization" record and its label).

Standard library only: the device side reads it to validate profiles and label bundles.

    name         layer           calibrated  weights   operator               activations
    rtn          rtn_layer       no          int4/8    MatMulNBits            float32
    gptq         gptq_layer      yes         int4/8    MatMulNBits            float32
    awq          awq_layer       yes         int4/8    MatMulNBits            float32
    smoothquant  smooth_layer    yes         int8      MatMulInteger          int8, dynamic per token
    w8a8         w8a8_layer      no          int8      DynamicQuantizeMatMul  uint8, dynamic per tensor
    int4-best    gptq_layer      yes         int4 g32  MatMulNBits            float32 (a recipe of gptq, down_proj int8)
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_SIZES = (0, 32, 64, 128)  # weights per scale; 0 = one scale per output channel


@dataclass(frozen=True)
class Method:
    """One way to quantize the decoder's Linears, and what it puts in the bundle."""

    name: str
    summary: str  # one line for --help and `edgekit targets`
    layer: str  # the function of host/quant/layers.py that quantizes one decoder layer
    calibrated: bool  # runs calibration text through the model
    bits: tuple[int, ...]  # weight bits it offers; the first is the default
    operator: str  # the ONNX operator of its Linears
    activations: str  # what happens to the activations at run time
    group_sizes: tuple[int, ...] = GROUP_SIZES  # weights per scale it offers
    default_group_size: int | None = None  # None: 128 at 4 bits, per channel at 8
    mixed_calibration: bool = False  # with --calib, N samples from it and N more from the default text
    preset_of: str | None = None  # a recipe of that method, at fixed bits
    # the Linears that read these inputs (the keys of a family's `linears`: attn_in, o_in, mlp_in,
    # down_in) are quantized at 8 bits, the rest at the method's bits
    int8_inputs: tuple[str, ...] = ()

    @property
    def int8_activations(self) -> bool:
        return self.activations != "float32"

    def group_size_for(self, bits: int) -> int:
        """The group size when the user gives none."""
        if self.default_group_size is not None:
            return self.default_group_size
        return 128 if bits == 4 else 0


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "round to nearest: seconds, no calibration", "rtn_layer", False, (4, 8),
           "MatMulNBits", "float32"),
    Method("gptq", "Hessian-guided rounding (Frantar et al. 2022): minutes, calibrated", "gptq_layer", True, (4, 8),
           "MatMulNBits", "float32", mixed_calibration=True),
    Method("awq", "activation-aware scales and clipping (Lin et al. 2023): minutes, calibrated", "awq_layer", True,
           (4, 8), "MatMulNBits", "float32", mixed_calibration=True),
    Method("smoothquant", "int8 weights and activations, outliers migrated into the weights (Xiao et al. 2022)",
           "smooth_layer", True, (8,), "MatMulInteger", "int8, dynamic per token", group_sizes=(0,)),
    Method("w8a8", "int8 weights and activations without smoothing (SmoothQuant's baseline)", "w8a8_layer", False,
           (8,), "DynamicQuantizeMatMul", "uint8, dynamic per tensor", group_sizes=(0,)),
    Method("int4-best", "the best int4 edgekit makes: GPTQ in groups of 32 (the MLP's down projection in 8 bits), "
           "calibrated on --calib and as much general text, so quality holds off the calibration's domain",
           "gptq_layer", True, (4,), "MatMulNBits", "float32", default_group_size=32, mixed_calibration=True,
           preset_of="gptq", int8_inputs=("down_in",)),
)}

