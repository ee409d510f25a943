"""Will a bundle run on a device, and in how much memory?

Two checks, both usable on the host at export time and on the device (`edgekit check`),
with nothing but the standard library and onnxruntime:

- operators: every operator of the graph (recorded in the manifest at export) against
  the kernels of the target's execution providers, in preference order. An operator the
  first provider lacks falls back to the next (onnxruntime assigns it there: slower,
  with copies between devices); one that no provider implements makes the session fail.
- memory: peak resident memory estimated from the weights, the KV cache at the context
  length, activations of one run of the prompt (at most PREFILL_ROWS tokens), and the runtime itself; compared with
  the target's RAM minus what its OS keeps.

Sources of the operator tables:
- CPUExecutionProvider: the installed onnxruntime's own kernel registry
  (onnxruntime.capi._pybind_state.get_all_opkernel_def), the same table as
  onnxruntime's docs/OperatorKernels.md for the installed version.
- CUDAExecutionProvider: maintained below from onnxruntime's docs/OperatorKernels.md,
  CUDA section (onnxruntime 1.20+), for the operators edgekit's graphs use.
- TensorrtExecutionProvider: maintained below from onnx-tensorrt's docs/operators.md
  (TensorRT 10.x) and NVIDIA's "Explicit Quantization" guide (INT4 weight-only blocked
  DequantizeLinear), for the operators edgekit's graphs use. onnxruntime hands any node
  TensorRT cannot take to the next provider.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.device.bundle import Architecture, read_manifest
from edgekit.device.generate import PREFILL_ROWS
from edgekit.device.targets import TargetError, available_targets, load_target, parse_target
from edgekit.errors import InputError

log = logging.getLogger("edgekit")

# operators of the default domain are checked at the graph's opset; com.microsoft at 1
OPSETS = {"ai.onnx": 21, "com.microsoft": 1}

# Maintained tables: "domain::Op" -> None (float32 supported) or a reason it is not usable
# for edgekit's float32 graphs. Operators absent from a table are not implemented there.
_STANDARD_OPS = [
    "Add", "And", "Cast", "Clip", "Concat", "DequantizeLinear", "Div", "Expand", "Gather", "Gemm", "Greater",
    "GreaterOrEqual", "Identity", "If", "LayerNormalization", "LessOrEqual", "MatMul", "Mul", "Neg", "Range",
    "ReduceMax", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Sub",
    "Tanh", "Transpose", "Unsqueeze", "Where",
]
CUDA_OPS: dict[str, str | None] = {f"ai.onnx::{op}": None for op in _STANDARD_OPS}
CUDA_OPS.update({
    # ai.onnx::Gelu (opset 20) has no CUDA kernel: absent, so the portable graph's Gelu runs on the CPU
    # contrib kernels registered in the default domain / com.microsoft by the CUDA EP
    "ai.onnx::SimplifiedLayerNormalization": None,
    "com.microsoft::SkipSimplifiedLayerNormalization": None,
    "com.microsoft::SkipLayerNormalization": None,
    "com.microsoft::Gelu": None,
    "com.microsoft::FastGelu": None,
    "com.microsoft::MatMulNBits": None,
    # the CUDA kernel is registered for float16 and bfloat16 only: a float32 graph's
    # attention runs on the CPU
    "com.microsoft::GroupQueryAttention": "CUDA kernel is float16/bfloat16 only, the graph is float32",
    # com.microsoft::DynamicQuantizeMatMul: CPU only (absent)
})
TENSORRT_OPS: dict[str, str | None] = {f"ai.onnx::{op}": None for op in [*_STANDARD_OPS, "Gelu"]}
# TensorRT has no onnxruntime contrib operators (SimplifiedLayerNormalization, GroupQueryAttention,
# MatMulNBits, ...): they are absent, so they fall back to CUDA or CPU.
MAINTAINED = {"CUDAExecutionProvider": CUDA_OPS, "TensorrtExecutionProvider": TENSORRT_OPS}
SOURCES = {
    "CPUExecutionProvider": "the installed onnxruntime's kernel registry",
    "CUDAExecutionProvider": "onnxruntime docs/OperatorKernels.md (CUDA), maintained in edgekit/device/check.py",
    "TensorrtExecutionProvider": "onnx-tensorrt docs/operators.md (TensorRT 10), maintained in edgekit/device/check.py",
}


def cpu_kernels() -> dict[str, list[tuple[int, int]]]:
    """"domain::Op" -> opset version ranges the installed onnxruntime's CPU provider implements."""
    import onnxruntime.capi._pybind_state as C

    table: dict[str, list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            table.setdefault(f"{k.domain or 'ai.onnx'}::{k.op_name}", []).append(tuple(k.version_range))
    return table


def implements(provider: str, op: str, cpu: dict | None = None) -> tuple[bool, str]:
    """Whether `provider` runs `op` ("domain::Op") in a float32 graph, and if not, why."""
    if provider == "CPUExecutionProvider":
        cpu = cpu if cpu is not None else cpu_kernels()
        version = OPSETS.get(op.split("::")[0], 1)
        ranges = cpu.get(op, [])
        if any(lo <= version <= hi for lo, hi in ranges):
            return True, ""
        return False, "no CPU kernel" if not ranges else f"no CPU kernel for opset {version}"
    table = MAINTAINED.get(provider)
    if table is None:
        return False, f"edgekit has no operator table for {provider}"
    if op not in table:
        return False, f"not implemented by {provider}"
    reason = table[op]
    return reason is None, reason or ""


@dataclass
class OperatorReport:
    """Where each operator of a graph would run on a target."""

    providers: list[str]
    placement: dict[str, str] = field(default_factory=dict)  # op -> the provider that takes it
    fallbacks: dict[str, str] = field(default_factory=dict)  # op -> why the first provider does not
    unsupported: dict[str, str] = field(default_factory=dict)  # op -> why no provider does

    def summary(self) -> str:
        first = self.providers[0]
        if self.unsupported:
            return (f"{len(self.unsupported)} operator(s) no execution provider implements: "
                    + ", ".join(f"{op} ({why})" for op, why in sorted(self.unsupported.items())))
        if self.fallbacks:
            return f"{len(self.fallbacks)} operator(s) fall back from {first}"
        return f"all {len(self.placement)} operators run on {first}"

    def lines(self) -> list[str]:
        out = [f"operators: {self.summary()}"]
        for op, why in sorted(self.fallbacks.items()):
            out.append(f"  warning: {op} falls back to {self.placement[op]} ({why})")
        return out


def check_operators(operators: list[str], providers: list[str]) -> OperatorReport:
    """Place every operator on the first of `providers` implementing it (onnxruntime's rule)."""
    report = OperatorReport(list(providers))
    cpu = cpu_kernels() if "CPUExecutionProvider" in providers else None
    for op in operators:
        reasons: list[str] = []
        for p in providers:
            ok, why = implements(p, op, cpu)
            if ok:
                report.placement[op] = p
                if p != providers[0]:
                    report.fallbacks[op] = "; ".join(reasons)
                break
            reasons.append(f"{p}: {why}")
        else:
            report.unsupported[op] = "; ".join(reasons)
    return report


# -- memory ---------------------------------------------------------------------------

MB = 1 << 20
# Measured on x86-64 with onnxruntime 1.32, Python 3.11 (docs/targets.md, tests/test_targets.py):
RUNTIME_MB = 60.0  # python + onnxruntime + numpy + tokenizers imported, a tokenizer loaded
# onnxruntime's pre-packed weight copies and arena slack, per byte of weights on disk: MLAS packs
# each fp32 MatMul's B; MatMulNBits repacks its blocks, for fp32 compute (accuracy_level < 4) into a
# much larger layout than for the int8 kernels (level 4). Fitted to the peak with a 2000-token prompt
# (docs/targets.md), SmolLM2-135M bundles: fp32 0.05 (fused) / 0.10 (portable), int4 level 4 -0.04
# (fused) / 0.25 (portable, DequantizeLinear fused by onnxruntime), int4 level 1 0.82; the larger of each.
WEIGHT_OVERHEAD = {"fp32": 0.10, "int8-compute": 0.25, "fp32-compute": 0.85}


@dataclass
class MemoryEstimate:
    """Peak resident memory of generating with a bundle, in MB."""

    weights_mb: float
    weight_overhead_mb: float
    kv_cache_mb: float
    activations_mb: float
    runtime_mb: float
    context_length: int

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.weight_overhead_mb + self.kv_cache_mb + self.activations_mb + self.runtime_mb

    def describe(self) -> str:
        return (f"about {self.total_mb:.0f} MB (weights {self.weights_mb:.0f} + runtime copies "
                f"{self.weight_overhead_mb:.0f} + KV cache {self.kv_cache_mb:.0f} at {self.context_length} tokens "
                f"+ activations {self.activations_mb:.0f} + runtime {self.runtime_mb:.0f})")


def estimate_memory(arch: Architecture, weight_bytes: int, flavour: str = "fused",
                    context_length: int | None = None, prompt_tokens: int | None = None,
                    quantized: bool = False, accuracy_level: int = 4) -> MemoryEstimate:
    """Peak memory of a bundle whose initializers take `weight_bytes`, at `context_length`
    (default: the bundle's) with a prompt of `prompt_tokens` (default: the whole context,
    the worst case). Model.prefill feeds a prompt in runs of at most PREFILL_ROWS tokens, so a
    run's activations are those of that many rows however long the prompt.

    Fused: one KV buffer pair per layer at the context length, written in place; attention
    inside GroupQueryAttention, whose scores take (heads, rows, context). Portable: the cache
    buffers, plus the past fed to the run and the present it returns (3 copies at full length),
    and a layer's attention scores, their scaled and masked sum and the probabilities, (heads,
    rows, T) each, materialized.
    """
    ctx = context_length or arch.context_length
    rows = min(prompt_tokens or ctx, ctx, PREFILL_ROWS)
    f32 = 4
    kv = 2 * arch.num_layers * arch.num_kv_heads * ctx * arch.head_size * f32
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_size
    # a layer's live tensors during a run: residual, norms, qkv, attention out, three MLP intermediates,
    # the attention scores; logits of the last position only (num_logits_to_keep = 1)
    scores = arch.num_heads * rows * ctx * f32
    acts = rows * (6 * arch.hidden_size + 3 * arch.intermediate_size + qkv) * f32 + scores + arch.vocab_size * f32
    if flavour == "portable":
        kv *= 3
        acts += 2 * scores  # scaled + masked, probabilities
    return MemoryEstimate(
        weights_mb=weight_bytes / MB,
        weight_overhead_mb=weight_bytes * WEIGHT_OVERHEAD[_weight_kind(quantized, accuracy_level)] / MB,
        kv_cache_mb=kv / MB,
        activations_mb=acts / MB,
        runtime_mb=RUNTIME_MB,
        context_length=ctx,
    )


def _weight_kind(quantized: bool, accuracy_level: int) -> str:
    if not quantized:
        return "fp32"
    return "int8-compute" if accuracy_level >= 4 else "fp32-compute"


def available_mb(target: dict, ram_gb: float | None = None) -> float:
    """Memory a bundle may use on `target` (a profile's manifest dict): RAM minus what the OS keeps."""
    ram = ram_gb if ram_gb is not None else target["ram_gb"]
    return (ram - target.get("os_reserved_gb", 0.5)) * 1024


def largest_context(arch: Architecture, weight_bytes: int, flavour: str, budget_mb: float,
                    quantized: bool = False, accuracy_level: int = 4, step: int = 64) -> int | None:
    """The largest context length (a multiple of `step`, at most the bundle's) that fits in
    `budget_mb`, or None when even `step` tokens do not."""
    best = None
    ctx = step
    while ctx <= arch.context_length:
        if estimate_memory(arch, weight_bytes, flavour, ctx, quantized=quantized,
                           accuracy_level=accuracy_level).total_mb <= budget_mb:
            best = ctx
        else:
            break
        ctx += step
    return best


def bundle_weight_bytes(folder: str | Path) -> int:
    """The bytes a bundle's graph and weights take on disk (model.onnx and its external data)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("model.onnx"))


# -- the verdict ----------------------------------------------------------------------


@dataclass
class Verdict:
    """Will a bundle run on a target: the operator and memory checks as data; `edgekit check` prints lines()."""

    bundle: str
    summary: str  # the bundle in one line: graph flavour, quantization, the target it was built for
    target: dict  # the profile checked against (its manifest dict)
    notes: list[str]  # differences between the bundle's own target and this one worth knowing
    operators: OperatorReport | None  # None: the bundle does not record its operators (and onnx is absent)
    memory: MemoryEstimate
    available_mb: float
    ram_gb: float
    fit_context: bool = False  # asked for the largest context length that fits, when the bundle's does not
    fitting_context: int | None = None  # that length (None: none fits, or not asked)

    @property
    def fits(self) -> bool:
        return self.memory.total_mb <= self.available_mb

    @property
    def runs(self) -> bool:
        """Every operator has a provider, and the bundle fits at its context length or at the fitted one."""
        operators_ok = self.operators is None or not self.operators.unsupported
        return operators_ok and (self.fits or self.fitting_context is not None)

    def lines(self) -> list[str]:
        t = self.target
        out = [f"bundle   {self.bundle}: {self.summary}", f"target   {t['name']}: {t['description']}"]
        out += [f"  note: {n}" for n in self.notes]
        if self.operators is None:
            out.append("operators: not recorded in this bundle's manifest (exported before edgekit recorded them); "
                       "skipped")
        else:
            out += self.operators.lines()
            out += [f"  {p}: table from {SOURCES.get(p, 'unknown')}"
                    for p in dict.fromkeys(self.operators.placement.values())]
        out.append(f"memory   {self.memory.describe()}")
        out.append(f"         available: {self.available_mb:.0f} MB ({self.ram_gb:g} GB RAM - "
                   f"{t.get('os_reserved_gb', 0.5):g} GB for the OS)")
        if not self.fits and self.fitting_context is not None:
            n = self.fitting_context
            out.append(f"fits with context length {n}: run with Model(bundle, context_length={n}), "
                       f"or re-export with --context-length {n}")
        elif not self.fits and self.fit_context:
            out.append("does not fit at any context length: the weights alone exceed the memory; "
                       "quantize to fewer bits")
        elif not self.fits:
            out.append(f"does not fit: about {self.memory.total_mb:.0f} MB needed, {self.available_mb:.0f} MB "
                       "available; pass --fit-context for the largest context length that fits")
        out.append(f"verdict  {'will run' if self.runs else 'will NOT run'} on {t['name']}")
        return out


def check_bundle(bundle: str | Path, target: str | None = None, ram_gb: float | None = None,
                 context_length: int | None = None, prompt_tokens: int | None = None,
                 fit_context: bool = False) -> Verdict:
    """Check `bundle` against `target` (a profile name or .json file; default: the one it was built
    for): its operators on the target's execution providers, its peak memory at `context_length`
    (default: the bundle's) against the target's RAM (or `ram_gb`). TargetError when there is no
    target to check against; InputError for a context length beyond the bundle's."""
    m = read_manifest(bundle)
    built_for = m.target.name
    name = target or built_for
    if not name:
        raise TargetError(f"{bundle} records no target; pass --target (see `edgekit targets`)")
    if target is None and name not in available_targets():  # built from a profile file: the manifest holds it
        t = m.target
        recorded = {**t.extra, "name": t.name, "threads": t.threads, "execution_providers": t.execution_providers,
                    "session_config": t.session_config, "matmulnbits_accuracy_level": t.matmulnbits_accuracy_level}
        profile = parse_target(recorded, f"{bundle}'s manifest").manifest_dict()
    else:
        profile = load_target(name).manifest_dict()
    arch = m.architecture
    flavour = m.graph.flavour
    ctx = arch.context_length if context_length is None else context_length
    if not 2 <= ctx <= arch.context_length:
        raise InputError(f"--context-length {ctx} must be from 2 to the bundle's {arch.context_length}")
    if prompt_tokens is not None and not 1 <= prompt_tokens <= ctx:
        raise InputError(f"--prompt-tokens {prompt_tokens} must be from 1 to the context length {ctx}")
    if ram_gb is not None and not (math.isfinite(ram_gb) and ram_gb > 0):
        raise InputError(f"--ram-gb must be a number of gigabytes above 0, got {ram_gb}")
    notes = []
    if built_for != profile["name"]:
        notes.append(f"the bundle was built for {built_for}; it keeps that target's settings (threads, "
                     f"MatMulNBits accuracy level). Re-export with --target {profile['name']} to get this one's.")
    if m.target.arch and m.target.arch != profile["cpu"]["arch"]:
        notes.append(f"built for {m.target.arch}, checking on {profile['cpu']['arch']}: bundles are "
                     "architecture-independent, the runtime's wheel is not")
    ops = m.graph.operators or _operators_from_model(bundle)
    # what export sized memory by, so that check agrees with --fit-context at the limit; the files for older bundles
    weights = m.graph.weight_bytes or bundle_weight_bytes(bundle)
    quantized = m.quantization.method != "none"
    level = m.target.matmulnbits_accuracy_level  # what the bundle's graph was built with
    budget = available_mb(profile, ram_gb)
    verdict = Verdict(
        bundle=str(bundle),
        summary=f"{arch.model_type}, {flavour} graph, quantization {m.quantization.label}, "
                f"built for {built_for}",
        target=profile, notes=notes,
        operators=None if ops is None else check_operators(ops, profile["execution_providers"]),
        memory=estimate_memory(arch, weights, flavour, ctx, prompt_tokens, quantized, level),
        available_mb=budget, ram_gb=ram_gb if ram_gb is not None else profile["ram_gb"], fit_context=fit_context)
    if fit_context and not verdict.fits:
        verdict.fitting_context = largest_context(arch, weights, flavour, budget, quantized, level)
    return verdict


def _operators_from_model(bundle: str | Path) -> list[str] | None:
    """The operators of an older bundle whose manifest does not list them, when the onnx
    package is installed (on a host); None otherwise."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(Path(bundle) / "model.onnx"), load_external_data=False)
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})
