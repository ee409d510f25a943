"""Perplexity of a bundle on a text, computed by the device runtime itself.

The text is tokenized with the bundle's tokenizer and cut into non-overlapping windows
of `window` tokens (the last, shorter one kept when it has at least two tokens). Each
window runs from an empty cache in one Model.forward with all logits, and every token
but the window's first is scored:

    ppl = exp( sum over windows, positions t >= 1 of -log p(x_t | x_<t in its window) / scored tokens )

Non-overlapping windows are what transformers' `loss` computes on the same windows, so
the two can be compared exactly; the first tokens of each window see little context,
which makes the number a little higher than a sliding-window evaluation would give.
What is measured is the bundle as the device runs it: its integer kernels, its graph.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.device.generate import Model
from edgekit.errors import InputError

DEFAULT_WINDOW = 512


class EvalTextError(InputError):
    """The evaluation text cannot be used (missing, or too short)."""


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored tokens
    windows: int
    window: int
    seconds: float


def read_eval_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EvalTextError(f"--text {path}: no such file")
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EvalTextError(f"--text {path}: cannot read it ({e.strerror})") from None


def windows_of(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` tokens (the last may be shorter, >= 2)."""
    ids = ids[:max_tokens] if max_tokens else ids
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[targets] per row, in float64: logits (T, V), targets (T,)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model: Model, text: str, window: int | None = None, max_tokens: int | None = None) -> Perplexity:
    """Perplexity of `model` on `text` over non-overlapping `window`-token windows
    (default: DEFAULT_WINDOW, or the bundle's whole context when that is shorter)."""
    room = model.context_length - model.prefix_length
    if window is None:
        window = min(DEFAULT_WINDOW, room)
    if window < 2:
        raise EvalTextError("--window must be at least 2")
    if window > room:
        raise EvalTextError(f"window {window} exceeds the bundle's context length ({room}); use a smaller --window")
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    chunks = windows_of(ids, window, max_tokens)
    if not chunks:
        raise EvalTextError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    t = time.perf_counter()
    total, count = 0.0, 0
    for chunk in chunks:
        logits = model.forward(chunk, 0, all_logits=True)  # (len, vocab)
        nll = log_softmax_nll(logits[:-1], np.asarray(chunk[1:]))
        total += float(nll.sum())
        count += len(nll)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(chunks), window, time.perf_counter() - t)
