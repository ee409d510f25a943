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

The results are report.TestResult records in a report.BenchReport; formats.py prints them,
compare.py compares two, plot.py draws one. This module is device side: numpy, onnxruntime
and tokenizers only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import edgekit
from edgekit.device import sysinfo
from edgekit.device.bench.busy import busy_cpus
from edgekit.device.bench.report import (
    REPORT_FORMAT,
    BenchError,
    BenchReport,
    BenchSettings,
    BundleInfo,
    CpuReadings,
    TestResult,
)
from edgekit.device.bench.stats import Percentiles, Summary
from edgekit.device.bundle import to_record
from edgekit.device.generate import ContextLengthError, Model
from edgekit.device.sampling import SamplingConfig, sample
from edgekit.device.threads import MAX_THREADS

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
    ids = (ids + prompt_ids(model.tokenizer, prompt_tokens) if len(ids) < prompt_tokens else ids)[:prompt_tokens]
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
        itl_ms=Percentiles.of([t * ms for r in timed for t in r.itl_s]),
        step_ms=Percentiles.of(steps.ravel().tolist()),
        tokenize_ms=Summary.of([r.tokenize_s * ms for r in timed]),
        sample_ms=Summary.of([statistics.fmean([r.first_sample_s, *r.sample_s]) * ms for r in timed]),
        detokenize_ms=Summary.of([statistics.fmean(r.detokenize_s) * ms for r in timed]),
        peak_rss_mb=sysinfo.peak_rss_mb(),
        peak_rss_scope=scope,
        cpu=CpuReadings.from_dict(sampler.readings.summary()),
        token_latency_ms=np.median(steps, axis=0).round(4).tolist(),
        threads_run=model.threads,
    )


# -- the whole benchmark ---------------------------------------------------------------


@dataclass
class BenchOptions:
    """What to run: every prompt length at every thread count (llama-bench's sweeps)."""

    prompt_tokens: list[int] = field(default_factory=lambda: [128])
    new_tokens: int = 64
    runs: int = 5
    warmup: int = 1
    threads: list[int | None] = field(default_factory=lambda: [None])
    providers: list[str] | None = None
    background_load: int = 0  # processes spinning on the CPU while it runs (busy.py)

    def check(self) -> None:
        """BenchError for a setting that cannot work, said as the CLI flag that sets it."""
        if not self.prompt_tokens or any(p < 1 for p in self.prompt_tokens):
            raise BenchError(f"--prompt-tokens must be positive numbers, got {self.prompt_tokens}")
        if self.new_tokens < 1:
            raise BenchError(f"--new-tokens must be at least 1, got {self.new_tokens}")
        if self.runs < 1:
            raise BenchError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be 0 or more, got {self.warmup}")
        if not self.threads or any(t is not None and not 1 <= t <= MAX_THREADS for t in self.threads):
            raise BenchError(f"--threads must be numbers from 1 to {MAX_THREADS}, got {self.threads}")
        most = 4 * len(sysinfo.usable_cpus())  # spinning processes beyond that only heat the machine
        if not 0 <= self.background_load <= most:
            raise BenchError(f"--background-load must be from 0 to {most} (4 per core), got {self.background_load}")


def bundle_description(model: Model) -> BundleInfo:
    """What was benchmarked: enough to tell two reports' bundles apart."""
    m = model.manifest
    a = m.architecture
    size = sum((model.path / name).stat().st_size for name in m.files if (model.path / name).is_file())
    return BundleInfo(
        path=str(model.path),
        name=model.path.resolve().name,
        hash=model.bundle_hash,
        model_type=a.model_type,
        source=m.source.spec,
        layers=a.num_layers,
        hidden_size=a.hidden_size,
        context_length=model.context_length,
        quantization=to_record(m.quantization),
        graph=m.graph.flavour,
        target=m.target.name,
        size_mb=round(size / 2**20, 1),
    )


def run_benchmark(bundle: str | Path, options: BenchOptions, progress=None) -> dict:
    """Run every (threads, prompt length) test of `options` on `bundle`; returns the report's JSON form.

    That is BenchReport.to_dict(): machine, bundle, settings, and one result per test in the
    order run, ready for json.dumps, write_report and every printer here (as_report reads it
    back). `progress(str)` is called before each test.
    """
    options.check()
    say = progress or (lambda _: None)
    results: list[TestResult] = []
    provider = None
    bundle_info = None
    with busy_cpus(options.background_load):
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
                    results.append(run_test(model, load_s, threads, p, options.new_tokens, options.runs,
                                            options.warmup))
                except ContextLengthError as e:
                    raise BenchError(str(e)) from None
            del model  # free the session before the next thread count loads its own
    assert bundle_info is not None and provider is not None  # options.check() refuses an empty --threads
    return BenchReport(
        report_format=REPORT_FORMAT,
        kind="bench",
        edgekit_version=edgekit.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=sysinfo.machine_description(),
        bundle=bundle_info,
        settings=BenchSettings(
            prompt_tokens=options.prompt_tokens,
            new_tokens=options.new_tokens,
            runs=options.runs,
            warmup=options.warmup,
            threads=options.threads,
            execution_provider=provider,
            sampling="greedy, EOS ignored",
            background_load=options.background_load,
        ),
        results=results,
    ).to_dict()
