"""`edgekit bench` as a user runs it on a device: tables, reports, plots, operator profiles, comparisons.

Everything runs on the tiny random Llama bundle; no test asserts a speed, only that the
figures exist, are consistent with each other, and read the way llama-bench's do.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import multiprocessing
import subprocess
import sys

import onnxruntime as ort
import pytest

from edgekit.device import bench, sysinfo
from edgekit.device.bundle import bundle_hash, read_manifest
from edgekit.device.op_profile import profile_ops


def edgekit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


# `edgekit bench` runs on devices without torch: run it where torch and the host side cannot be imported
WITHOUT_TORCH = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers") or name.startswith("edgekit.host"):
            raise ImportError(f"{name} is blocked: the device side must not import it")

sys.meta_path.insert(0, Block())
from edgekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def edgekit_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report(tiny_bundle) -> dict:
    """A small sweep, two prompt lengths, run in-process."""
    options = bench.BenchOptions(prompt_tokens=[8, 24], new_tokens=6, runs=2, warmup=1, threads=[1])
    return bench.run_benchmark(tiny_bundle, options)


def test_bench_prints_llama_bench_table_and_writes_json_report_and_plot(tiny_bundle, tmp_path):
    r = edgekit_without_torch("bench", tiny_bundle, "--prompt-tokens", "8,16", "--new-tokens", "4", "--runs", "2",
                "--threads", "1", "--report", tmp_path)
    assert r.returncode == 0, r.stderr
    for row in ("pp8", "tg4 @ d8", "pp16", "tg4 @ d16"):
        assert f"| {row} |" in r.stdout.replace("  ", " ") or row in r.stdout
    assert "ttft ms" in r.stdout and "itl p50/p90/p99 ms" in r.stdout

    (path,) = tmp_path.glob("bench-*.json")
    report = json.loads(path.read_text())
    assert report["bundle"]["hash"] == bundle_hash(read_manifest(tiny_bundle))
    assert report["settings"]["execution_provider"] == "CPUExecutionProvider"
    assert [(x["threads"], x["prompt_tokens"], x["new_tokens"]) for x in report["results"]] == [(1, 8, 4), (1, 16, 4)]

    if importlib.util.find_spec("matplotlib"):
        assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "pip install matplotlib" in r.stderr


def test_report_describes_the_machine(report):
    m = report["machine"]
    assert m["onnxruntime"] == ort.__version__
    assert m["logical_cores"] >= 1 and m["ram_mb"] > 0
    assert m["cpu_model"] and m["arch"]
    assert isinstance(m["isa_flags"], list)
    assert "CPUExecutionProvider" in m["onnxruntime_providers"]


def test_figures_are_consistent(report):
    for r in report["results"]:
        assert r["load_s"] > 0 and r["runs"] == 2 and r["warmup"] == 1
        for name in ("ttft_ms", "prefill_tps", "decode_tps", "tokenize_ms", "sample_ms"):
            s = r[name]
            assert 0 < s["min"] <= s["median"] <= s["max"] and s["n"] == 2, name
        assert 0 < r["itl_ms"]["p50"] <= r["itl_ms"]["p90"] <= r["itl_ms"]["p99"]
        # the caller's inter-token latency includes the model step, so it is never below it
        assert r["itl_ms"]["p50"] >= r["step_ms"]["p50"] * 0.9
        assert len(r["token_latency_ms"]) == r["new_tokens"]
        assert r["peak_rss_mb"] > 10  # onnxruntime alone is more
        # not-available sensors are None, never zero
        for sensor in ("temperature_c", "frequency_mhz"):
            v = r["cpu"][sensor]
            assert v is None or (v["min"] > 0 and v["samples"] > 0)


def test_unavailable_sensors_print_not_available(report):
    text = bench.format_markdown(report)
    if sysinfo.cpu_temperature_c() is None:
        assert "CPU temperature: not available" in text
    else:
        assert "n/a" not in text.split("note:")[0].splitlines()[-1]


def test_csv_has_one_row_per_test_with_llama_bench_columns(report):
    rows = list(csv.DictReader(io.StringIO(bench.format_csv(report))))
    assert [(row["n_prompt"], row["n_gen"], row["threads"]) for row in rows] == [("8", "6", "1"), ("24", "6", "1")]
    assert float(rows[0]["pp_avg_ts"]) > 0 and float(rows[0]["tg_avg_ts"]) > 0
    assert rows[0]["bundle_hash"] == report["bundle"]["hash"]


def test_markdown_has_pp_and_tg_rows_with_mean_and_sd(report):
    rows = bench.tests_rows(report)
    assert [r["test"] for r in rows] == ["pp8", "tg6 @ d8", "pp24", "tg6 @ d24"]
    assert all(" ± " in r["t/s"] for r in rows)
    text = bench.format_markdown(report)
    assert text.count("\n| llama |") == 4


def test_compare_prints_ratios_between_two_reports(report, tmp_path):
    faster = copy.deepcopy(report)
    for r in faster["results"]:
        r["decode_tps"]["median"] *= 2
        r["ttft_ms"]["median"] /= 4
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report))
    b.write_text(json.dumps(faster))

    r = edgekit("bench", "--compare", a, b)
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    first = [c.strip() for c in table[2].strip("|").split("|")]
    row = dict(zip(header, first, strict=True))
    assert row["decode tok/s"] == "2.00x" and row["ttft ms"] == "0.25x" and row["prefill tok/s"] == "1.00x"


def test_compare_refuses_a_file_that_is_not_a_report(report, tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(report))
    (tmp_path / "notes.json").write_text("[1, 2]")
    r = edgekit("bench", "--compare", a, tmp_path / "notes.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not an `edgekit bench` report" in r.stderr


def test_a_test_that_does_not_fit_the_context_is_one_line_error(tiny_bundle, tmp_path):
    context = read_manifest(tiny_bundle).architecture.context_length
    r = edgekit("bench", tiny_bundle, "--prompt-tokens", context, "--new-tokens", "4", "--report", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "context length" in r.stderr and "--prompt-tokens" in r.stderr


def test_profile_ops_splits_prefill_and_decode_by_operator(tiny_bundle):
    phases = profile_ops(tiny_bundle, prompt_tokens=16, new_tokens=5, threads=1)
    assert set(phases) == {"prefill", "decode"}
    assert phases["prefill"].runs == 1 and phases["decode"].runs == 5
    layers = read_manifest(tiny_bundle).architecture.num_layers
    for p in phases.values():
        ops = {row.name: row for row in p.by_op}
        assert ops["GroupQueryAttention"].calls_per_run == layers  # one attention per layer
        assert any(name.startswith("MatMul") for name in ops)
        assert 0 < p.kernel_ms <= p.run_ms
        assert sum(row.share for row in p.by_op) <= 1.0 + 1e-9
        assert p.by_node[0].ms_per_run >= p.by_node[-1].ms_per_run


def test_profile_ops_command_prints_tables(tiny_bundle, tmp_path):
    r = edgekit("bench", tiny_bundle, "--profile-ops", "--prompt-tokens", "16", "--new-tokens", "4",
                "--threads", "1", "--report", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "## prefill" in r.stdout and "## decode" in r.stdout
    assert "GroupQueryAttention" in r.stdout and "MatMul" in r.stdout
    (path,) = tmp_path.glob("bench-*-ops-*.json")
    assert json.loads(path.read_text())["profile"]["decode"]["runs"] == 4


def test_generate_stats_prints_one_line_of_timings(tiny_bundle):
    r = edgekit("generate", tiny_bundle, "Hello robot", "--max-new-tokens", "5", "--stats")
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "ttft" in x]
    assert "prefill" in line and "decode" in line and "tok/s" in line


def test_a_background_load_runs_alongside_and_is_recorded(tiny_bundle):
    from edgekit.device.bench.busy import busy_cpus
    from edgekit.device.sysinfo import usable_cpus

    with busy_cpus(1):
        spinners = [p for p in multiprocessing.active_children() if p.is_alive()]
        assert len(spinners) == 1
    assert not any(p.is_alive() for p in spinners)  # stopped when the block ends
    cores = len(usable_cpus())
    report = bench.run_benchmark(tiny_bundle, bench.BenchOptions(prompt_tokens=[8], new_tokens=4, runs=1, warmup=0,
                                                                 background_load=cores))
    assert report["settings"]["background_load"] == cores
    assert f"{cores} busy process(es) alongside" in bench.format_markdown(report)
    # every core busy: without --threads the model ran on one thread, and the report says so
    assert report["results"][0]["threads"] is None and report["results"][0]["threads_run"] == 1
    assert bench.format_csv(report).splitlines()[1].split(",")[4] == "default (1)"
    with pytest.raises(bench.BenchError, match="--background-load must be from 0 to"):
        bench.run_benchmark(tiny_bundle, bench.BenchOptions(background_load=-1))
