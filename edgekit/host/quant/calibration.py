"""Calibration data: N samples of L tokens, drawn reproducibly from a text.

The text is `--calib` (a .txt file, or a .jsonl with one {"text": ...} per line), or by
default the English prose that ships inside every CPython: the documentation topics of
`pydoc_data.topics` (the text of `help("if")`, `help("with")`, ...; about 110k SmolLM2
tokens). It is offline on every installation, English, and not the evaluation text.

The tokenized text is cut into consecutive L-token windows and N of them are drawn
without replacement with numpy's generator seeded by `seed`, so the same seed draws the
same samples on every machine.

With `mix_default` (GPTQ, AWQ and int4-best: the methods' `mixed_calibration`), a --calib
text gives N samples and the default text N more: calibrated on one narrow document alone,
GPTQ fits that domain's activations; SmolLM2-135M int4 g32 then lands at +11.7% of fp32
perplexity on the bash manual page (fake-quantized research run), against +8.3% with the mix
(device bundle, benchmarks/quantization/README.md). The default text adds samples rather
than taking half of N: with N = 32, GPTQ g128's perplexity on the GNU licence went from 27.63
(16 + 16) to 26.81 (32 + 32), for calibration passes over twice the samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekit.errors import ExportError

DEFAULT_SOURCE = "pydoc_data.topics (CPython's bundled documentation)"


@dataclass
class Calibration:
    ids: torch.Tensor  # int64 (N, L)
    source: str
    sha256: str  # of the text the samples were drawn from
    seed: int

    def record(self) -> dict:
        n, seq_len = self.ids.shape
        return {"source": self.source, "sha256": self.sha256, "samples": n, "seq_len": seq_len, "seed": self.seed}


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calib_file(path: str | Path) -> Path:
    """`path` as a Path; ExportError in the flag's words when it is not a file (export checks
    this before it loads the model)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--calib {path}: no such file")
    return path


def read_text(path: str | Path) -> str:
    """The text of a .txt file, or the texts of a .jsonl file joined by blank lines."""
    path = calib_file(path)
    raw = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.split("\n"), 1):  # JSON Lines: "\n" only (splitlines() splits at U+2028 too)
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"--calib {path}: line {n} is not JSON ({e.msg}); "
                              f"expected {{\"text\": ...}} per line") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ExportError(f"--calib {path}: line {n} has no \"text\" string; expected {{\"text\": ...}} per line")
        texts.append(text)
    return "\n\n".join(texts)


def calibration_ids(tokenizer, calib: str | Path | None, samples: int, seq_len: int, seed: int,
                    mix_default: bool = False) -> Calibration:
    """N = `samples` windows of L = `seq_len` tokens from `calib` (or the default text); with
    `mix_default` and a `calib`, N from `calib` and then N more from the default text (2N in all)."""
    if samples < 1 or seq_len < 2:
        raise ExportError(f"calibration needs at least 1 sample of 2 tokens (got {samples} x {seq_len})")
    if calib is None or not mix_default:
        text = default_text() if calib is None else read_text(calib)
        source = DEFAULT_SOURCE if calib is None else str(calib)
        return Calibration(_windows(tokenizer, text, source, samples, seq_len, seed), source,
                           hashlib.sha256(text.encode()).hexdigest(), seed)
    own, general = read_text(calib), default_text()
    ids = torch.cat([_windows(tokenizer, own, str(calib), samples, seq_len, seed),
                     _windows(tokenizer, general, DEFAULT_SOURCE, samples, seq_len, seed)])  # (2N, L)
    digest = hashlib.sha256(own.encode() + b"\0" + general.encode()).hexdigest()
    return Calibration(ids, f"{calib} + {DEFAULT_SOURCE}, {samples} each", digest, seed)


def default_text_rows(rows: int, calib: str | Path | None, mix_default: bool) -> slice | None:
    """Which of calibration_ids' `rows` samples come from the default text: all without a --calib,
    the last half when it is mixed in beside one (`mix_default`), None when none do."""
    if calib is None:
        return slice(0, rows)
    return slice(rows // 2, rows) if mix_default else None


_ENCODED: dict[tuple[str, str], np.ndarray] = {}  # (tokenizer sha256, text sha256) -> its ids, the last few


def token_ids(tokenizer, text: str) -> np.ndarray:
    """The text's token ids (int64, read-only), no special tokens. The last few (tokenizer, text) pairs
    are remembered: exports in one process (several targets, a benchmark's rows) tokenize the same
    default text each time, 0.6 s for SmolLM2's tokenizer, where hashing both takes 0.02 s."""
    backend = tokenizer.backend_tokenizer  # the fast tokenizer's own: no warning about the length
    key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest())
    if key not in _ENCODED:
        if len(_ENCODED) >= 4:
            del _ENCODED[next(iter(_ENCODED))]  # the oldest
        ids = np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        ids.flags.writeable = False
        _ENCODED[key] = ids
    return _ENCODED[key]


def _windows(tokenizer, text: str, source: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` of the text's consecutive `seq_len`-token windows, drawn by `seed`: (N, L) int64."""
    ids = token_ids(tokenizer, text)
    windows = len(ids) // seq_len
    if windows < samples:
        # the default text is drawn from beside --calib too (mix_default): a longer --calib cannot help it
        longer = "" if source == DEFAULT_SOURCE else "give a longer --calib, or "
        raise ExportError(
            f"calibration text {source} has {len(ids)} tokens, too short for {samples} samples x {seq_len} tokens; "
            f"{longer}use fewer --calib-samples or a shorter --calib-seq-len (at most {windows} samples of {seq_len})")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(windows, size=samples, replace=False))
    return torch.from_numpy(ids[: windows * seq_len].reshape(windows, seq_len)[chosen].copy())  # (N, L)
