"""Choosing the next token from a row of logits, in numpy.

Follows transformers' logits processors (and OpenAI's penalties) so that the same settings
give the same distribution, in this order:

    repetition penalty ──► presence and frequency penalties ──► logit bias      (then greedy: argmax)
    ──► temperature ──► top-k ──► top-p ──► min-p ──► draw
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import NoReturn

import numpy as np

from edgekit.errors import InputError

# The accepted values of each setting, in one place: the CLI, the Python API and MQTT requests all
# meet them here. Logits are float32: a temperature or a penalty far from 1 scales them past
# float32's range (inf - inf gives NaN probabilities). A temperature of 1e-4 scales logits of
# hundreds to millions, far inside it ("almost greedy", as transformers takes it); a penalty
# stays within a factor of 100 of 1.
TEMPERATURE_RANGE = (1e-4, 100.0)  # or exactly 0: greedy
REPETITION_PENALTY_RANGE = (0.01, 100.0)
ALLOWED = {
    "temperature": f"0 (greedy) or a number from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}",
    "top_k": "an integer >= 0 (0: no top-k filter)",
    "top_p": "a number in (0, 1] (1: no nucleus filter)",
    "repetition_penalty": f"a number from {REPETITION_PENALTY_RANGE[0]:g} to {REPETITION_PENALTY_RANGE[1]:g} "
                          "(1: none)",
    "seed": "an integer >= 0, or None",
    "min_p": "a number in [0, 1] (0: no min-p filter)",
    "presence_penalty": "a number from -2 to 2 (0: none)",
    "frequency_penalty": "a number from -2 to 2 (0: none)",
    "logit_bias": "a mapping of token ids (integers >= 0) to numbers from -100 to 100",
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
    min_p: float = 0.0  # keep tokens at least min_p x the top token's probability; 0 means none
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token was generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans, 100 forces)

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
        if not 0.0 <= _real("min_p", self.min_p) <= 1.0:
            _refuse("min_p", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= _real(name, getattr(self, name)) <= 2.0:
                _refuse(name, getattr(self, name))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                _refuse("logit_bias", self.logit_bias)
            for token, bias in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, Integral) or token < 0 \
                        or not -100.0 <= _real("logit_bias", bias) <= 100.0:
                    _refuse("logit_bias", {token: bias})


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
    raise InputError(f"{name} must be {ALLOWED[name]}, got {show_value(value)}")


def show_value(value) -> str:
    """A short rendering of a refused value for an error line (a huge int has no cheap repr: Python
    refuses to print one of over 4300 digits)."""
    if isinstance(value, Integral) and not isinstance(value, bool) and abs(int(value)) >= 10**30:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_unicode(text: str) -> bool:
    """False for a str holding lone surrogates (what Python makes of invalid UTF-8 in argv, and of a
    JSON "\\udcxx" escape): no tokenizer, grammar or MQTT message can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: shrink the logits of tokens already seen."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def adjust(logits: np.ndarray, cfg: SamplingConfig, seen: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """The logits after the penalties and the bias: `seen` are the prompt's and the answer's ids
    (repetition penalty), `generated` the answer's alone (presence and frequency, as OpenAI counts)."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and generated.size:
        ids, counts = np.unique(generated, return_counts=True)
        logits = logits.copy()
        logits[ids] -= cfg.presence_penalty + cfg.frequency_penalty * counts
    if cfg.logit_bias:
        ids = np.fromiter(cfg.logit_bias, np.int64)  # within the vocabulary: Model.stream checked
        logits = logits.copy()
        logits[ids] += np.fromiter(cfg.logit_bias.values(), np.float32)
    return logits


def distribution(logits: np.ndarray, cfg: SamplingConfig, seen: np.ndarray,
                 generated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The candidate token ids and their probabilities after the penalties, temperature, top-k,
    top-p and min-p."""
    assert cfg.temperature > 0, "greedy decoding has no distribution"
    logits = adjust(logits, cfg, seen, np.empty(0, np.int64) if generated is None else generated)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    exp = np.exp(logits - logits.max())  # (vocab,)
    order = _descending(logits, exp, cfg.top_p)
    probs = exp[order] / exp.sum()
    if cfg.top_p < 1.0:
        # keep the smallest head of the sorted distribution whose mass reaches top_p
        cut = int(np.searchsorted(np.cumsum(probs), cfg.top_p)) + 1
        probs = probs[:cut] / probs[:cut].sum()
        order = order[:cut]
    if cfg.min_p > 0.0:  # relative to the top token's probability (transformers' MinPLogitsWarper)
        cut = int(np.searchsorted(-probs, -cfg.min_p * probs[0], side="right"))
        probs = probs[:cut] / probs[:cut].sum()
        order = order[:cut]
    keep = probs > 0
    return order[keep], probs[keep]


def _descending(logits: np.ndarray, exp: np.ndarray, mass: float, head: int = 64) -> np.ndarray:
    """Ids of the tokens with exp > 0 by decreasing logit (equal logits by id, as a stable sort),
    at least as many as hold `mass` of the probability (exp / exp.sum()); all of them when mass is 1.

    A full sort of a 49k vocabulary takes 3 ms, most of a small model's decode step; top-p of a
    peaked distribution (or what top-k left) needs a few dozen ids, found by partition.
    """
    ids = np.flatnonzero(exp > 0)  # ascending; after top-k, k of them
    n, need = len(logits), mass * exp.sum()
    while mass < 1.0 and head < len(ids):
        kth = np.partition(logits, n - head)[n - head]  # the head-th largest logit
        top = np.flatnonzero(logits >= kth)  # ties with it included
        top = top[np.argsort(-logits[top], kind="stable")]
        if np.cumsum(exp[top])[-1] >= need:
            return top
        head *= 8
    return ids[np.argsort(-logits[ids], kind="stable")]


def plain_greedy(cfg: SamplingConfig) -> bool:
    """True when sample() is the argmax of the logits alone: greedy, no penalty, no bias."""
    return (cfg.temperature == 0.0 and cfg.repetition_penalty == 1.0 and not cfg.presence_penalty
            and not cfg.frequency_penalty and not cfg.logit_bias)


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, seen: np.ndarray,
           generated: np.ndarray | None = None) -> int:
    """Pick one token id from `logits` (vocab,) given the ids `seen` so far (the prompt's and the
    answer's) and `generated` (the answer's alone)."""
    generated = np.empty(0, np.int64) if generated is None else generated
    if cfg.temperature == 0.0:
        return int(np.argmax(adjust(logits, cfg, seen, generated)))
    ids, probs = distribution(logits, cfg, seen, generated)
    return int(ids[rng.choice(len(probs), p=probs)])


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its `n` most likely tokens with theirs (before any
    sampling setting: what the model itself thinks)."""
    z = logits.astype(np.float64)
    finite = np.isfinite(z)
    top = z[finite].max()
    logp = z - top - np.log(np.exp(z[finite] - top).sum())
    best = np.argpartition(-logp, n)[:n] if 0 < n < len(logp) else np.arange(len(logp))[:n]
    best = best[np.argsort(-logp[best], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]
