"""Benchmark reports on disk and what is printed from them; the table printer; what compare_peers shares.

tests/data/bench/report-format1.json was written by `edgekit bench` before the report became
typed records (REPORT_FORMAT 1, tiny random Llama, threads 1 and default; the first test's
CPU sensors and the last test's peak RSS edited in to what a Raspberry Pi without
/proc/self/clear_refs reports). The .md, .csv and compare files next to it are what that
edgekit printed for it: users' old reports must load, compare and print the same.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.device import bench, sysinfo
from edgekit.device.table import format_table

DATA = Path(__file__).parent / "data" / "bench"
OLD = DATA / "report-format1.json"
ROOT = Path(__file__).resolve().parent.parent


def test_a_report_written_before_typed_records_loads_and_prints_as_it_did():
    report = bench.read_report(OLD)
    assert isinstance(report, bench.BenchReport) and report.report_format == bench.REPORT_FORMAT == 1
    assert report.results[0].cpu.temperature_c.max == 58.9 and report.results[3].peak_rss_mb is None
    # the JSON form round-trips, with the fields added since at their defaults
    old = json.loads(OLD.read_text())
    assert report.to_dict() == {**old, "settings": {**old["settings"], "background_load": 0},
                                "results": [{**r, "threads_run": None} for r in old["results"]]}
    assert bench.format_markdown(report) + "\n" == (DATA / "report-format1.md").read_text()
    assert bench.format_csv(report) == (DATA / "report-format1.csv").read_text()
    # the printers take the JSON form too (what run_benchmark returns)
    assert bench.format_csv(json.loads(OLD.read_text())) == (DATA / "report-format1.csv").read_text()


def test_two_old_reports_compare_as_they_did(tmp_path):
    a = json.loads(OLD.read_text())
    b = copy.deepcopy(a)
    for r in b["results"]:
        r["decode_tps"]["median"] *= 2
        r["ttft_ms"]["median"] /= 4
    b["results"] = b["results"][1:]  # B ran one test fewer: only the shared ones are compared
    assert bench.format_compare(a, b, "a.json", "b.json") + "\n" == (DATA / "compare-format1.md").read_text()

    r = subprocess.run([sys.executable, "-m", "edgekit", "bench", "--compare", str(OLD), str(OLD)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "1.00x" in table[2]


def test_an_incomplete_report_is_one_line_naming_what_is_missing(tmp_path):
    data = json.loads(OLD.read_text())
    del data["results"][0]["itl_ms"]
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(data))
    with pytest.raises(bench.BenchError, match="incomplete `edgekit bench` report.*itl_ms"):
        bench.read_report(path)


def test_table_styles():
    rows = [("llama", "16 MiB", "26272.81"), {"model": "qwen2", "size": "1 MiB", "t/s": "5.0"}]
    columns = ("model", "size", "t/s")
    assert format_table(columns, rows).splitlines() == [
        "| model | size   | t/s      |",
        "| ----- | ------ | -------- |",
        "| llama | 16 MiB | 26272.81 |",
        "| qwen2 |  1 MiB |      5.0 |",
    ]
    assert format_table(columns, rows, "csv") == "model,size,t/s\nllama,16 MiB,26272.81\nqwen2,1 MiB,5.0"
    assert format_table(columns, rows, "text", align="<>>").splitlines() == [
        "model  size    t/s",
        "llama  16 MiB  26272.81",
        "qwen2   1 MiB       5.0",
    ]
    assert format_table(columns, [], "md").count("\n") == 1  # header and rule
    with pytest.raises(ValueError, match="3 cells"):
        format_table(columns, [("a", "b")])


def _compare_peers():
    spec = importlib.util.spec_from_file_location("compare_peers", ROOT / "benchmarks" / "compare_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_peers_summarizes_with_edgekits_statistics():
    peers = _compare_peers()
    runs = [{"prefill_s": 0.5, "ttft_s": 0.6, "steps": [0.01, 0.02, 0.03, 0.04]},
            {"prefill_s": 0.25, "ttft_s": 0.3, "steps": [0.025, 0.025, 0.025, 0.025]}]
    s = peers.summarize("edgekit-fp32", "bundle", 1.5, runs, prompt=100, new=4, rss=None)
    assert s["ttft_ms"] == pytest.approx(450.0) and s["prefill_tps"] == pytest.approx(300.0)
    assert s["decode_tps"] == pytest.approx(40.0) and s["decode_tps_sd"] == pytest.approx(0.0)
    assert list(s["itl_ms"]) == ["p50", "p90", "p99"] and s["itl_ms"]["p50"] == pytest.approx(25.0)
    assert s["peak_rss_mb"] is None


def test_compare_peers_help_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_peers.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--peers" in r.stdout


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_peak_rss_of_another_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; x = bytearray(80 * 2**20); print(1, flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()  # it holds its 80 MB now
        assert sysinfo.peak_rss_mb(child.pid) > 80
    finally:
        child.communicate("", timeout=30)
    assert sysinfo.peak_rss_mb(child.pid) is None  # gone with the process
