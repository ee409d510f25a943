"""The figures of a test record: one list that the CSV, the markdown tables and --compare all read.

As in llama-bench, a test record has a list of named fields and every printer is a view of
it: the CSV prints the fields that have a CSV format, in this order, under their names; the
markdown tables (formats.py) are templates over the names; --compare divides the fields that
have a compare header. The JSON report is the record itself (report.py), not a view.

A figure is None when the system did not expose it: the CSV leaves it empty and a table
cell that needs it says "n/a", never 0.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

from edgekit.device.bench.report import BenchReport, TestResult
from edgekit.device.bundle import Quantization, from_record


@dataclass(frozen=True)
class Field:
    """One figure of a test: its name, where to read it, and how each view shows it."""

    name: str  # its CSV column (llama-bench's name where it has one) and its name in templates
    get: Callable[[BenchReport, TestResult], object]  # the figure, None when not available
    csv: str | None = None  # how the CSV writes it (str.format); None: not a CSV column
    compare: str | None = None  # its column in --compare, B / A; None: not compared
    higher_is_better: bool = False  # for --compare's legend


def _quantization(rep: BenchReport) -> str:
    return from_record(Quantization, rep.bundle.quantization).label


def _sensor(reading, stat: str):
    return None if reading is None else getattr(reading, stat)


FIELDS: tuple[Field, ...] = (
    Field("bundle", lambda rep, r: rep.bundle.name, "{}"),
    Field("bundle_hash", lambda rep, r: rep.bundle.hash, "{}"),
    Field("quant", lambda rep, r: rep.bundle.quantization.get("method", "none"), "{}"),
    Field("provider", lambda rep, r: rep.settings.execution_provider, "{}"),
    Field("threads", lambda rep, r: r.threads_label, "{}"),
    Field("n_prompt", lambda rep, r: r.prompt_tokens, "{}"),
    Field("n_gen", lambda rep, r: r.new_tokens, "{}"),
    Field("runs", lambda rep, r: r.runs, "{}"),
    Field("load_s", lambda rep, r: r.load_s, "{:.4f}", "load s"),
    Field("pp_avg_ts", lambda rep, r: r.prefill_tps.mean, "{:.3f}"),
    Field("pp_stddev_ts", lambda rep, r: r.prefill_tps.sd, "{:.3f}"),
    Field("tg_avg_ts", lambda rep, r: r.decode_tps.mean, "{:.3f}"),
    Field("tg_stddev_ts", lambda rep, r: r.decode_tps.sd, "{:.3f}"),
    Field("ttft_ms_median", lambda rep, r: r.ttft_ms.median, "{:.3f}", "ttft ms"),
    Field("ttft_ms_min", lambda rep, r: r.ttft_ms.min, "{:.3f}"),
    Field("ttft_ms_max", lambda rep, r: r.ttft_ms.max, "{:.3f}"),
    # medians, not in the CSV (which keeps llama-bench's mean ± sd for tokens/s): the tables and --compare
    Field("pp_median_ts", lambda rep, r: r.prefill_tps.median, compare="prefill tok/s", higher_is_better=True),
    Field("tg_median_ts", lambda rep, r: r.decode_tps.median, compare="decode tok/s", higher_is_better=True),
    Field("itl_ms_p50", lambda rep, r: r.itl_ms.p50, "{:.3f}", "itl p50 ms"),
    Field("itl_ms_p90", lambda rep, r: r.itl_ms.p90, "{:.3f}"),
    Field("itl_ms_p99", lambda rep, r: r.itl_ms.p99, "{:.3f}", "itl p99 ms"),
    Field("tokenize_ms", lambda rep, r: r.tokenize_ms.median, "{:.4f}"),
    Field("sample_ms", lambda rep, r: r.sample_ms.median, "{:.4f}"),
    Field("detokenize_ms", lambda rep, r: r.detokenize_ms.median, "{:.4f}"),
    Field("peak_rss_mb", lambda rep, r: r.peak_rss_mb, "{:.1f}", "peak RSS MB"),
    Field("cpu_temp_c_max", lambda rep, r: _sensor(r.cpu.temperature_c, "max"), "{:.1f}"),
    Field("cpu_freq_mhz_min", lambda rep, r: _sensor(r.cpu.frequency_mhz, "min"), "{:.0f}"),
    # not in the CSV either: the markdown tables only
    Field("cpu_temp_c_min", lambda rep, r: _sensor(r.cpu.temperature_c, "min")),
    Field("cpu_freq_mhz_max", lambda rep, r: _sensor(r.cpu.frequency_mhz, "max")),
    Field("model_type", lambda rep, r: rep.bundle.model_type),
    Field("size_mb", lambda rep, r: rep.bundle.size_mb),
    Field("quantization", lambda rep, r: _quantization(rep)),  # Quantization.label: "rtn int4 g32"
    Field("backend", lambda rep, r: rep.settings.execution_provider.removesuffix("ExecutionProvider")),
)

COMPARED: tuple[Field, ...] = tuple(f for f in FIELDS if f.compare)


def figures(report: BenchReport, result: TestResult) -> dict[str, object]:
    """Every field of `result` by name (report-wide ones, such as the bundle, from `report`)."""
    return {f.name: f.get(report, result) for f in FIELDS}


def fill(template: str, values: dict[str, object]) -> str:
    """`template` (str.format over field names) filled from `values`; "n/a" when a figure it needs is None."""
    needed = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if any(values[name] is None for name in needed):
        return "n/a"
    return template.format_map(values)
