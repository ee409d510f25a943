"""What `edgekit bench` prints: llama-bench's markdown tables and CSV, views of fields.FIELDS.

A markdown column is a header and a template over field names (str.format): a cell can
show several figures, such as a median with its range.
"""

from __future__ import annotations

from edgekit.device.bench.fields import FIELDS, figures, fill
from edgekit.device.bench.report import BenchReport, as_report
from edgekit.device.table import format_table

# llama-bench's table: two rows per test, the prompt (pp) and the generation after it (tg)
TESTS_COLUMNS = {"model": "{model_type}", "size": "{size_mb:.0f} MiB", "quant": "{quantization}",
                 "backend": "{backend}", "threads": "{threads}"}
PP_COLUMNS = {"test": "pp{n_prompt}", "t/s": "{pp_avg_ts:.2f} ± {pp_stddev_ts:.2f}"}
TG_COLUMNS = {"test": "tg{n_gen} @ d{n_prompt}", "t/s": "{tg_avg_ts:.2f} ± {tg_stddev_ts:.2f}"}

# one row per test: what a user waits for, with the spread over runs
LATENCY_COLUMNS = {
    "threads": "{threads}",
    "prompt": "{n_prompt}",
    "load s": "{load_s:.2f}",
    "ttft ms (min-max)": "{ttft_ms_median:.1f} ({ttft_ms_min:.1f}-{ttft_ms_max:.1f})",
    "prefill tok/s": "{pp_median_ts:.1f}",
    "decode tok/s": "{tg_median_ts:.1f}",
    "itl p50/p90/p99 ms": "{itl_ms_p50:.1f}/{itl_ms_p90:.1f}/{itl_ms_p99:.1f}",
    "tok/sample/detok ms": "{tokenize_ms:.2f}/{sample_ms:.2f}/{detokenize_ms:.2f}",
    "peak RSS MB": "{peak_rss_mb:.0f}",
    "temp °C": "{cpu_temp_c_min:.0f}-{cpu_temp_c_max:.0f}",
    "freq MHz": "{cpu_freq_mhz_min:.0f}-{cpu_freq_mhz_max:.0f}",
}


def _row(columns: dict[str, str], values: dict[str, object]) -> dict[str, str]:
    return {header: fill(template, values) for header, template in columns.items()}


def tests_rows(report: BenchReport | dict) -> list[dict[str, str]]:
    """llama-bench's rows: one `pp P` and one `tg N @ dP` per result, tokens/s as mean ± sd."""
    rep = as_report(report)
    rows = []
    for r in rep.results:
        values = figures(rep, r)
        rows.append(_row({**TESTS_COLUMNS, **PP_COLUMNS}, values))
        rows.append(_row({**TESTS_COLUMNS, **TG_COLUMNS}, values))
    return rows


def latency_rows(report: BenchReport | dict) -> list[dict[str, str]]:
    """One row per result: what a user waits for, with the spread over runs."""
    rep = as_report(report)
    return [_row(LATENCY_COLUMNS, figures(rep, r)) for r in rep.results]


def _markdown(rows: list[dict[str, str]]) -> str:
    return format_table(list(rows[0]), rows, "md") if rows else ""


def format_markdown(report: BenchReport | dict) -> str:
    """The terminal/markdown view of a report: llama-bench's pp/tg table, then latencies, then notes on
    figures this system could not give."""
    rep = as_report(report)
    m = rep.machine
    head = (f"{rep.subject}, {m.get('logical_cores')} cores, onnxruntime {m.get('onnxruntime')}, "
            f"{rep.settings.runs} runs after {rep.settings.warmup} warm-up"
            + (f", {rep.settings.background_load} busy process(es) alongside" if rep.settings.background_load else ""))
    notes = []
    if all(r.cpu.temperature_c is None for r in rep.results):
        notes.append("CPU temperature: not available on this system")
    if all(r.cpu.frequency_mhz is None for r in rep.results):
        notes.append("CPU frequency: not available on this system")
    if any(r.peak_rss_scope == "process" for r in rep.results):
        notes.append("peak RSS is the process's since start (the per-test counter could not be reset)")
    parts = [head, "", _markdown(tests_rows(rep)), "", _markdown(latency_rows(rep))]
    if notes:
        parts += [""] + [f"note: {n}" for n in notes]
    return "\n".join(parts)


def format_csv(report: BenchReport | dict) -> str:
    """One CSV row per (threads, prompt length), llama-bench's avg_ts/stddev_ts names where they exist;
    a figure that is not available is an empty cell. Ends with a newline."""
    rep = as_report(report)
    columns = [(f.name, f.csv) for f in FIELDS if f.csv is not None]
    rows = []
    for r in rep.results:
        values = figures(rep, r)
        rows.append(["" if values[name] is None else csv.format(values[name]) for name, csv in columns])
    return format_table([name for name, _ in columns], rows, "csv") + "\n"
