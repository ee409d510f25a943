"""The settings of one quantization run, checked (host/options.py builds them from the flags)."""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.host.quant.awq import AWQConfig
from edgekit.host.quant.gptq import GPTQConfig
from edgekit.host.quant.rtn import QuantSpec
from edgekit.quantization import Method

DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
# lm_head by --lm-head-bits: int8 per channel by default; int4 in blocks of 32 (onnxruntime-genai's
# choice) trades perplexity for decode speed, the lm_head being the largest matmul of a small model
LM_HEAD = {8: QuantSpec(bits=8, group_size=0, sym=True), 4: QuantSpec(bits=4, group_size=32, sym=False)}


@dataclass(frozen=True)
class QuantPlan:
    method: Method  # its row of edgekit/quantization.py
    spec: QuantSpec  # the decoder Linears' bits, group size and symmetry
    lm_head: QuantSpec
    calib: str | None  # a text file; None: the default text
    samples: int  # calibration windows (N) ...
    seq_len: int  # ... of this many tokens (L)
    seed: int
    gptq: GPTQConfig
    awq: AWQConfig
    alpha: float  # smoothquant's migration strength

    def spec_for(self, key: str) -> QuantSpec:
        """The spec of the Linears reading input `key` (a family's `linears` value): 8 bits for the
        method's int8_inputs, else `spec`."""
        if key in self.method.int8_inputs:
            return QuantSpec(8, self.spec.group_size, self.spec.sym)
        return self.spec
