"""On-device benchmark of a bundle, llama-bench style; one module per job:

    measure.py   timing: run_once (one run), run_test (one test), run_benchmark (the sweep)
    stats.py     Summary (median, mean ± sd, range) and Percentiles of the runs
    report.py    the typed records (BenchReport, TestResult), their JSON form, write_report, read_report
    fields.py    the list of a test record's figures that every printer reads
    formats.py   the markdown tables and the CSV
    compare.py   --compare: ratios B / A between two reports
    plot.py      the PNG

`edgekit bench` (edgekit/cli/bench.py) parses the command line and prints what these return.
"""

from edgekit.device.bench.compare import compare, format_compare
from edgekit.device.bench.formats import format_csv, format_markdown, latency_rows, tests_rows
from edgekit.device.bench.measure import PROMPT_TEXT, BenchOptions, prompt_ids, run_benchmark, run_once, run_test
from edgekit.device.bench.plot import PlotUnavailable, plot_report
from edgekit.device.bench.report import (
    REPORT_FORMAT,
    BenchError,
    BenchReport,
    TestResult,
    as_report,
    read_report,
    write_report,
)
from edgekit.device.bench.stats import Percentiles, Summary

__all__ = [
    "PROMPT_TEXT", "REPORT_FORMAT", "BenchError", "BenchOptions", "BenchReport", "Percentiles", "PlotUnavailable",
    "Summary", "TestResult", "as_report", "compare", "format_compare", "format_csv", "format_markdown",
    "latency_rows", "plot_report", "prompt_ids", "read_report", "run_benchmark", "run_once", "run_test", "tests_rows",
    "write_report",
]
