"""Round to nearest (RTN): the baseline every other method is measured against.

A weight W (N out, K in) is cut into blocks of `group_size` consecutive input features per
output row (one block per row when per-channel); each block gets a scale s and a zero
point z from its range, and every weight rounds independently:

    code = clamp(round(w / s) + z, 0, 2^bits - 1)        w_hat = (code - z) * s

Symmetric: z = 2^(bits-1) (MatMulNBits' implicit default, so no zero points are stored),
s = 2 max|w| / (2^bits - 1). Asymmetric: the range [min(w, 0), max(w, 0)] mapped onto the
codes, z stored per block. The helpers here are shared by GPTQ, AWQ and SmoothQuant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgekit.host.quant.nbits import NBitsWeight, block_size_for


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is rounded: bits, weights per scale (0 = per output channel), symmetry."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `x` (..., n) -> (...,), (...,); zero is a whole number."""
    xmin = x.amin(-1).clamp(max=0)
    xmax = x.amax(-1).clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero block: any scale reproduces it
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def params_mse(x: torch.Tensor, spec: QuantSpec, grid: int = 100, maxshrink: float = 0.2,
               norm: float = 2.4, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like params, but each row's range shrunk by the factor in 1, 0.99, ... 1 - maxshrink
    that minimises sum importance * |x - quant(x)|^norm (the GPTQ reference code's `mse` option;
    its maxshrink 0.8 tries 80 factors, but on SmolLM2's int4 groups of 32 and 128 none below
    0.8 ever wins, so 20 give the same grids 5x faster).

    `importance` (broadcast against x, default 1) weighs each weight's error, GPTQ by the RMS of
    the input it multiplies (the square root of diag H; llama.cpp's importance matrix is its
    square): unweighted, the search clips a weight that meets a massive activation as readily
    as any other."""
    weight = torch.ones(()) if importance is None else importance.float()
    best_scale, best_zero = params(x, spec)
    best_err = (weight * (fake_quant(x, best_scale, best_zero, spec) - x).abs().pow(norm)).sum(-1)
    for i in range(1, int(maxshrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = params(x * p, spec)  # the range of x * p is p times the range of x
        err = (weight * (fake_quant(x, scale, zero, spec) - x).abs().pow(norm)).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round `x` onto the grid (scale, zero), broadcasting them along the last axis."""
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, spec.maxq)
    return (q - zero[..., None]) * scale[..., None]


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, groups, group), zero-padding the last group (zero is on every grid)."""
    n, k = w.shape
    groups = -(-k // group)
    return torch.nn.functional.pad(w, (0, groups * group - k)).reshape(n, groups, group)


def group_len(spec: QuantSpec, in_features: int) -> int:
    """Weights sharing one scale: the group size, or the whole row when per-channel."""
    return spec.group_size or in_features


def group_params(w: torch.Tensor, spec: QuantSpec, mse: bool = False,
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN scales and zero points of `w` (N, K), each (N, groups); with `mse`, ranges searched,
    each input feature's error weighted by `importance` (K,) when given (see params_mse)."""
    gl = group_len(spec, w.shape[1])
    if not mse:
        return params(grouped(w.float(), gl), spec)
    return params_mse(grouped(w.float(), gl), spec,
                      importance=None if importance is None else grouped(importance[None], gl)[0])


def quantize_dequantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN of `w` (N, K) as the kernel will compute it, in fp32 (N, K)."""
    n, k = w.shape
    g = grouped(w.float(), group_len(spec, k))  # (N, groups, group)
    scale, zero = params(g, spec)
    return fake_quant(g, scale, zero, spec).reshape(n, -1)[:, :k]


def encode(w_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> NBitsWeight:
    """MatMulNBits codes for `w_hat` (N, K), whose values already lie on the grid of (scale, zero),
    both (N, groups). Per-channel grids are stored as MatMulNBits blocks that repeat the row's
    scale (block_size_for), which avoids padding every row up to a power of two."""
    n, k = w_hat.shape
    block = block_size_for(spec.group_size, k, spec.bits)
    k_blocks = -(-k // block)
    if not spec.group_size:
        assert scale.shape == (n, 1), scale.shape
        scale, zero = scale.expand(n, k_blocks), zero.expand(n, k_blocks)
    assert scale.shape == (n, k_blocks), (scale.shape, n, k, block)
    g = grouped(w_hat.float(), block)  # (N, k_blocks, block)
    codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, spec.maxq)
    return NBitsWeight(
        codes=codes.reshape(n, -1).to(torch.uint8).numpy(),
        scales=np.ascontiguousarray(scale.float().numpy(), dtype=np.float32),
        zeros=None if spec.sym else np.ascontiguousarray(zero.to(torch.uint8).numpy()),
        bits=spec.bits, block_size=block, in_features=k,
    )


def rtn(w: torch.Tensor, spec: QuantSpec) -> NBitsWeight:
    """Round-to-nearest quantization of a Linear weight (N, K)."""
    scale, zero = group_params(w, spec)
    return encode(quantize_dequantize(w, spec), scale, zero, spec)
