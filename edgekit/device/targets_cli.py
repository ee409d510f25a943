"""`edgekit targets` (the device profiles) and `edgekit check` (will this bundle run there?).

Both are device-side: they run on the device itself with the runtime installed.
"""

from __future__ import annotations

import sys

from edgekit.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("targets", help="list the device profiles (targets/)",
                       description="List the device profiles export --target and check --target accept.")
    p.add_argument("--verbose-paths", action="store_true", help="also show each profile's file")
    p.set_defaults(run=_run_targets)

    p = sub.add_parser("check", help="will a bundle run on a target, and in how much memory?",
                       description="Check a bundle against a device profile: every operator on the target's "
                                   "execution providers, and the peak memory at the context length against "
                                   "its RAM. Exit code 0: it will run; 1: it will not.")
    p.add_argument("bundle")
    p.add_argument("--target", help="profile name or .json file (default: the one the bundle was built for)")
    p.add_argument("--ram-gb", type=float, help="the device's RAM, when it differs from the profile's")
    p.add_argument("--context-length", type=int, help="check at this context length (default: the bundle's)")
    p.add_argument("--prompt-tokens", type=int, help="longest prompt expected (default: the whole context)")
    p.add_argument("--fit-context", action="store_true",
                   help="when it does not fit, report the largest context length that does")
    p.set_defaults(run=_run_check)


def _run_targets(args) -> int:
    from edgekit.device.targets import available_targets, load_target

    rows = [("NAME", "CPU / ISA", "RAM", "EXECUTION PROVIDERS", "GRAPH", "DEFAULT QUANT", "THREADS")]
    for name, path in sorted(available_targets().items()):
        t = load_target(path)
        q = t.quantization
        quant = "none" if q["method"] == "none" else \
            f"{q['method']} int{q['bits']} g{q['group_size']}{' sym' if q.get('sym') else ''}"
        ram = "/".join(f"{r:g}" for r in t.ram_variants_gb) if t.ram_variants_gb else f"{t.ram_gb:g}"
        eps = ",".join(e.replace("ExecutionProvider", "") for e in t.execution_providers)
        cpu = f"{t.arch} {t.cpu.get('model', '')} x{t.cpu['cores']}: {' '.join(t.cpu['isa'])}"
        rows.append((name, cpu, f"{ram} GB", eps, t.graph_flavour, quant, str(t.threads or "auto")))
        if args.verbose_paths:
            rows.append(("", str(path), "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _run_check(args) -> int:
    from edgekit.device import check
    from edgekit.device.bundle import read_manifest
    from edgekit.device.targets import load_target

    m = read_manifest(args.bundle)
    spec = args.target or m.target.get("name")
    if not spec:
        raise UserError(f"{args.bundle} records no target; pass --target (see `edgekit targets`)")
    target = load_target(spec).manifest_dict()
    arch = m.architecture
    flavour = m.graph.get("flavour", "fused")
    ctx = args.context_length or arch.context_length
    if ctx > arch.context_length:
        raise UserError(f"--context-length {ctx} is longer than the bundle's {arch.context_length}")
    print(f"bundle   {args.bundle}: {arch.model_type}, {flavour} graph, quantization {m.quantization.get('method')}, "
          f"built for {m.target.get('name')}")
    print(f"target   {target['name']}: {target['description']}")
    ok = True
    if m.target.get("name") != target["name"]:
        print(f"  note: the bundle was built for {m.target.get('name')}; it keeps that target's settings "
              f"(threads, MatMulNBits accuracy level). Re-export with --target {target['name']} to get this one's.")
    if m.target.get("arch") and m.target.get("arch") != target["cpu"]["arch"]:
        print(f"  note: built for {m.target['arch']}, checking on {target['cpu']['arch']}: bundles are "
              "architecture-independent, the runtime's wheel is not")

    ops = m.graph.get("operators") or _operators_from_model(args.bundle)
    if ops is None:
        print("operators: not recorded in this bundle's manifest (exported before edgekit recorded them); skipped")
    else:
        report = check.check_operators(ops, target["execution_providers"])
        for line in report.lines():
            print(line)
        for p in dict.fromkeys(report.placement.values()):
            print(f"  {p}: table from {check.SOURCES.get(p, 'unknown')}")
        if report.unsupported:
            ok = False

    budget = check.available_mb(target, args.ram_gb)
    weights = check.bundle_weight_bytes(args.bundle)
    quantized = m.quantization.get("method", "none") != "none"
    level = m.target.get("matmulnbits_accuracy_level", 4)  # what the bundle's graph was built with
    est = check.estimate_memory(arch, weights, flavour, ctx, args.prompt_tokens, quantized, level)
    ram = args.ram_gb if args.ram_gb is not None else target["ram_gb"]
    print(f"memory   {est.describe()}")
    print(f"         available: {budget:.0f} MB ({ram:g} GB RAM - {target.get('os_reserved_gb', 0.5):g} GB for the OS)")
    if est.total_mb > budget:
        ok = False
        if args.fit_context:
            n = check.largest_context(arch, weights, flavour, budget, quantized, level)
            if n is None:
                print("does not fit at any context length: the weights alone exceed the memory; quantize to fewer bits")
            else:
                print(f"fits with context length {n}: run with Model(bundle, context_length={n}), "
                      f"or re-export with --context-length {n}")
                return 0
        else:
            print(f"does not fit: about {est.total_mb:.0f} MB needed, {budget:.0f} MB available; "
                  "pass --fit-context for the largest context length that fits")
    print("verdict  " + ("will run" if ok else "will NOT run") + f" on {target['name']}")
    sys.stdout.flush()
    return 0 if ok else 1


def _operators_from_model(bundle) -> list[str] | None:
    """The operators of an older bundle whose manifest does not list them, when the onnx
    package is installed (on a host); None otherwise."""
    try:
        import onnx
    except ImportError:
        return None
    from pathlib import Path

    model = onnx.load(str(Path(bundle) / "model.onnx"), load_external_data=False)
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})
