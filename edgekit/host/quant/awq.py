"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration"), following the paper and its reference code (llm-awq auto_scale.py,
auto_clip.py).

1. Scale search. The input channels that carry large activations matter most; scaling
   them up by s before rounding (and the activation down by 1/s) shrinks their relative
   rounding error. For a group of Linears that share an input x:

       s = mean|x|^ratio (normalised so that sqrt(max s * min s) = 1),  ratio on a grid in [0, 1)

   each ratio is scored by the MSE between the block's output in fp32 and with the
   weights W * s rounded (then / s), and the best s is applied exactly: W <- W * s and the
   op before them <- op / s (an RMSNorm's weight, or the rows of the Linear before).
   The reference keeps the ratio of least MSE over all the scored samples. edgekit scores each
   sample's MSE relative to its MSE with no scaling (ratio 0), and a ratio by its worst sample:
   a scale never helps one text at another's cost (with --calib the scored samples are the
   user's text and the default one), and never raises a scored sample's error over no scaling.
   SmolLM2 int4 g128, fake-quantized, licence / manpage / manual / releasenotes: default
   calibration 26.70 / 17.87 / 19.97 / 35.84 -> 26.29 / 17.63 / 19.80 / 35.28, narrow --calib
   28.16 / 17.82 / 20.10 / 36.56 -> 27.96 / 17.60 / 19.97 / 36.21 (benchmarks/quantization/README.md).
   With a --calib text, mean|x| is taken over the default text's samples alone (edgekit's; the
   user's samples still score each ratio and feed steps 2 and 3): a narrow text's salient channels
   are not the ones general text leans on. SmolLM2 int4 g128, narrow --calib, device bundles:
   licence / manpage / manual / releasenotes 28.11 / 17.61 / 20.05 / 36.44 -> 26.79 / 18.08 /
   20.40 / 36.50, at least half of RTN's increase recovered on each (35% on the licence before).
   Each sample's first token is left out of the MSE (edgekit's): the attention sink's
   output is up to 80x larger than the other tokens' in SmolLM2's last layers, so 0.2% of
   the tokens made 25-51% of the MSE there and the search fitted that one token (its error
   still counts, 8-fold, in the Hessian of steps 2 and 3).

       input_layernorm          ──► q_proj, k_proj, v_proj   (block scored: self_attn)
       v_proj                   ──► o_proj                   (block scored: o_proj)
       post_attention_layernorm ──► gate_proj, up_proj       (block scored: mlp)
       up_proj                  ──► down_proj

   Under grouped-query attention o_proj's input channel h * head_size + d is v_proj's output
   channel (h // n_rep) * head_size + d, repeated for the n_rep query heads sharing a kv head:
   the channels that repeat one v channel share its scale (`ScaleGroup.channels`), scored on
   their mean |x|. The reference code leaves o_proj unscaled then. SmolLM2 (3 kv heads of 9)
   int4 g128, default calibration, with both of edgekit's changes to this step: the
   out-of-domain mean of benchmarks/quantization 25.42 -> 25.22, the licence 27.25 -> 26.78;
   with a narrow --calib the licence got worse (27.78 -> 28.38; README there).

2. Clip search. Per group of weights, the clipping range max|w| * (1 - i/n_grid) for
   i < max_shrink * n_grid that minimises the row's output error on the calibration tokens
   (all of them, through the Hessian; the reference samples 512 and scores each group alone):
   each group's best range alone first, then rounds of coordinate descent over the groups of
   a row, which count the error the groups share (edgekit's).
   q_proj and k_proj are not clipped (their errors compound in q k^T; as the reference).

3. Scale fit (edgekit's, not the paper's). Rounding fixes each weight's code c and its
   group's zero point z; the group scales of one output row then enter the layer's output
   linearly, so the scales minimising ||X (w - w_hat)^T||^2 over all groups of the row at once
   are a small least-squares problem in H = 2 X^T X / T (the GPTQ Hessian):

       w_hat = D s,  D[k, g] = (c_k - z_g) if k in group g else 0   ->   (D^T H D) s = D^T H w

   The scales of a row's groups are fitted together. Measured on SmolLM2
   int4 g128 bundles, default calibration: 1.4% to 4.1% lower perplexity on each of the four
   out-of-domain texts (benchmarks/quantization/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgekit.host.quant.nbits import NBitsWeight
from edgekit.host.quant.rtn import QuantSpec, fake_quant, group_len, grouped, params, quantize_dequantize


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20
    search_tokens: int = 1024  # calibration tokens each candidate scale is scored on (CPU time)
    clip: bool = True
    max_shrink: float = 0.5
    clip_passes: int = 2  # step 2: rounds of coordinate descent over a row's groups (0: each group alone)
    fit: bool = True  # step 3: the scales refitted to the codes by least squares


@dataclass
class ScaleGroup:
    prev: torch.nn.Module  # the norm or Linear whose output feeds `linears`
    linears: list[torch.nn.Linear]
    x: torch.Tensor  # their input (N, L, K)
    block: Callable[[torch.Tensor], torch.Tensor]  # what the loss is measured on
    norm_offset: float = 0.0  # a norm that multiplies by (offset + weight) (Gemma: 1)
    channels: torch.Tensor | None = None  # (K,) the output channel of `prev` each input channel reads; None: its own
    statistic_rows: slice | None = None  # the samples of x that mean|x| is taken over (search_scale); None: all

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """A scale over prev's output channels -> over the Linears' input channels (K,)."""
        return s if self.channels is None else s[self.channels]


@torch.no_grad()
def search_scale(group: ScaleGroup, spec: QuantSpec, config: AWQConfig) -> torch.Tensor:
    """The scale s over prev's output channels (K, or fewer under GQA: see `ScaleGroup.channels`)
    that minimises the group's block output MSE."""
    n, seq_len, k = group.x.shape
    # score on S samples spread over all N: a mixed calibration puts --calib's samples first, and
    # scales fitted to the first S alone then fit that text (AWQ g128 narrow: licence 31.5 -> 29.8)
    pick = torch.linspace(0, n - 1, max(1, min(n, config.search_tokens // seq_len))).round().long()
    x = group.x[pick]  # (S, L, K)
    want = group.block(x)[:, 1:]  # (S, L - 1, out): without the sink (see the module docstring)
    # (K,) mean |activation| per channel, over the default text's samples beside a --calib (module docstring)
    stat = group.x if group.statistic_rows is None else group.x[group.statistic_rows]
    x_max = stat.abs().reshape(-1, k).mean(0)
    if group.channels is not None:  # (prev's channels,): the mean over the input channels that repeat each
        repeats = torch.bincount(group.channels)
        x_max = torch.zeros(len(repeats)).index_add_(0, group.channels, x_max) / repeats
    # a channel the calibration never fed (a ReLU that never fired: OPT's fc1 -> fc2) tells nothing: the
    # median, not a scale of 1e-4 ** ratio that multiplies its input by up to 7000 when it does fire
    # (the bundle's int8 activations then lose every other channel of its block)
    x_max = torch.where(x_max > 0, x_max, x_max[x_max > 0].median() if bool((x_max > 0).any()) else 1.0)
    originals = [fc.weight.data for fc in group.linears]
    candidates, losses = [], []
    try:
        for r in range(config.n_grid):
            s = x_max.pow(r / config.n_grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            sk = group.expand(s)  # (K,)
            for fc, w in zip(group.linears, originals, strict=True):
                fc.weight.data = quantize_dequantize(w * sk, spec) / sk
            candidates.append(s)
            losses.append((want - group.block(x)[:, 1:]).float().pow(2).mean((1, 2)))  # (S,) each sample's MSE
    finally:
        for fc, w in zip(group.linears, originals, strict=True):
            fc.weight.data = w
    # each ratio scored by its worst sample, relative to no scaling (ratio 0): see the module docstring
    loss = torch.stack(losses)  # (ratios, S)
    worst = (loss / loss[0].clamp(min=1e-30)).amax(1)  # (ratios,); worst[0] = 1
    return candidates[int(worst.argmin())]


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """prev <- prev / s, linears <- W * s (over the channels they read); the block computes exactly
    what it did."""
    sk = group.expand(s)  # (K,)
    divide_output(group.prev, s, group.norm_offset)
    for fc in group.linears:
        fc.weight.data = fc.weight.data * sk
    group.x = group.x / sk


@torch.no_grad()
def divide_output(prev: torch.nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the output channels of `prev` by s (K,), in place.

        Linear      its output rows (and bias) are the next op's input channels
        LayerNorm   y = norm(x) * weight + bias: both divided
        RMSNorm     y = x / rms(x) * (offset + weight): offset + weight divided
    """
    weight = prev.weight
    assert isinstance(weight, torch.Tensor), f"{type(prev).__name__} has no weight tensor to scale"
    if isinstance(prev, torch.nn.Linear):
        weight.data = weight.data / s[:, None]
    elif norm_offset:
        weight.data = (weight.data + norm_offset) / s - norm_offset
    else:
        weight.data = weight.data / s
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = bias.data / s


@torch.no_grad()
def search_clip(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, config: AWQConfig,
                rows_per_batch: int = 256) -> torch.Tensor:
    """`w` (N, K) with each group clipped to the range that keeps its row's output error on the
    calibration inputs, whose Hessian is `h` (K, K), lowest; never above the error without clipping.

    A row's rounding error e (K,) adds mean_t (x_t . e)^2 = e^T H e / 2 to its output's mean
    square, H = 2 X^T X / T: every calibration token is scored (each sample's first weighted as H
    weighs it), where the reference code samples 512 and scores each group g alone (e_g^T H_gg e_g).
    Each group starts at its best range alone (or the row at no clipping, if that is lower), then
    `config.clip_passes` rounds of coordinate descent take the groups' shared error into account:
    changing group g's error by d changes the row's by 2 d^T (H e)_g + d^T H_gg d.

    AWQ g128 licence / manpage / manual / releasenotes, fake-quantized: 27.71 / 18.68 / 20.60 /
    36.71 with 512 sampled tokens, 27.39 / 18.34 / 20.56 / 36.43 with every group alone through H,
    27.21 / 18.09 / 20.40 / 35.81 with two rounds of descent (benchmarks/quantization/README.md).
    A candidate costs N * K * gl multiply-adds, a round N * K * K: for the 8-bit default (per
    channel, one group a row) no round is needed, and the candidates cost K / 512 times the
    reference's (at most 4x for K <= 2048, 21x for a 7B model's 11008-wide down projection).
    """
    n, k = w.shape
    assert h.shape == (k, k), (w.shape, h.shape)
    gl = group_len(spec, k)
    groups = -(-k // gl)
    hp = torch.zeros(groups * gl, groups * gl)
    hp[:k, :k] = h.float()  # the ragged last group's padding has no input: it adds no error
    blocks = torch.stack([hp[g * gl:(g + 1) * gl, g * gl:(g + 1) * gl] for g in range(groups)])  # (G, gl, gl)
    shrink = torch.tensor([1 - i / config.n_grid for i in range(max(1, int(config.max_shrink * config.n_grid)))])
    out = []
    for r0 in range(0, n, rows_per_batch):
        wg = grouped(w[r0:r0 + rows_per_batch].float(), gl)  # (R, G, gl)
        rows = wg.shape[0]
        org_max = wg.abs().amax(-1, keepdim=True)  # (R, G, 1)
        errors = []  # each candidate range's rounding error
        for f in shrink:
            clipped = torch.clamp(wg, -org_max * f, org_max * f)
            errors.append(fake_quant(clipped, *params(clipped, spec), spec) - wg)
        err = torch.stack(errors)  # (I, R, G, gl)
        r, g_ = torch.arange(rows)[:, None], torch.arange(groups)

        def row_error(e: torch.Tensor) -> torch.Tensor:  # (R,) e^T H e of each row
            flat = e.reshape(e.shape[0], -1)
            return ((flat @ hp) * flat).sum(-1)

        choice = torch.einsum("irgl,glm,irgm->irg", err, blocks, err).argmin(0)  # (R, G): each group alone
        none = torch.zeros_like(choice)  # shrink[0] = 1: no clipping
        choice = torch.where((row_error(err[none, r, g_]) < row_error(err[choice, r, g_]))[:, None], none, choice)
        e = err[choice, r, g_]  # (R, G, gl)
        for _ in range(config.clip_passes if groups > 1 else 0):
            for g in range(groups):
                he = e.reshape(rows, -1) @ hp[:, g * gl:(g + 1) * gl]  # (R, gl): (H e) at group g
                d = err[:, :, g] - e[None, :, g]  # (I, R, gl): each candidate's change to the group's error
                change = 2 * (d * he).sum(-1) + torch.einsum("irl,lm,irm->ir", d, blocks[g], d)  # (I, R)
                choice[:, g] = change.argmin(0)  # the current one changes nothing: never worse
                e[:, g] = err[choice[:, g], r[:, 0], g]
        best = org_max * shrink[choice][..., None]  # (R, G, 1)
        out.append(torch.clamp(wg, -best, best).reshape(rows, -1)[:, :k])
    return torch.cat(out)


@torch.no_grad()
def fit_scales(w: torch.Tensor, h: torch.Tensor, q: NBitsWeight, percdamp: float = 0.01,
               rows_per_batch: int = 256) -> NBitsWeight:
    """`q` with each row's block scales refitted, codes and zero points kept, so that its output
    error (w - w_hat) H (w - w_hat)^T on inputs of Hessian `h` (K, K) is least; a row keeps its
    scales where the fit is not positive or not better (see step 3 of the module docstring)."""
    n, k = w.shape
    assert h.shape == (k, k) and q.in_features == k and q.out_features == n, (w.shape, h.shape, q.codes.shape)
    blocks, size = q.scales.shape[1], q.block_size
    kp = blocks * size  # K padded to whole blocks: padding codes equal their zero point, so d = 0 there
    H = torch.zeros(kp, kp)
    H[:k, :k] = h.float() + percdamp * torch.diag(h).float().mean() * torch.eye(k)  # damped as GPTQ: solvable
    zeros = (np.full(q.scales.shape, 1 << (q.bits - 1)) if q.zeros is None else q.zeros).astype(np.float32)
    best = torch.from_numpy(q.scales).float().clone()  # (N, G)
    for r0 in range(0, n, rows_per_batch):
        r = slice(r0, r0 + rows_per_batch)
        wp = torch.nn.functional.pad(w[r].float(), (0, kp - k))  # (R, Kp)
        codes = q.codes[r].reshape(-1, blocks, size).astype(np.float32)
        d = torch.from_numpy(codes - zeros[r, :, None])  # (R, G, size): code - zero point
        rows = d.shape[0]
        hd = torch.einsum("kgb,ngb->nkg", H.reshape(kp, blocks, size), d)  # (R, Kp, G): H D
        dhd = torch.einsum("nga,ngah->ngh", d, hd.reshape(rows, blocks, size, blocks)).double()  # (R, G, G): D^T H D
        dhw = (d * (wp @ H).reshape(rows, blocks, size)).sum(-1).double()  # (R, G): D^T H w
        ridge = 1e-9 * dhd.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp(min=1e-30)  # an all-zero block is singular
        fit = torch.linalg.solve(dhd + ridge[:, None, None] * torch.eye(blocks, dtype=torch.float64), dhw).float()
        fit = torch.where((d == 0).all(-1), best[r], fit)  # a block whose codes all sit at its zero point: any scale

        def error(s: torch.Tensor, wp=wp, d=d) -> torch.Tensor:  # (R,) output error of each row with scales s
            e = wp - (d * s[..., None]).reshape(len(s), kp)
            return ((e @ H) * e).sum(-1)

        ok = (torch.isfinite(fit) & (fit > 0)).all(-1) & (error(fit) < error(best[r]))
        best[r] = torch.where(ok[:, None], fit, best[r])
    return NBitsWeight(q.codes, best.numpy(), q.zeros, q.bits, q.block_size, q.in_features, q.accuracy_level)
