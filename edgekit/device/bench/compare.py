"""`edgekit bench --compare`: the ratios B / A between two reports, test by test."""

from __future__ import annotations

from edgekit.device.bench.fields import COMPARED
from edgekit.device.bench.report import BenchError, BenchReport, TestResult, as_report
from edgekit.device.table import format_table


def _test(r: TestResult) -> tuple:
    return r.threads, r.prompt_tokens, r.new_tokens


def _ratio(va: object, vb: object) -> str:
    """"x.xx" (vb / va) for two figures, "n/a" when either is missing (None) or va is 0."""
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
        return f"{vb / va:.2f}x"
    return "n/a"


def compare(a: BenchReport | dict, b: BenchReport | dict) -> list[dict[str, str]]:
    """Ratios b / a for every test the two reports share (same threads, prompt and new tokens).

    Each row: threads, prompt, new, and per compared field "x.xx" (b / a), "n/a" when either
    report lacks the figure. Raises BenchError when the reports share no test.
    """
    a, b = as_report(a), as_report(b)
    in_a = {_test(r): r for r in a.results}
    rows = []
    for rb in b.results:
        ra = in_a.get(_test(rb))
        if ra is None:
            continue
        row = {"threads": rb.threads_label, "prompt": str(rb.prompt_tokens), "new": str(rb.new_tokens)}
        for f in COMPARED:
            assert f.compare is not None  # COMPARED holds the fields that have a compare header
            row[f.compare] = _ratio(f.get(a, ra), f.get(b, rb))
        rows.append(row)
    if not rows:
        sa = sorted({_test(r) for r in a.results}, key=str)
        sb = sorted({_test(r) for r in b.results}, key=str)
        raise BenchError(f"the reports share no test (threads, prompt, new tokens): {sa} vs {sb}; "
                         "run both with the same --threads, --prompt-tokens and --new-tokens")
    return rows


def format_compare(a: BenchReport | dict, b: BenchReport | dict, name_a: str, name_b: str) -> str:
    """Who A and B are, which way is better for each figure, and the table of compare()."""
    a, b = as_report(a), as_report(b)
    better = ", ".join(f"{f.compare} {'higher' if f.higher_is_better else 'lower'}" for f in COMPARED)
    rows = compare(a, b)
    return "\n".join([
        f"A: {name_a}: {a.subject}",
        f"B: {name_b}: {b.subject}",
        "ratios B / A (better: " + better + ")",
        "",
        format_table(list(rows[0]), rows, "md"),
    ])
