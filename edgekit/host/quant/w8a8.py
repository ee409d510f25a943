"""W8A8 weights: symmetric int8 per output channel, for activations quantized at run time.

    code = round(w / s), s = max|w_row| / 127

SmoothQuant (smoothquant.py) makes the activations easy to quantize first; without it,
this is the plain per-tensor W8A8 baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekit.host.quant.nbits import W8A8Weight


def quantize_w8a8(w: torch.Tensor, activations: str = "per_tensor") -> W8A8Weight:
    """Int8 codes and per-channel scales for a Linear weight (N, K)."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)  # (N,)
    codes = torch.round(w.float() / scale[:, None]).clamp(-127, 127)
    return W8A8Weight(codes.to(torch.int8).numpy(), scale.numpy().astype(np.float32), activations)
