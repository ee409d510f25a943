"""Choosing the next token from a row of logits, in numpy.

Follows transformers' logits processors so that the same settings give the same
distribution: repetition penalty, then temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import NoReturn

import numpy as np

# The accepted values of each setting, in one place: the CLI, the Python API and MQTT requests all
# meet them here. Logits are float32: a temperature or a penalty far from 1 scales them past
# float32's range (inf - inf gives NaN probabilities), so both stay within a factor of 100 of 1.
TEMPERATURE_RANGE = (0.01, 100.0)  # or exactly 0: greedy
REPETITION_PENALTY_RANGE = (0.01, 100.0)
ALLOWED = {
    "temperature": f"0 (greedy) or a number from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}",
    "top_k": "an integer >= 0 (0: no top-k filter)",
    "top_p": "a number in (0, 1] (1: no nucleus filter)",
    "repetition_penalty": f"a number from {REPETITION_PENALTY_RANGE[0]:g} to {REPETITION_PENALTY_RANGE[1]:g} "
                          "(1: none)",
    "seed": "an integer >= 0, or None",
}


@dataclass
class SamplingConfig:
    """How the next token is chosen.

    Raises ValueError (one line: the setting, what it allows, what it got) for a value of the
    wrong type (a bool is not a number here) or outside ALLOWED, NaN and infinities included.
    """

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter
    repetition_penalty: float = 1.0  # 1.0 means none
    seed: int | None = None

    def __post_init__(self) -> None:
        t = _real("temperature", self.temperature)
        if t != 0 and not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:  # NaN fails every comparison
            _refuse("temperature", self.temperature)
        if _integer("top_k", self.top_k) < 0:
            _refuse("top_k", self.top_k)
        if not 0.0 < _real("top_p", self.top_p) <= 1.0:
            _refuse("top_p", self.top_p)
        if not REPETITION_PENALTY_RANGE[0] <= _real("repetition_penalty", self.repetition_penalty) \
                <= REPETITION_PENALTY_RANGE[1]:
            _refuse("repetition_penalty", self.repetition_penalty)
        if self.seed is not None and _integer("seed", self.seed) < 0:
            _refuse("seed", self.seed)


def _real(name: str, value) -> float:
    # True is an int to Python, but never a temperature; an int too large for a float is refused too
    if isinstance(value, bool) or not isinstance(value, Real):
        _refuse(name, value)
    try:
        return float(value)
    except OverflowError:
        _refuse(name, value)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        _refuse(name, value)
    return int(value)


def _refuse(name: str, value) -> NoReturn:
    raise ValueError(f"{name} must be {ALLOWED[name]}, got {_show(value)}")


def _show(value) -> str:
    """A short rendering of a refused value (a huge int has no cheap repr)."""
    if isinstance(value, Integral) and not isinstance(value, bool) and abs(int(value)) >= 10**30:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
