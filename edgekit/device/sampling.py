"""Choosing the next token from a row of logits, in numpy.

Follows transformers' logits processors so that the same settings give the same
distribution: repetition penalty, then temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter
    repetition_penalty: float = 1.0  # 1.0 means none
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: shrink the logits of tokens already seen."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def distribution(logits: np.ndarray, cfg: SamplingConfig, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidate token ids and their probabilities after penalty, temperature, top-k and top-p."""
    assert cfg.temperature > 0, "greedy decoding has no distribution"
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, cfg.repetition_penalty)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        # keep the smallest head of the sorted distribution whose mass reaches top_p
        cut = int(np.searchsorted(np.cumsum(probs), cfg.top_p)) + 1
        probs = probs[:cut] / probs[:cut].sum()
        order = order[:cut]
    keep = probs > 0
    return order[keep], probs[keep]


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, seen: np.ndarray) -> int:
    """Pick one token id from `logits` (vocab,) given the ids `seen` so far."""
    if cfg.temperature == 0.0:
        return int(np.argmax(apply_repetition_penalty(logits, seen, cfg.repetition_penalty)))
    ids, probs = distribution(logits, cfg, seen)
    return int(ids[rng.choice(len(probs), p=probs)])
