"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), following the paper's Algorithm 1 and its reference code.

For a Linear weight W (N, K) and its calibration inputs X (T, K), GPTQ quantizes the
columns of W one at a time and spreads each column's rounding error over the columns not
yet quantized, so as to minimise ||X W^T - X W_hat^T||^2. The Hessian of that objective
is H = 2 X^T X / T. With the inverse's upper Cholesky factor U (H^-1 = U^T U):

    for each column j:  q_j = quant(w_j);  err = (w_j - q_j) / U[j, j];  W[:, j:] -= err U[j, j:]

The Hessian weighs each sample's first token more (`sink_weight`): every later token attends
to it (the "attention sink", Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks"), so an error in its keys and values, or in the residual stream that feeds
them, reaches every position, while the plain H counts it as one token in L. Measured on
SmolLM2-135M int4 g32, default calibration, against the plain H (fake-quantized research
numbers in benchmarks/quantization/README.md): weight 0 (the first tokens left out of H)
costs 10-16% of perplexity on each of four out-of-domain texts, weight 8 gains 3-5% on
each, weight 32 only 1-3%.

Lazy batch updates apply the updates inside a block of `block_size` columns right away
and to the rest of W once per block (same result, far less memory traffic). Dampening
adds `percdamp` x mean(diag H) to the diagonal so the Cholesky exists. Act-order
quantizes columns in order of decreasing diag(H); with groups, the group grids are fixed
from the unquantized weights first ("static groups"), so groups stay contiguous in the
original column order, which is what MatMulNBits stores (no g_idx needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from edgekit.errors import ExportError
from edgekit.host.quant.nbits import NBitsWeight
from edgekit.host.quant.rtn import QuantSpec, encode, fake_quant, group_params, params, params_mse


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01
    block_size: int = 128  # lazy batch size, columns
    act_order: bool = True
    # each group's range searched (the reference's Quantizer(mse=True)) instead of min/max, the
    # error of each weight weighted by its input's RMS (params_mse): with sink_weight 8 at g32, 0 to
    # 2% lower perplexity on each out-of-domain text, never higher; the weighting takes g128 from
    # 25.32 to 24.46 out-of-domain mean (fake-quantized research numbers, benchmarks/quantization/README.md)
    mse: bool = True
    sink_weight: float = 8.0  # weight in H of each sample's first token (see the module docstring)


def hessian(x: torch.Tensor, sink_weight: float = 1.0) -> torch.Tensor:
    """H = 2 X^T C X / sum(C) (float64) for calibration inputs x (N, L, K), or (T, K) with C = 1.

    C weighs every token 1 but each sample's first, the attention sink, `sink_weight`. The
    product in float32 (as the reference; float64 is 5x slower on CPU), the inversion later
    in float64.
    """
    assert sink_weight >= 0, sink_weight
    x = x.float()
    if x.dim() == 3 and sink_weight != 1:
        sinks = x[:, 0]  # (N, K)
        h = x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]) + (sink_weight - 1) * (sinks.T @ sinks)
        total = x.shape[0] * x.shape[1] + (sink_weight - 1) * x.shape[0]
        return ((2.0 / total) * h).double()
    x = x.reshape(-1, x.shape[-1])
    return ((2.0 / x.shape[0]) * (x.T @ x)).double()


@contextmanager
def single_thread() -> Iterator[None]:
    """For loops of many small tensor ops (GPTQ's columns, AWQ's grids): thread hand-offs cost
    more than they save (measured 6-7x slower with 2 threads than 1 on a busy 2-core host)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, config: GPTQConfig = GPTQConfig()) -> NBitsWeight:
    """Quantize a Linear weight `w` (N, K) given the Hessian `h` (K, K) of its inputs."""
    n, k = w.shape
    assert h.shape == (k, k), f"Hessian {tuple(h.shape)} does not match the weight's {k} input features"
    gs = spec.group_size
    assert not gs or config.block_size % gs == 0, "the lazy batch must hold whole groups"
    W = w.detach().float().clone()
    H = h.double().clone()  # the Cholesky in float64; the column updates in float32, as the reference

    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    # (K,) each input's RMS, what a weight's error is multiplied by: the search then keeps a weight facing a
    # massive input (2550x the median RMS in SmolLM2's layer 11). Its mean square (diag H, 6.5e6x there) fits
    # the calibration text's statistics more: 26.90 against 27.35 on the licence at g128 (GPTQConfig.mse)
    importance = torch.diag(H).float().sqrt()
    # grids fixed up front: per-channel always; per group when act-order would interleave groups
    static = None
    if not gs or config.act_order:
        static = group_params(W, spec, config.mse, importance)  # (N, groups) each

    perm = torch.arange(k)
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    invperm = torch.argsort(perm)

    H += config.percdamp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError:  # fewer calibration tokens than input features, and too little damping
        raise ExportError(f"GPTQ's Hessian ({k} inputs) is not positive definite with --damp {config.percdamp:g}; "
                          "raise --damp (default 0.01) or calibrate on more tokens (--calib-samples, "
                          "--calib-seq-len)") from None

    Q = torch.zeros_like(W)
    scales = torch.zeros(n, -(-k // gs) if gs else 1, dtype=W.dtype)
    zeros = torch.zeros_like(scales)
    with single_thread():
        _columns(W, U, Q, perm, importance[perm], scales, zeros, static, spec, config)
    Q = Q[:, invperm]
    if static is not None:
        scales, zeros = static
    return encode(Q, scales, zeros, spec)


def _columns(W, U, Q, perm, importance, scales, zeros, static, spec: QuantSpec, config: GPTQConfig) -> None:
    """Algorithm 1's loop: quantize column by column, in lazy batches; fills Q (and the grids)."""
    k, gs = W.shape[1], spec.group_size
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        W1 = W[:, i1:i2].clone()  # (N, B): this block, updated eagerly
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's index in the original order
            if static is not None:
                g = col // gs if gs else 0
                scale, zero = static[0][:, g], static[1][:, g]
            else:
                if (i1 + i) % gs == 0:  # a new group starts: its grid from the error-updated weights
                    block = W1[:, i:i + gs]
                    scale, zero = (params_mse(block, spec, importance=importance[i1 + i:i1 + i + gs]) if config.mse
                                   else params(block, spec))
                    scales[:, col // gs], zeros[:, col // gs] = scale, zero
            assert scale is not None and zero is not None  # column 0 starts a group
            w_col = W1[:, i]
            q = fake_quant(w_col[:, None], scale, zero, spec)[:, 0]
            Q[:, i1 + i] = q
            err = (w_col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of everything after the block
