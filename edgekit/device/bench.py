"""On-device benchmark of a bundle: time to first token, prefill and decode speed, latency spread.

Follows llama-bench where it fits, so the two can be read side by side:

    pp P          prompt processing: one model run over P prompt tokens   -> tokens/s
    tg N @ dP     text generation: N one-token model runs after P tokens  -> tokens/s

One *run* at prompt length P is: tokenize a P-token prompt, prefill it, sample, then N
times (step, sample, detokenize), greedy and ignoring EOS so that every run does the
same work. Each part has its own timer, so tokenization, sampling and detokenization
are reported apart from the model. Warm-up runs (first-run allocations, cold caches)
are not counted; the counted runs give a median and a spread (llama-bench's mean ± sd
for tokens/s, min and max for times).

Measured per (threads, prompt length):
    load_s          opening the bundle: verify hashes, create the session, allocate the cache
    ttft            tokenize + prefill + first sample: what a user waits for
    prefill tok/s   P / prefill model time
    decode tok/s    N / sum of one-token model runs (model only)
    itl p50/p90/p99 inter-token latency as the caller sees it: step + sample + detokenize
    peak RSS        the process's peak resident memory during the test
    CPU temperature and frequency sampled during the test, where /sys exposes them

This module is device side: numpy, onnxruntime and tokenizers only.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import edgekit
from edgekit.device import sysinfo
from edgekit.device.bundle import to_record
from edgekit.device.generate import ContextLengthError, Model
from edgekit.device.sampling import SamplingConfig, sample
from edgekit.errors import InputError

REPORT_FORMAT = 1

# Plain English text (written for this file) that prompts are cut from: real words make the
# tokenizer's work realistic, unlike llama-bench's random ids. Repeated to reach long prompts.
PROMPT_TEXT = (
    "The robot stood at the edge of the loading dock and waited for the morning shift. "
    "Its battery was full, its map of the warehouse had been updated overnight, and the first "
    "order of the day was already in its queue: three boxes of bolts from aisle twelve, a coil "
    "of copper wire from the back wall, and a crate of spare wheels that nobody had touched in "
    "months. It checked the floor ahead with its cameras, noted a puddle near the door, and "
    "planned a path around it. Outside, rain was falling on the parked trucks, and a driver "
    "in a yellow coat was arguing with someone on the phone about a delivery that had gone to "
    "the wrong town. The robot did not understand the argument, but it understood that the "
    "truck would leave late, and it moved the loading of that truck to the end of its list. "
    "When the doors opened it rolled forward slowly, listening for footsteps, because people "
    "who had just arrived were often tired and did not look where they were going. "
)


class BenchError(InputError):
    """Benchmark settings that cannot work (the CLI prints it as one line)."""


# -- statistics ----------------------------------------------------------------------


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
    def of(cls, values: list[float]) -> "Summary":
        if not values:
            raise ValueError("no values to summarize")
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.median(values), statistics.fmean(values), sd, min(values), max(values), len(values))


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...} with linear interpolation (numpy's default)."""
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


# -- one run -------------------------------------------------------------------------


@dataclass
class RunTimings:
    """Where the time of one run went, in seconds."""

    tokenize_s: float
    prefill_s: float  # the model run over the prompt
    first_sample_s: float
    step_s: list[float]  # one per one-token model run
    sample_s: list[float]  # one per sampled token after the first
    detokenize_s: list[float]
    itl_s: list[float]  # time between consecutive tokens as the caller sees them

    @property
    def ttft_s(self) -> float:
        return self.tokenize_s + self.prefill_s + self.first_sample_s


def prompt_text(model: Model, tokens: int) -> str:
    """A prefix of PROMPT_TEXT (repeated as needed) that tokenizes to about `tokens` tokens."""
    text = PROMPT_TEXT
    while len(model.tokenizer.encode(text).ids) < tokens + 1:
        text += PROMPT_TEXT
    enc = model.tokenizer.encode(text)
    return text[: enc.offsets[tokens - 1][1]]


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """Exactly `tokens` ids of the benchmark prompt from a `tokenizers.Tokenizer` (the same ids for
    every peer in benchmarks/compare_peers.py)."""
    text = PROMPT_TEXT
    while len(ids := tokenizer.encode(text).ids) < tokens:
        text += PROMPT_TEXT
    return ids[:tokens]


def run_once(model: Model, text: str, prompt_tokens: int, new_tokens: int) -> RunTimings:
    """Tokenize `text`, prefill `prompt_tokens` of it, then generate `new_tokens` one-token steps.

    Greedy and EOS ignored, so every run does the same work. The cache is reset first: the
    prompt is computed from scratch, never reused from the previous run.
    """
    model.reset()
    cfg = SamplingConfig()  # greedy: what a robot's command parser would use
    rng = np.random.default_rng(0)
    seen = np.empty(0, np.int64)
    clock = time.perf_counter
    t0 = clock()
    ids = model.tokenizer.encode(text).ids
    t1 = clock()
    ids = (ids + prompt_ids(model.tokenizer, prompt_tokens))[:prompt_tokens] if len(ids) < prompt_tokens else ids[:prompt_tokens]
    t1b = clock()  # padding a short tokenization is benchmark bookkeeping, not counted
    logits, _ = model.prefill(ids)
    t2 = clock()
    token = sample(logits, cfg, rng, seen)
    t3 = clock()
    timings = RunTimings(t1 - t0, t2 - t1b, t3 - t2, [], [], [], [])
    out = [token]
    last = t3
    for _ in range(new_tokens):
        # mirror Model.stream: detokenize the whole output each step (what streaming text costs)
        a = clock()
        model.tokenizer.decode(out, skip_special_tokens=True)
        b = clock()
        logits = model.step(token)
        c = clock()
        token = sample(logits, cfg, rng, seen)
        d = clock()
        out.append(token)
        timings.detokenize_s.append(b - a)
        timings.step_s.append(c - b)
        timings.sample_s.append(d - c)
        timings.itl_s.append(d - last)
        last = d
    return timings


# -- a test: one thread count and prompt length, warm-up plus counted runs ------------


@dataclass
class TestResult:
    threads: int | None  # None: onnxruntime's default (one per physical core)
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    load_s: float
    ttft_ms: Summary
    prefill_tps: Summary
    decode_tps: Summary
    itl_ms: dict  # p50/p90/p99 over every token of every counted run
    step_ms: dict  # the same for the model run alone
    tokenize_ms: Summary
    sample_ms: Summary  # per token
    detokenize_ms: Summary  # per token
    peak_rss_mb: float | None
    peak_rss_scope: str  # "test" when the kernel's peak counter could be reset, else "process"
    cpu: dict  # temperature_c / frequency_mhz: {min, max, mean, samples} or None (not available)
    token_latency_ms: list[float]  # median over runs of each step's model time, in order: the plot


def run_test(model: Model, load_s: float, threads: int | None, prompt_tokens: int, new_tokens: int,
             runs: int, warmup: int) -> TestResult:
    """Warm up, then time `runs` runs at one prompt length; fails before running if it cannot fit."""
    needed = model.prefix_length + prompt_tokens + new_tokens + 1
    if needed > model.context_length:
        raise BenchError(
            f"pp{prompt_tokens} + tg{new_tokens} needs {needed} positions but the bundle's context length is "
            f"{model.context_length}; use fewer --prompt-tokens or --new-tokens"
        )
    text = prompt_text(model, prompt_tokens)
    scope = "test" if sysinfo.reset_peak_rss() else "process"
    with sysinfo.Sampler() as sampler:
        for _ in range(warmup):
            run_once(model, text, prompt_tokens, new_tokens)
        timed = [run_once(model, text, prompt_tokens, new_tokens) for _ in range(runs)]
    ms = 1e3
    steps = np.array([r.step_s for r in timed]) * ms  # (runs, new_tokens)
    return TestResult(
        threads=threads,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        warmup=warmup,
        load_s=load_s,
        ttft_ms=Summary.of([r.ttft_s * ms for r in timed]),
        prefill_tps=Summary.of([prompt_tokens / r.prefill_s for r in timed]),
        decode_tps=Summary.of([new_tokens / sum(r.step_s) for r in timed]),
        itl_ms=percentiles([t * ms for r in timed for t in r.itl_s]),
        step_ms=percentiles(steps.ravel().tolist()),
        tokenize_ms=Summary.of([r.tokenize_s * ms for r in timed]),
        sample_ms=Summary.of([statistics.fmean([r.first_sample_s, *r.sample_s]) * ms for r in timed]),
        detokenize_ms=Summary.of([statistics.fmean(r.detokenize_s) * ms for r in timed]),
        peak_rss_mb=sysinfo.peak_rss_mb(),
        peak_rss_scope=scope,
        cpu=sampler.readings.summary(),
        token_latency_ms=np.median(steps, axis=0).round(4).tolist(),
    )


# -- the whole benchmark ---------------------------------------------------------------


@dataclass
class BenchOptions:
    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    new_tokens: int = 64
    runs: int = 5
    warmup: int = 1
    threads: list[int | None] = field(default_factory=lambda: [None])
    providers: list[str] | None = None

    def check(self) -> None:
        if not self.prompt_tokens or any(p < 1 for p in self.prompt_tokens):
            raise BenchError(f"--prompt-tokens must be positive numbers, got {self.prompt_tokens}")
        if self.new_tokens < 1:
            raise BenchError(f"--new-tokens must be at least 1, got {self.new_tokens}")
        if self.runs < 1:
            raise BenchError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be 0 or more, got {self.warmup}")
        if any(t is not None and t < 1 for t in self.threads):
            raise BenchError(f"--threads must be positive numbers, got {self.threads}")


def bundle_description(model: Model) -> dict:
    """What was benchmarked: enough to tell two reports' bundles apart."""
    m = model.manifest
    a = m.architecture
    size = sum((model.path / name).stat().st_size for name in m.files if (model.path / name).is_file())
    return {
        "path": str(model.path),
        "name": model.path.resolve().name,
        "hash": model.bundle_hash,
        "model_type": a.model_type,
        "source": m.source.spec,
        "layers": a.num_layers,
        "hidden_size": a.hidden_size,
        "context_length": model.context_length,
        "quantization": to_record(m.quantization),
        "graph": m.graph.flavour,
        "target": m.target.name,
        "size_mb": round(size / 2**20, 1),
    }


def run_benchmark(bundle: str | Path, options: BenchOptions, progress=None) -> dict:
    """Run every (threads, prompt length) test of `options` on `bundle`; returns the report (a dict).

    The report is JSON-ready: machine, bundle, settings, and one result per test in the
    order run. `progress(str)` is called before each test.
    """
    options.check()
    say = progress or (lambda _: None)
    results: list[TestResult] = []
    provider = None
    bundle_info = None
    for threads in options.threads:
        t0 = time.perf_counter()
        model = Model(bundle, threads=threads, providers=options.providers)
        load_s = time.perf_counter() - t0
        provider = model.provider
        bundle_info = bundle_info or bundle_description(model)
        for p in options.prompt_tokens:
            say(f"threads {threads or 'default'}: pp{p} + tg{options.new_tokens}, "
                f"{options.warmup} warm-up + {options.runs} runs")
            try:
                results.append(run_test(model, load_s, threads, p, options.new_tokens, options.runs, options.warmup))
            except ContextLengthError as e:
                raise BenchError(str(e)) from None
        del model  # free the session before the next thread count loads its own
    return {
        "report_format": REPORT_FORMAT,
        "kind": "bench",
        "edgekit_version": edgekit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": sysinfo.machine_description(),
        "bundle": bundle_info,
        "settings": {
            "prompt_tokens": options.prompt_tokens,
            "new_tokens": options.new_tokens,
            "runs": options.runs,
            "warmup": options.warmup,
            "threads": options.threads,
            "execution_provider": provider,
            "sampling": "greedy, EOS ignored",
        },
        "results": [asdict(r) for r in results],
    }


# -- output ------------------------------------------------------------------------------


def _thr(t) -> str:
    return "default" if t is None else str(t)


def _pm(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def _na(v, fmt: str = "{:.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def tests_rows(report: dict) -> list[dict]:
    """llama-bench's rows: one `pp P` and one `tg N @ dP` per result, tokens/s as mean ± sd."""
    b = report["bundle"]
    quant = b["quantization"].get("method", "none")
    if quant != "none" and b["quantization"].get("bits"):
        quant += f" {b['quantization']['bits']}-bit"
    rows = []
    for r in report["results"]:
        common = {"model": b["model_type"], "size": f"{b['size_mb']:.0f} MiB", "quant": quant,
                  "backend": report["settings"]["execution_provider"].removesuffix("ExecutionProvider"),
                  "threads": _thr(r["threads"])}
        rows.append({**common, "test": f"pp{r['prompt_tokens']}", "t/s": _pm(r["prefill_tps"])})
        rows.append({**common, "test": f"tg{r['new_tokens']} @ d{r['prompt_tokens']}", "t/s": _pm(r["decode_tps"])})
    return rows


def latency_rows(report: dict) -> list[dict]:
    """One row per result: what a user waits for, with the spread over runs."""
    rows = []
    for r in report["results"]:
        t = r["ttft_ms"]
        cpu = r["cpu"]
        temp = cpu.get("temperature_c")
        freq = cpu.get("frequency_mhz")
        rows.append({
            "threads": _thr(r["threads"]),
            "prompt": str(r["prompt_tokens"]),
            "load s": f"{r['load_s']:.2f}",
            "ttft ms (min-max)": f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})",
            "prefill tok/s": f"{r['prefill_tps']['median']:.1f}",
            "decode tok/s": f"{r['decode_tps']['median']:.1f}",
            "itl p50/p90/p99 ms": "/".join(f"{r['itl_ms'][k]:.1f}" for k in ("p50", "p90", "p99")),
            "tok/sample/detok ms": f"{r['tokenize_ms']['median']:.2f}/{r['sample_ms']['median']:.2f}/"
                                   f"{r['detokenize_ms']['median']:.2f}",
            "peak RSS MB": _na(r["peak_rss_mb"]),
            "temp °C": "n/a" if temp is None else f"{temp['min']:.0f}-{temp['max']:.0f}",
            "freq MHz": "n/a" if freq is None else f"{freq['min']:.0f}-{freq['max']:.0f}",
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    out = [line(c.ljust(width[c]) for c in cols), line("-" * width[c] for c in cols)]
    out += [line(str(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(out)


def format_markdown(report: dict) -> str:
    """The terminal/markdown view of a report: llama-bench's pp/tg table, then latencies."""
    m = report["machine"]
    head = (f"{report['bundle']['name']} ({report['bundle']['hash']}) on {m.get('board') or m.get('cpu_model')}, "
            f"{m.get('logical_cores')} cores, onnxruntime {m.get('onnxruntime')}, "
            f"{report['settings']['runs']} runs after {report['settings']['warmup']} warm-up")
    notes = []
    if all(r["cpu"].get("temperature_c") is None for r in report["results"]):
        notes.append("CPU temperature: not available on this system")
    if all(r["cpu"].get("frequency_mhz") is None for r in report["results"]):
        notes.append("CPU frequency: not available on this system")
    if any(r["peak_rss_scope"] == "process" for r in report["results"]):
        notes.append("peak RSS is the process's since start (the per-test counter could not be reset)")
    parts = [head, "", markdown_table(tests_rows(report)), "", markdown_table(latency_rows(report))]
    if notes:
        parts += [""] + [f"note: {n}" for n in notes]
    return "\n".join(parts)


CSV_FIELDS = (
    "bundle", "bundle_hash", "quant", "provider", "threads", "n_prompt", "n_gen", "runs", "load_s",
    "pp_avg_ts", "pp_stddev_ts", "tg_avg_ts", "tg_stddev_ts", "ttft_ms_median", "ttft_ms_min", "ttft_ms_max",
    "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "tokenize_ms", "sample_ms", "detokenize_ms", "peak_rss_mb",
    "cpu_temp_c_max", "cpu_freq_mhz_min",
)


def format_csv(report: dict) -> str:
    """One CSV row per (threads, prompt length), llama-bench's avg_ts/stddev_ts names where they exist."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    b = report["bundle"]
    for r in report["results"]:
        temp, freq = r["cpu"].get("temperature_c"), r["cpu"].get("frequency_mhz")
        w.writerow({
            "bundle": b["name"], "bundle_hash": b["hash"], "quant": b["quantization"].get("method", "none"),
            "provider": report["settings"]["execution_provider"], "threads": _thr(r["threads"]),
            "n_prompt": r["prompt_tokens"], "n_gen": r["new_tokens"], "runs": r["runs"],
            "load_s": f"{r['load_s']:.4f}",
            "pp_avg_ts": f"{r['prefill_tps']['mean']:.3f}", "pp_stddev_ts": f"{r['prefill_tps']['sd']:.3f}",
            "tg_avg_ts": f"{r['decode_tps']['mean']:.3f}", "tg_stddev_ts": f"{r['decode_tps']['sd']:.3f}",
            "ttft_ms_median": f"{r['ttft_ms']['median']:.3f}", "ttft_ms_min": f"{r['ttft_ms']['min']:.3f}",
            "ttft_ms_max": f"{r['ttft_ms']['max']:.3f}",
            **{f"itl_ms_{k}": f"{r['itl_ms'][k]:.3f}" for k in ("p50", "p90", "p99")},
            "tokenize_ms": f"{r['tokenize_ms']['median']:.4f}", "sample_ms": f"{r['sample_ms']['median']:.4f}",
            "detokenize_ms": f"{r['detokenize_ms']['median']:.4f}",
            "peak_rss_mb": "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}",
            "cpu_temp_c_max": "" if temp is None else f"{temp['max']:.1f}",  # empty, not 0: not available
            "cpu_freq_mhz_min": "" if freq is None else f"{freq['min']:.0f}",
        })
    return buf.getvalue()


def write_report(report: dict, folder: str | Path) -> Path:
    """Write the report as `bench-<bundle>-<UTC time>.json` in `folder` (created); returns the path."""
    folder = Path(folder)
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "")[:15]
    name = report["bundle"]["name"] if report.get("bundle") else "bundle"
    kind = "-ops" if report.get("kind") == "profile" else ""
    path = folder / f"bench-{name}{kind}-{stamp}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as e:
        raise BenchError(f"--report {folder}: cannot write the report there ({e.strerror})") from None
    return path


def read_report(path: str | Path) -> dict:
    """A report written by write_report; BenchError when the file is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such report file") from None
    except OSError as e:
        raise BenchError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("kind") != "bench" or "results" not in report:
        raise BenchError(f"{path}: not an `edgekit bench` report (no results); run `edgekit bench BUNDLE --report DIR`")
    return report


# -- comparing two reports ---------------------------------------------------------------

# metric -> (how to read it from a result, True when higher is better)
COMPARED = {
    "load s": (lambda r: r["load_s"], False),
    "ttft ms": (lambda r: r["ttft_ms"]["median"], False),
    "prefill tok/s": (lambda r: r["prefill_tps"]["median"], True),
    "decode tok/s": (lambda r: r["decode_tps"]["median"], True),
    "itl p50 ms": (lambda r: r["itl_ms"]["p50"], False),
    "itl p99 ms": (lambda r: r["itl_ms"]["p99"], False),
    "peak RSS MB": (lambda r: r["peak_rss_mb"], False),
}


def compare(a: dict, b: dict) -> list[dict]:
    """Ratios b / a for every test the two reports share (same threads, prompt and new tokens).

    Each row: threads, prompt, new, and per metric "x.xx" (b / a). Raises BenchError when the
    reports share no test.
    """
    key = lambda r: (r["threads"], r["prompt_tokens"], r["new_tokens"])  # noqa: E731
    in_a = {key(r): r for r in a["results"]}
    rows = []
    for rb in b["results"]:
        ra = in_a.get(key(rb))
        if ra is None:
            continue
        row = {"threads": _thr(rb["threads"]), "prompt": str(rb["prompt_tokens"]), "new": str(rb["new_tokens"])}
        for name, (get, _) in COMPARED.items():
            va, vb = get(ra), get(rb)
            row[name] = f"{vb / va:.2f}x" if va and vb is not None else "n/a"
        rows.append(row)
    if not rows:
        sa = sorted({key(r) for r in a["results"]}, key=str)
        sb = sorted({key(r) for r in b["results"]}, key=str)
        raise BenchError(f"the reports share no test (threads, prompt, new tokens): {sa} vs {sb}; "
                         "run both with the same --threads, --prompt-tokens and --new-tokens")
    return rows


def format_compare(a: dict, b: dict, name_a: str, name_b: str) -> str:
    def who(r):
        m = r["machine"]
        return f"{r['bundle']['name']} ({r['bundle']['hash']}) on {m.get('board') or m.get('cpu_model')}"

    better = ", ".join(f"{n} {'higher' if hi else 'lower'}" for n, (_, hi) in COMPARED.items())
    return "\n".join([
        f"A: {name_a}: {who(a)}",
        f"B: {name_b}: {who(b)}",
        "ratios B / A (better: " + better + ")",
        "",
        markdown_table(compare(a, b)),
    ])


# -- plot ------------------------------------------------------------------------------------


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: the plot is an optional extra."""


def plot_report(report: dict, path: str | Path) -> Path:
    """A PNG: model time of each generated token across the run, and TTFT against prompt length.

    Raises PlotUnavailable (with the install command) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a device
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the plot needs matplotlib: pip install matplotlib") from None
    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        left.plot(range(1, len(r["token_latency_ms"]) + 1), r["token_latency_ms"],
                  label=f"after {r['prompt_tokens']} prompt tok, threads {_thr(r['threads'])}", linewidth=1)
    left.set_xlabel("generated token")
    left.set_ylabel("model time per token (ms, median over runs)")
    left.set_title("decode latency across the run")
    left.set_ylim(bottom=0)
    left.legend(fontsize="small")
    for threads in dict.fromkeys(r["threads"] for r in results):
        rs = sorted((r for r in results if r["threads"] == threads), key=lambda r: r["prompt_tokens"])
        xs = [r["prompt_tokens"] for r in rs]
        med = [r["ttft_ms"]["median"] for r in rs]
        err = [[m - r["ttft_ms"]["min"] for m, r in zip(med, rs)], [r["ttft_ms"]["max"] - m for m, r in zip(med, rs)]]
        right.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"threads {_thr(threads)}")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("time to first token (ms, median, min-max)")
    right.set_title("time to first token")
    right.set_ylim(bottom=0)
    right.legend(fontsize="small")
    b, m = report["bundle"], report["machine"]
    fig.suptitle(f"{b['name']} ({b['hash']}) on {m.get('board') or m.get('cpu_model')}, {report['created']}",
                 fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
