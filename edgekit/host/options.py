"""What the user asks of an export, and the checked plan it becomes.

    ExportOptions (flags, None = "not given") ──plan_export()──► ExportPlan (target, flavour, QuantPlan)

`plan_export` applies the target profile's defaults where no flag was given, then checks every
setting in the user's words (the flags they typed), so an export that cannot work fails
before the model loads. The pipeline (export.py) and the quantizer (quant/) read the plan
only, never the raw options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from edgekit.device.targets import Target, TargetError, load_target
from edgekit.errors import ExportError
from edgekit.host.graph import FLAVOURS
from edgekit.host.quant.awq import AWQConfig
from edgekit.host.quant.calibration import calib_file
from edgekit.host.quant.gptq import GPTQConfig
from edgekit.host.quant.plan import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, LM_HEAD, QuantPlan
from edgekit.host.quant.rtn import QuantSpec
from edgekit.host.quant.smoothquant import DEFAULT_ALPHA
from edgekit.quantization import METHODS

# The device an export is for when no --target is given: a generic x86-64 machine, nothing checked.
DEFAULT_TARGET = {"name": "x86-avx2", "arch": "x86_64", "execution_providers": ["CPUExecutionProvider"]}


@dataclass
class ExportOptions:
    """The export's settings as the user gives them; None means "not given" (the target's or the method's default)."""

    context_length: int | None = None  # KV cache length; default min(2048, the model's maximum)
    target: str | None = None  # a targets/ profile name or file (device/targets.py); None: DEFAULT_TARGET
    adapters: list[str] = field(default_factory=list)  # "[name=]path[:weight]" specs (host/adapters.py)
    flavour: str | None = None  # fused | portable (host/graph/); None: the target's, else fused
    chat_template: str | None = None  # an instruction-format name or a Jinja file; None: the model's own
    fit_context: bool = False  # shrink context_length to fit the target's memory instead of refusing
    # quantization (edgekit/quantization.py lists the methods)
    quant: str | None = None  # none | a METHODS name
    bits: int | None = None
    group_size: int | None = None
    sym: bool = False  # symmetric weight grids (no zero points); asymmetric is more accurate at 4 bits
    calib: str | None = None  # a .txt or .jsonl file; None: the built-in default text
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    seed: int = 0
    damp: float | None = None  # gptq dampening, fraction of the Hessian's mean diagonal
    act_order: bool | None = None  # gptq column order by decreasing activation
    awq_grid: int | None = None  # awq scale-search grid points
    alpha: float | None = None  # smoothquant migration strength
    lm_head_bits: int | None = None  # 8 (per channel, default) or 4 (blocks of 32)


@dataclass(frozen=True)
class ExportPlan:
    """An export's checked settings: the options with the target's defaults applied."""

    options: ExportOptions
    target: dict  # the profile as the manifest records it (Target.manifest_dict), or DEFAULT_TARGET
    profile: Target | None  # None without --target: no operator or memory checks
    flavour: str
    quant: QuantPlan | None  # None: fp32 weights


def flag(option: str) -> str:
    """The command-line flag that sets ExportOptions.`option`."""
    return "--no-act-order" if option == "act_order" else f"--{option.replace('_', '-')}"


def plan_export(options: ExportOptions) -> ExportPlan:
    """Check `options` and fill in the defaults; ExportError (in the flags' words) for what cannot work."""
    profile = None
    if options.fit_context and options.target is None:  # it would be silently ignored
        raise ExportError("--fit-context shrinks the context to fit a target's memory; add --target (see "
                          "`edgekit targets`)")
    if options.target is not None:
        try:
            profile = load_target(options.target)
        except TargetError as e:
            raise ExportError(str(e)) from None
        options = with_target_defaults(options, profile)
    flavour = options.flavour or (profile.graph_flavour if profile else "fused")
    if flavour not in FLAVOURS:
        raise ExportError(f"--flavour {flavour} is not a graph flavour; use {' or '.join(FLAVOURS)}")
    if options.context_length is not None and options.context_length < 2:
        raise ExportError(f"--context-length {options.context_length} must be at least 2")
    return ExportPlan(options=options, target=profile.manifest_dict() if profile else dict(DEFAULT_TARGET),
                      profile=profile, flavour=flavour, quant=quant_plan(options))


def with_target_defaults(options: ExportOptions, profile: Target) -> ExportOptions:
    """`options` with the profile's default quantization in every field the user left as None.

    Explicit choices win: a method that is given (including "none") is kept, and so is its
    bits or group size; a method given without them still takes the profile's. Bits that the
    profile's recipe (int4-best) does not offer select the method it is a recipe of.
    """
    defaults = dict(profile.quantization)
    defaults["quant"] = defaults.pop("method")
    names = {f.name for f in fields(options)}
    changes = {}
    if options.quant is None:
        preset = METHODS.get(defaults["quant"])
        if preset and preset.preset_of and options.bits not in (None, *preset.bits):
            defaults["quant"] = preset.preset_of  # a 4-bit recipe and --bits 8: its method, at the bits asked for
        # `sym` is a plain bool (no "not given") and only means something with the method it came with
        changes = {k: v for k, v in defaults.items() if k in names and (getattr(options, k) is None or k == "sym")}
    elif options.quant != "none" and defaults["quant"] != "none":
        changes = {k: defaults[k] for k in ("bits", "group_size") if getattr(options, k) is None and k in defaults}
        if defaults.get("sym"):  # the hardware's need (TensorRT's zero zero-points), whatever the method
            changes["sym"] = True
    return replace(options, **changes)


def quant_plan(options: ExportOptions) -> QuantPlan | None:
    """The quantization settings, checked against the method's row of edgekit/quantization.py."""
    knobs = ("bits", "group_size", "calib", "calib_samples", "calib_seq_len", "damp", "act_order", "awq_grid",
             "alpha", "lm_head_bits")
    if options.quant in (None, "none"):  # settings without a method would be silently ignored: refuse them
        given = [flag(k) for k in knobs if getattr(options, k) is not None] + (["--sym"] if options.sym else [])
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ExportError(f"{', '.join(given)} only {verb} when quantizing; add --quant "
                              f"{', '.join(METHODS)} (or drop them for an fp32 bundle)")
        return None
    method = METHODS.get(options.quant)
    if method is None:
        raise ExportError(f"unknown quantization method {options.quant!r}; choose one of: none, {', '.join(METHODS)}")
    bits = method.bits[0] if options.bits is None else options.bits
    if bits not in method.bits:
        if method.int8_activations:
            raise ExportError(f"{method.name} quantizes weights and activations to 8 bits; --bits {bits} is not "
                              f"supported (use gptq, awq or rtn for 4-bit weights)")
        if method.preset_of:
            raise ExportError(f"--quant {method.name} is a {method.bits[0]}-bit recipe; drop --bits {bits} "
                              f"(or use --quant {method.preset_of} --bits {bits})")
        raise ExportError(f"--bits {bits} is not supported; use {' or '.join(map(str, method.bits))}")
    group_size = method.group_size_for(bits) if options.group_size is None else options.group_size
    if group_size not in method.group_sizes:
        if method.group_sizes == (0,):
            raise ExportError(f"{method.name} uses one scale per output channel; drop --group-size "
                              f"(int8 activations are quantized per tensor, weights per channel)")
        raise ExportError(f"--group-size {group_size} is not supported; use 32, 64, 128, or 0 for per-channel")
    owners = {"damp": "gptq", "act_order": "gptq", "awq_grid": "awq", "alpha": "smoothquant"}
    for knob, owner in owners.items():
        if getattr(options, knob) is not None and METHODS[owner].layer != method.layer:
            raise ExportError(f"{flag(knob)} applies to --quant {owner}, not {method.name}")
    calibrating = [flag(k) for k in ("calib", "calib_samples", "calib_seq_len") if getattr(options, k) is not None]
    if calibrating and not method.calibrated:  # it would be read and silently ignored
        raise ExportError(f"{', '.join(calibrating)} applies to calibrated methods "
                          f"({', '.join(m.name for m in METHODS.values() if m.calibrated)}), not {method.name}")
    damp = GPTQConfig.percdamp if options.damp is None else options.damp
    if not 0 < damp <= 1:
        raise ExportError(f"--damp {damp} is out of range; use a fraction in (0, 1], e.g. 0.01")
    alpha = DEFAULT_ALPHA if options.alpha is None else options.alpha
    if not 0 <= alpha <= 1:
        raise ExportError(f"--alpha {alpha} is out of range; use 0..1 (0.5 suits most models)")
    lm_head_bits = 8 if options.lm_head_bits is None else options.lm_head_bits
    if lm_head_bits not in LM_HEAD:
        raise ExportError(f"--lm-head-bits {lm_head_bits} is not supported; use 8 (default) or 4")
    awq_grid = AWQConfig.n_grid if options.awq_grid is None else options.awq_grid
    if awq_grid < 1:
        raise ExportError(f"--awq-grid {awq_grid} must be at least 1")
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or not 0 <= options.seed < 2**64:
        raise ExportError(f"--seed must be a whole number from 0 to 2**64 - 1, got {options.seed}")
    if options.calib is not None:
        calib_file(options.calib)
    samples = DEFAULT_SAMPLES if options.calib_samples is None else options.calib_samples  # 0 is refused, not "unset"
    seq_len = DEFAULT_SEQ_LEN if options.calib_seq_len is None else options.calib_seq_len
    if samples < 1 or seq_len < 16:
        raise ExportError(f"calibration needs --calib-samples >= 1 and --calib-seq-len >= 16 "
                          f"(got {samples}, {seq_len})")
    return QuantPlan(method=method, spec=QuantSpec(bits, group_size, options.sym), lm_head=LM_HEAD[lm_head_bits],
                     calib=options.calib, samples=samples, seq_len=seq_len, seed=options.seed,
                     gptq=GPTQConfig(percdamp=damp, act_order=options.act_order is not False),
                     awq=AWQConfig(n_grid=awq_grid), alpha=alpha)
