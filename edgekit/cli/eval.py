"""`edgekit eval`: measure bundles on a text with the device runtime.

    edgekit eval perplexity BUNDLE --text FILE
    edgekit eval compare B1 B2 ... --text FILE      # size on disk, perplexity, delta vs B1
"""

from __future__ import annotations

from pathlib import Path

from edgekit.cli import THREADS_DEFAULT
from edgekit.device.perplexity import DEFAULT_WINDOW, EvalTextError, perplexity, read_eval_text
from edgekit.device.table import format_table
from edgekit.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure bundles: perplexity on a text (device side)")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")

    one = ev.add_parser("perplexity", help="perplexity of one bundle on a text",
                        description="Perplexity of BUNDLE on --text, computed by the device runtime over "
                                    "non-overlapping windows of --window tokens.")
    one.add_argument("bundle")
    _common(one)
    one.set_defaults(run=_run_perplexity)

    many = ev.add_parser("compare", help="size and perplexity of several bundles, against the first",
                         description="A table of size on disk, perplexity and its change from the first "
                                     "bundle, for each BUNDLE on the same --text.")
    many.add_argument("bundles", nargs="+")
    _common(many)
    many.set_defaults(run=_run_compare)


def _common(p) -> None:
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--window", type=int, help=f"tokens per window (default {DEFAULT_WINDOW}, or the shortest "
                                              "context of the bundles when that is less)")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    p.add_argument("--threads", type=int, help=f"onnxruntime intra-op threads (default: {THREADS_DEFAULT})")


def _window(args, bundles: list[str]) -> int:
    """--window, or DEFAULT_WINDOW shrunk to the shortest context among `bundles`, so that
    every bundle of a comparison is scored on the same windows (perplexity() checks the size)."""
    from edgekit.device.bundle import read_manifest

    if args.window is not None:
        return args.window
    rooms = []
    for b in bundles:
        m = read_manifest(b, verify=False)
        rooms.append(m.architecture.context_length - (m.prefix.length if m.prefix else 0))
    return min(DEFAULT_WINDOW, *rooms)


def _measure(bundle: str, text: str, window: int, args):
    from edgekit.device import Model

    try:
        return perplexity(Model(bundle, threads=args.threads), text, window, args.max_tokens)
    except EvalTextError as e:  # printed as one line by the CLI
        raise UserError(str(e)) from None


def _read(path: str) -> str:

    try:
        return read_eval_text(path)
    except EvalTextError as e:
        raise UserError(str(e)) from None


def bundle_mb(bundle: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(bundle).iterdir() if p.is_file()) / 1e6


def _run_perplexity(args) -> int:
    text = _read(args.text)
    r = _measure(args.bundle, text, _window(args, [args.bundle]), args)
    print(f"perplexity {r.perplexity:.4f}  ({r.tokens} tokens scored in {r.windows} windows of {r.window}, "
          f"{r.seconds:.1f}s)")
    return 0


def _run_compare(args) -> int:
    from edgekit.device.bundle import read_manifest

    text = _read(args.text)
    window = _window(args, args.bundles)
    rows = []
    for b in args.bundles:
        label = read_manifest(b, verify=False).quantization.label
        rows.append((b, label, bundle_mb(b), _measure(b, text, window, args)))
    first = rows[0][3].perplexity
    cells = [(b, label, f"{mb:.1f}", f"{r.perplexity:.4f}", f"{(r.perplexity / first - 1) * 100:+.2f}%")
             for b, label, mb, r in rows]
    print(format_table(("bundle", "quantization", "size MB", "perplexity", "delta"), cells, "text", align="<<>>>"))
    print(f"({rows[0][3].tokens} tokens, non-overlapping windows of {window})")
    return 0
