"""Where the time goes: onnxruntime's profiler turned into tables by operator type and by node.

onnxruntime's profiler (SessionOptions.enable_profiling) writes a Chrome-trace JSON list
of events. The ones used here:

    {"cat": "Session", "name": "model_run", "ts": µs, "dur": µs}                 one per session run
    {"cat": "Node", "name": "<node>_kernel_time", "ts": µs, "dur": µs,
     "args": {"op_name": "MatMulNBits", "provider": "CPUExecutionProvider", ...}}  one per node per run

Each kernel event is assigned to the run whose interval contains it; runs are labelled
in the order they were made (warm-up, prefill, decode), so prefill and decode get
separate tables. The time of a run not spent inside any kernel (input binding, memory
planning, thread-pool hand-offs) is reported as "outside kernels": with one-token
decode steps of a small model it is often a real share of the time.

The profiler itself slows every node a little; use these tables for the split, and
`edgekit bench` (no profiler) for absolute speed.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import edgekit
from edgekit.device import sysinfo
from edgekit.device.bench import REPORT_FORMAT, BenchError, prompt_ids
from edgekit.device.bundle import bundle_hash, read_manifest, to_record
from edgekit.device.generate import Model
from edgekit.device.table import format_table


@dataclass
class OpRow:
    name: str  # operator type, or node name
    op: str  # operator type (same as name in by-op rows)
    calls_per_run: float
    ms_per_run: float
    share: float  # of the run's wall time, 0..1


@dataclass
class PhaseProfile:
    phase: str  # "prefill" or "decode"
    runs: int
    tokens_per_run: int
    run_ms: float  # mean wall time of one run (model_run)
    kernel_ms: float  # mean time inside kernels per run
    by_op: list[OpRow]
    by_node: list[OpRow]

    @property
    def outside_kernels_ms(self) -> float:
        return self.run_ms - self.kernel_ms


def parse_profile(path: str | Path, labels: list[str], tokens: dict[str, int] | None = None) -> dict[str, PhaseProfile]:
    """Split an onnxruntime profile into phases: `labels[i]` names the i-th model run.

    Runs labelled "warmup" are dropped. Returns {label: PhaseProfile}, with per-run means.
    Raises ValueError when the profile's run count does not match `labels`.
    """
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) != len(labels):
        raise ValueError(f"{path}: the profile has {len(runs)} runs but {len(labels)} were labelled")
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    # kernel events are in time order and runs do not overlap: one pass assigns each to its run
    per_run: list[list[dict]] = [[] for _ in runs]
    i = 0
    for k in kernels:
        while i < len(runs) and k["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            i += 1
        if i < len(runs) and k["ts"] >= runs[i]["ts"]:
            per_run[i].append(k)

    phases: dict[str, PhaseProfile] = {}
    for label in dict.fromkeys(labels):
        if label == "warmup":
            continue
        idx = [j for j, lab in enumerate(labels) if lab == label]
        n = len(idx)
        run_us = sum(runs[j]["dur"] for j in idx) / n
        op_us: dict[str, float] = defaultdict(float)
        op_calls: dict[str, int] = defaultdict(int)
        node_us: dict[str, float] = defaultdict(float)
        node_calls: dict[str, int] = defaultdict(int)
        node_op: dict[str, str] = {}
        for j in idx:
            for k in per_run[j]:
                op = k.get("args", {}).get("op_name", "?")
                node = k["name"].removesuffix("_kernel_time")
                op_us[op] += k["dur"]
                op_calls[op] += 1
                node_us[node] += k["dur"]
                node_calls[node] += 1
                node_op[node] = op

        phases[label] = PhaseProfile(
            phase=label, runs=n, tokens_per_run=(tokens or {}).get(label, 0),
            run_ms=run_us / 1e3, kernel_ms=sum(op_us.values()) / n / 1e3,
            by_op=_rows(op_us, op_calls, lambda name: name, n, run_us),
            by_node=_rows(node_us, node_calls, node_op.get, n, run_us),
        )
    return phases


def _rows(us: dict[str, float], calls: dict[str, int], op_of, runs: int, run_us: float) -> list[OpRow]:
    """Per-run means of one phase's kernel times, slowest first; op_of(name) is a row's operator type."""
    out = [OpRow(name, op_of(name), calls[name] / runs, t / runs / 1e3, (t / runs) / run_us if run_us else 0.0)
           for name, t in us.items()]
    return sorted(out, key=lambda r: -r.ms_per_run)


def profile_ops(bundle: str | Path, prompt_tokens: int = 128, new_tokens: int = 16, threads: int | None = None,
                warmup: int = 1, providers: list[str] | None = None) -> dict[str, PhaseProfile]:
    """Profile one prefill of `prompt_tokens` and `new_tokens` one-token decode steps.

    Opens its own session with the profiler on (profiling slows every run, so this never
    shares a session with timed runs). Returns {"prefill": ..., "decode": ...}.
    """
    with tempfile.TemporaryDirectory(prefix="edgekit-profile-") as tmp:
        model = Model(bundle, threads=threads, providers=providers, profile_prefix=Path(tmp) / "ort")
        if model.prefix_length + prompt_tokens + new_tokens + 1 > model.context_length:
            raise BenchError(f"pp{prompt_tokens} + tg{new_tokens} does not fit in the bundle's context length "
                             f"{model.context_length}; use fewer --prompt-tokens or --new-tokens")
        ids = prompt_ids(model.tokenizer, prompt_tokens)
        labels: list[str] = []
        for phase_prefill, phase_decode in [("warmup", "warmup")] * warmup + [("prefill", "decode")]:
            model.reset()
            model.prefill(ids)
            labels.append(phase_prefill)
            token = ids[-1]
            for _ in range(new_tokens):
                model.step(token)
                labels.append(phase_decode)
        path = model.session.end_profiling()
        return parse_profile(path, labels, {"prefill": prompt_tokens, "decode": 1})


def format_profile(phases: dict[str, PhaseProfile], top_nodes: int = 12) -> str:
    """Markdown tables: time by operator type, then the slowest nodes, for each phase."""
    parts = []
    for p in phases.values():
        what = f"{p.tokens_per_run} tokens" if p.tokens_per_run != 1 else "1 token"
        parts.append(f"## {p.phase}: {p.runs} run(s) of {what}, {p.run_ms:.2f} ms per run, "
                     f"{p.kernel_ms:.2f} ms in kernels, {p.outside_kernels_ms:.2f} ms outside kernels "
                     f"({p.outside_kernels_ms / p.run_ms:.0%})" if p.run_ms else f"## {p.phase}")
        parts.append("")
        rows = [(r.name, f"{r.calls_per_run:.0f}", f"{r.ms_per_run:.3f}", f"{r.share:.1%}") for r in p.by_op]
        parts += [format_table(("op type", "calls/run", "ms/run", "% of run"), rows), ""]
        rows = [(r.name, r.op, f"{r.ms_per_run:.3f}", f"{r.share:.1%}") for r in p.by_node[:top_nodes]]
        parts += [f"slowest {min(top_nodes, len(p.by_node))} of {len(p.by_node)} nodes:", "",
                  format_table(("node", "op type", "ms/run", "% of run"), rows), ""]
    return "\n".join(parts).rstrip() + "\n"


def profile_dict(phases: dict[str, PhaseProfile]) -> dict:
    """JSON-ready form of a profile, for the report."""
    return {name: {**asdict(p), "outside_kernels_ms": p.outside_kernels_ms} for name, p in phases.items()}


def profile_report(bundle: str | Path, phases: dict[str, PhaseProfile], prompt_tokens: int, new_tokens: int,
                   threads: int | None) -> dict:
    """The JSON report of `edgekit bench --profile-ops` (kind "profile"): machine, bundle, settings and the
    profile of profile_ops(), for bench.write_report."""
    manifest = read_manifest(bundle, verify=False)  # profile_ops verified it already
    return {
        "report_format": REPORT_FORMAT, "kind": "profile", "edgekit_version": edgekit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": sysinfo.machine_description(),
        "bundle": {"path": str(bundle), "name": Path(bundle).resolve().name,
                   "hash": bundle_hash(manifest), "quantization": to_record(manifest.quantization)},
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads},
        "profile": profile_dict(phases),
    }
