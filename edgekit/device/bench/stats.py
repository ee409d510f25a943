"""Statistics of a benchmark's runs: llama-bench's mean ± sd, plus the median, range and percentiles."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np


@dataclass
class Summary:
    """One metric over the counted runs."""

    median: float
    mean: float
    sd: float  # sample standard deviation (n - 1), as llama-bench; 0 for a single run
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        """The summary of `values`; ValueError when there are none."""
        if not values:
            raise ValueError("no values to summarize")
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.median(values), statistics.fmean(values), sd, min(values), max(values), len(values))


@dataclass
class Percentiles:
    """The 50th, 90th and 99th percentiles of a latency over every token of every run."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        """Linear interpolation between the nearest values (numpy's default)."""
        arr = np.asarray(values, dtype=np.float64)
        return cls(*(float(np.percentile(arr, q)) for q in (50, 90, 99)))
