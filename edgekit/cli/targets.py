"""`edgekit targets` (the device profiles) and `edgekit check` (will this bundle run there?).

Both are device-side: they run on the device itself with the runtime installed.
"""

from __future__ import annotations


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
    from edgekit.device.table import format_table
    from edgekit.device.targets import available_targets, load_target

    rows = []
    for name, path in sorted(available_targets().items()):
        t = load_target(path)
        q = t.quantization
        # bits and group size are optional: a preset (int4-best) chooses its own
        quant = " ".join([q["method"], *([f"int{q['bits']}"] if "bits" in q else []),
                          *([f"g{q['group_size']}"] if "group_size" in q else []), *(["sym"] if q.get("sym") else [])])
        ram = "/".join(f"{r:g}" for r in t.ram_variants_gb) if t.ram_variants_gb else f"{t.ram_gb:g}"
        eps = ",".join(e.replace("ExecutionProvider", "") for e in t.execution_providers)
        cpu = f"{t.arch} {t.cpu.get('model', '')} x{t.cpu['cores']}: {' '.join(t.cpu['isa'])}"
        rows.append((name, cpu, f"{ram} GB", eps, t.graph_flavour, quant, str(t.threads or "auto")))
        if args.verbose_paths:
            rows.append(("", str(path), "", "", "", "", ""))
    print(format_table(("NAME", "CPU / ISA", "RAM", "EXECUTION PROVIDERS", "GRAPH", "DEFAULT QUANT", "THREADS"),
                       rows, "text"))
    return 0


def _run_check(args) -> int:
    from edgekit.device.check import check_bundle

    verdict = check_bundle(args.bundle, args.target, args.ram_gb, args.context_length, args.prompt_tokens,
                           args.fit_context)
    print("\n".join(verdict.lines()))
    return 0 if verdict.runs else 1
