"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

A few input channels of a Linear carry activations 10-100x larger than the rest, which
ruins per-tensor int8 activation quantization. SmoothQuant divides each channel j of
the activation by s_j and multiplies the weight's column j by it, which leaves X W^T
unchanged and moves the difficulty into the weights, where per-channel int8 absorbs it:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

The division is folded into the op that produces X, so it costs nothing at run time:

    input_layernorm          ──► q_proj, k_proj, v_proj
    post_attention_layernorm ──► gate_proj, up_proj
    up_proj                  ──► down_proj      (down's input is silu(gate) * up: linear in up)

o_proj's input comes out of attention with no op to fold into; it stays unsmoothed.
Then every Linear runs as W8A8 (w8a8.py, nbits.W8A8Weight).
"""

from __future__ import annotations

import torch

from edgekit.host.quant.awq import divide_output

DEFAULT_ALPHA = 0.5


@torch.no_grad()
def smooth(prev: torch.nn.Module, linears: list[torch.nn.Linear], act_max: torch.Tensor,
           alpha: float = DEFAULT_ALPHA, norm_offset: float = 0.0) -> torch.Tensor:
    """Migrate activation range into `linears` and out of `prev`; returns s (K,).

    `act_max` (K,) is max |x_j| over the calibration tokens of the linears' shared input.
    """
    assert 0.0 <= alpha <= 1.0, alpha
    k = act_max.shape[0]
    assert all(fc.in_features == k for fc in linears), "the linears must share their input"
    w_max = torch.cat([fc.weight.abs() for fc in linears]).amax(0).clamp(min=1e-5)  # (K,)
    s = (act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    divide_output(prev, s, norm_offset)
    for fc in linears:
        fc.weight.data = fc.weight.data * s
    return s
