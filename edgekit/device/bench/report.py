"""The benchmark report: typed records, and their JSON form on disk.

A report is one BenchReport: what ran where (machine, bundle, settings) and one TestResult
per (threads, prompt length) in the order run. Its JSON form is `dataclasses.asdict` of it,
so the field names and their order here are the file format (REPORT_FORMAT 1): renaming
or reordering a field changes the files users keep and compare.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from edgekit.device.bench.stats import Percentiles, Summary
from edgekit.errors import InputError

REPORT_FORMAT = 1


class BenchError(InputError):
    """Benchmark settings that cannot work, or a report that cannot be read (the CLI prints it as one line)."""


def _named(cls, data: dict) -> dict:
    """The keys of `data` that dataclass `cls` names; KeyError for a missing one that has no
    default (a field added since an older report was written has one)."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING}


def _pick(cls, data: dict):
    """`cls` (a flat dataclass) from the keys of `data` it names (see _named)."""
    return cls(**_named(cls, data))


@dataclass
class SensorSummary:
    """A CPU sensor sampled during a test."""

    min: float
    max: float
    mean: float
    samples: int


@dataclass
class CpuReadings:
    """CPU temperature (°C) and frequency (MHz) during a test; None where the system does not expose them."""

    temperature_c: SensorSummary | None
    frequency_mhz: SensorSummary | None
    interval_s: float

    @classmethod
    def from_dict(cls, data: dict) -> CpuReadings:
        """From sysinfo.Readings.summary() or a report's JSON."""
        sensor = lambda v: None if v is None else _pick(SensorSummary, v)  # noqa: E731
        return cls(sensor(data["temperature_c"]), sensor(data["frequency_mhz"]), data["interval_s"])


@dataclass
class TestResult:
    """One test: a thread count and a prompt length, warm-up plus counted runs (llama-bench's test record)."""

    __test__ = False  # a record, not a pytest test class, whatever its name

    threads: int | None  # None: the default (onnxruntime's before 2026-11-30, since then device/threads.py's)
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    load_s: float
    ttft_ms: Summary
    prefill_tps: Summary
    decode_tps: Summary
    itl_ms: Percentiles  # over every token of every counted run
    step_ms: Percentiles  # the same for the model run alone
    tokenize_ms: Summary
    sample_ms: Summary  # per token
    detokenize_ms: Summary  # per token
    peak_rss_mb: float | None
    peak_rss_scope: str  # "test" when the kernel's peak counter could be reset, else "process"
    cpu: CpuReadings
    token_latency_ms: list[float]  # median over runs of each step's model time, in order: the plot
    threads_run: int | None = None  # what the session ran on at the end (the default follows the free cores)

    @property
    def threads_label(self) -> str:
        """The thread count as tables print it: "default (N)" when the bench was not given one and
        the session ran on N ("default" in reports from before edgekit recorded N)."""
        if self.threads is not None:
            return str(self.threads)
        return "default" if self.threads_run is None else f"default ({self.threads_run})"

    @classmethod
    def from_dict(cls, data: dict) -> TestResult:
        summaries = {f: _pick(Summary, data[f])
                     for f in ("ttft_ms", "prefill_tps", "decode_tps", "tokenize_ms", "sample_ms", "detokenize_ms")}
        return cls(**{**_named(cls, data), **summaries,
                      "itl_ms": _pick(Percentiles, data["itl_ms"]), "step_ms": _pick(Percentiles, data["step_ms"]),
                      "cpu": CpuReadings.from_dict(data["cpu"])})


@dataclass
class BundleInfo:
    """What was benchmarked: enough to tell two reports' bundles apart."""

    path: str
    name: str
    hash: str
    model_type: str
    source: str | None  # the spec it was exported from
    layers: int
    hidden_size: int
    context_length: int
    quantization: dict  # the manifest's own: method, bits, group_size, ...
    graph: str | None  # the graph flavour
    target: str | None  # the device profile it was exported for
    size_mb: float  # the bundle's files, in MiB


@dataclass
class BenchSettings:
    prompt_tokens: list[int]
    new_tokens: int
    runs: int
    warmup: int
    threads: list[int | None]
    execution_provider: str
    sampling: str
    background_load: int = 0  # processes spinning on the CPU meanwhile (--background-load)


@dataclass
class BenchReport:
    """A whole benchmark: the machine, the bundle, the settings and one result per test, in the order run."""

    report_format: int
    kind: str  # "bench" (an operator profile is "profile", see op_profile.py)
    edgekit_version: str
    created: str  # UTC, ISO 8601
    machine: dict  # sysinfo.machine_description(): open-ended, printed, never computed with
    bundle: BundleInfo
    settings: BenchSettings
    results: list[TestResult]

    @property
    def subject(self) -> str:
        """'<bundle> (<hash>) on <board or CPU>': what ran where, in one line."""
        m = self.machine
        return f"{self.bundle.name} ({self.bundle.hash}) on {m.get('board') or m.get('cpu_model')}"

    def to_dict(self) -> dict:
        """The JSON form: what write_report writes and `bench -o json` prints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchReport:
        """The report of a JSON form; KeyError or TypeError when it is not a whole one."""
        return cls(**{**{f.name: data[f.name] for f in fields(cls)},
                      "bundle": _pick(BundleInfo, data["bundle"]),
                      "settings": _pick(BenchSettings, data["settings"]),
                      "results": [TestResult.from_dict(r) for r in data["results"]]})


def as_report(report: BenchReport | dict) -> BenchReport:
    """`report` itself, or the BenchReport of a JSON form (what run_benchmark returns)."""
    return report if isinstance(report, BenchReport) else BenchReport.from_dict(report)


def write_report(report: BenchReport | dict, folder: str | Path) -> Path:
    """Write the report as `bench-<bundle>-<UTC time>.json` in `folder` (created); returns the path.

    `report` is a BenchReport or a JSON form (a bench report's, or an operator profile's).
    """
    data = report.to_dict() if isinstance(report, BenchReport) else report
    folder = Path(folder)
    stamp = data["created"].replace(":", "").replace("-", "").replace("+0000", "")[:15]
    name = data["bundle"]["name"] if data.get("bundle") else "bundle"
    kind = "-ops" if data.get("kind") == "profile" else ""
    path = folder / f"bench-{name}{kind}-{stamp}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as e:
        raise BenchError(f"--report {folder}: cannot write the report there ({e.strerror})") from None
    return path


def read_report(path: str | Path) -> BenchReport:
    """A report written by write_report (any edgekit writing REPORT_FORMAT 1); BenchError when the file is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such report file") from None
    except OSError as e:
        raise BenchError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != "bench" or "results" not in data:
        raise BenchError(f"{path}: not an `edgekit bench` report (no results); run `edgekit bench BUNDLE --report DIR`")
    try:
        return BenchReport.from_dict(data)
    except KeyError as e:
        raise BenchError(f"{path}: an incomplete `edgekit bench` report (no {e} in it)") from None
    except (TypeError, AttributeError) as e:
        raise BenchError(f"{path}: a damaged `edgekit bench` report ({e})") from None
