"""Integer weights as onnxruntime kernels see them.

Two layouts, one per operator:

- MatMulNBits (com.microsoft), weight-only int4/int8 with one scale (and zero point) per
  block of `block_size` consecutive input features of one output row. The layout, as
  docs/ContribOperators.md and onnxruntime's own matmul_nbits_quantizer.py have it:

      B            uint8 (N, k_blocks, blob_size)   blob_size = block_size * bits / 8;
                   4 bits: element 2j in the low nibble, 2j + 1 in the high nibble
      scales       float (N * k_blocks,)            row-major: all blocks of row 0 first
      zero_points  uint8 (N * ceil(k_blocks * bits / 8),)   packed like B, per row;
                   absent means 2^(bits-1) (8 for int4, 128 for int8): symmetric
      w[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]

  K need not be a multiple of block_size: the last block is padded. `accuracy_level=4`
  lets the CPU kernel quantize A to int8 per block and use integer dot products.

- W8A8: 8-bit weights (K, N) with a scale (and zero point) per output column, the
  activation quantized to 8 bits at run time: per tensor by DynamicQuantizeMatMul
  (com.microsoft), or per token by a few standard ops in front of MatMulInteger.

These are numbers only: the graph flavours (host/graph/) emit the operators that read them.
Both kinds support the row operations a family needs to rearrange q/k/v (take_rows, stack,
scale_rows): every scale belongs to one output row, so rows move with their scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Int8 inputs, int32 accumulation in MatMulNBits' CPU kernel (onnxruntime's ACCURACY_LEVEL Level4).
ACCURACY_LEVEL_INT8 = 4


def block_size_for(group_size: int, in_features: int, bits: int = 4) -> int:
    """MatMulNBits' block_size (a power of two >= 16) for a group size.

    Per-channel (0) stores every row as several blocks that repeat the row's scale: one block
    of next_pow2(K) would pad 576 to 1024 and store 78% more codes. The block is the largest
    power of two dividing K, at most 256 for 4 bits and 32 for 8 bits: with accuracy_level=4
    the kernel also quantizes the activations to int8 per block, and for 8-bit weights that
    rounding dominates (SmolLM2 perplexity +1.1% over fp32 with blocks of 64, +0.85% with 32).
    """
    if group_size:
        return group_size
    block = 256 if bits == 4 else 32
    while block > 16 and in_features % block:
        block //= 2
    return block


@dataclass
class NBitsWeight:
    """A Linear weight (N out, K in) as MatMulNBits' integer codes, scales and zero points."""

    codes: np.ndarray  # uint8 (N, k_blocks * block_size), values in [0, 2^bits), padding = zero point
    scales: np.ndarray  # float32 (N, k_blocks)
    zeros: np.ndarray | None  # uint8 (N, k_blocks) or None for symmetric (implicit 2^(bits-1))
    bits: int
    block_size: int
    in_features: int  # K
    accuracy_level: int = ACCURACY_LEVEL_INT8

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> np.ndarray:
        """The fp32 weight (N, K) the kernel computes with."""
        n, kp = self.codes.shape
        zeros = self.zeros if self.zeros is not None else np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)
        q = self.codes.reshape(n, -1, self.block_size).astype(np.float32)  # (N, k_blocks, block)
        w = (q - zeros[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(n, kp)[:, : self.in_features]

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B, scales, zero_points) exactly as MatMulNBits takes them."""
        n = self.out_features
        k_blocks = self.scales.shape[1]
        b = _pack_rows(self.codes, self.bits).reshape(n, k_blocks, self.block_size * self.bits // 8)
        zp = None if self.zeros is None else _pack_rows(self.zeros, self.bits).reshape(-1)
        return b, self.scales.astype(np.float32).reshape(-1), zp

    def take_rows(self, index: np.ndarray) -> NBitsWeight:
        """The output rows `index`, with their own scales and zero points."""
        zeros = None if self.zeros is None else self.zeros[index]
        return NBitsWeight(self.codes[index], self.scales[index], zeros, self.bits, self.block_size,
                           self.in_features, self.accuracy_level)

    def scale_rows(self, factor: float | np.ndarray) -> NBitsWeight:
        """The weight times `factor` per output row: only the scales change, so it is exact."""
        f = np.asarray(factor, np.float32)
        scales = self.scales * (f[:, None] if f.ndim else f)
        return NBitsWeight(self.codes, scales.astype(np.float32), self.zeros, self.bits, self.block_size,
                           self.in_features, self.accuracy_level)

    @staticmethod
    def stack(weights: list[NBitsWeight]) -> NBitsWeight:
        """Stack along the output dimension (q, k, v -> qkv): the blocks are per row, so rows from
        different weights keep their own scales."""
        first = weights[0]
        for w in weights[1:]:
            assert (w.bits, w.block_size, w.in_features) == (first.bits, first.block_size, first.in_features)
            assert (w.zeros is None) == (first.zeros is None)
        zeros = None if first.zeros is None else np.concatenate([w.zeros for w in weights])
        return NBitsWeight(np.concatenate([w.codes for w in weights]), np.concatenate([w.scales for w in weights]),
                           zeros, first.bits, first.block_size, first.in_features, first.accuracy_level)

    @property
    def nbytes(self) -> int:
        b, s, zp = self.packed()
        return b.nbytes + s.nbytes + (0 if zp is None else zp.nbytes)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack each row of uint8 codes (< 2^bits) into bytes, low bits first; odd rows padded with 0."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    assert bits == 4, bits
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)


@dataclass
class W8A8Weight:
    """A Linear weight (N, K) as symmetric int8 with a scale per output channel, run with
    activations quantized on the fly (SmoothQuant's W8A8), per tensor or per token."""

    codes: np.ndarray  # int8 (N, K)
    scales: np.ndarray  # float32 (N,)
    activations: str = "per_tensor"  # or "per_token"

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scales[:, None]

    def take_rows(self, index: np.ndarray) -> W8A8Weight:
        return W8A8Weight(self.codes[index], self.scales[index], self.activations)

    def scale_rows(self, factor: float | np.ndarray) -> W8A8Weight:
        f = np.asarray(factor, np.float32)
        return W8A8Weight(self.codes, (self.scales * f).astype(np.float32), self.activations)

    @staticmethod
    def stack(weights: list[W8A8Weight]) -> W8A8Weight:
        return W8A8Weight(np.concatenate([w.codes for w in weights]), np.concatenate([w.scales for w in weights]),
                          weights[0].activations)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes
