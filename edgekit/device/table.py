"""Tables as text: the one printer behind every table edgekit prints (bench, eval, targets, op profiles).

    md     a GitHub markdown table, columns padded so it also reads well in a terminal
    csv    comma-separated values, header first
    text   plain columns two spaces apart, no rules (a terminal listing)

Cells are printed with str(); callers format numbers and say "n/a" themselves.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

STYLES = ("md", "csv", "text")


def format_table(columns: Sequence[str], rows: Sequence[Sequence | Mapping], style: str = "md",
                 align: str | None = None) -> str:
    """`rows` under the headers `columns`, in `style`; the lines joined by newlines, no newline at the end.

    A row is a sequence of cells in column order, or a mapping from each column's header to its cell.
    `align` has one character per column, "<" (left) or ">" (right), for the cells of md and text
    tables; by default md cells are right-aligned (llama-bench's look) and text cells left-aligned.
    Headers are always left-aligned. csv ignores `align`.
    """
    if style not in STYLES:
        raise ValueError(f"unknown table style {style!r}; choose from {', '.join(STYLES)}")
    cells = [[str(row[h]) for h in columns] if isinstance(row, Mapping) else [str(c) for c in row] for row in rows]
    if any(len(row) != len(columns) for row in cells):
        raise ValueError(f"every row needs {len(columns)} cells, one per column")
    if style == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(cells)
        return buf.getvalue().removesuffix("\n")
    align = align or (">" if style == "md" else "<") * len(columns)
    if len(align) != len(columns):
        raise ValueError(f"align has {len(align)} characters for {len(columns)} columns")
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(columns)]
    head = [h.ljust(w) for h, w in zip(columns, widths, strict=True)]
    body = [[c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True)]
            for row in cells]
    if style == "text":
        return "\n".join("  ".join(row).rstrip() for row in [head, *body])
    line = lambda row: "| " + " | ".join(row) + " |"  # noqa: E731
    return "\n".join([line(head), line("-" * w for w in widths), *map(line, body)])
