"""The evaluation texts of the quantization benchmark, and exactly how each is extracted.

Out of domain: English texts that every Debian 12 installation has, from packages of
priority "required" (present even in the minimal debian:12 container image), each of a
different kind of writing, and none of them a calibration text:

    licence      /usr/share/common-licenses/GPL-3           (base-files) legal prose, as is
    manpage      /usr/share/man/man1/bash.1.gz              (bash) the bash(1) manual page, roff stripped (strip_roff)
    manual       /usr/share/info/coreutils.info.gz          (coreutils) the GNU Coreutils manual in info format,
                                                            from its "Introduction" node, node headers and menus dropped
    releasenotes /usr/share/doc/bash/NEWS.gz                (bash) bash's release notes, as is

In domain: the two seed documents of ../shared/corpora the benchmark has always
evaluated on (papers about language models). The third, mini-giants-paper.txt, is the
narrow calibration text (--calib) and is never evaluated on.

The default calibration text (pydoc_data.topics, CPython's bundled documentation) is
none of these.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPORA = ROOT.parent / "shared" / "corpora"
CALIB = CORPORA / "mini-giants-paper.txt"  # the narrow --calib of the benchmark

# roff escapes that stand for characters; the rest (\fB, \s-1, \|, ...) only format
_ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"', r"\(oq": "'", r"\(cq": "'",
            r"\(em": "--", r"\(en": "-", r"\(co": "(C)", r"\(bu": "*", r"\e": "\\", r"\(ti": "~", r"\(ha": "^",
            r"\(bv": "|", r"\`": "`", r"\ ": " ", r"\~": " "}
_FORMAT = re.compile(r"\\f(\(..|\[[^]]*\]|.)|\\s[-+]?\d|\\[&|^%:]|\\\*(\(..|\[[^]]*\]|.)|\\n(\(..|.)|\\c")
# macros whose arguments are text (section titles, bold/italic words); every other request only formats
_TEXT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "FN"}
_BREAKS = {"PP", "LP", "P", "SH", "SS", "TP", "IP", "HP", "sp", "br", "RS", "RE"}


def strip_roff(source: str) -> str:
    """The running text of a man page's roff source, as a reader sees it: comments, macro
    definitions and formatting requests dropped, text macros (.SH, .B, .IR, ...) kept as
    their words, font escapes removed, and each paragraph's lines joined (filled) except
    between .nf and .fi, where the lines stay as written."""
    paragraphs: list[list[str]] = [[]]
    skipping, fill = False, True

    def brk() -> None:
        if paragraphs[-1]:
            paragraphs.append([])

    for line in source.splitlines():
        if skipping:  # inside .de ... .. or .ig ... ..
            skipping = not line.startswith("..")
            continue
        if line.startswith((".\\\"", "'\\\"")) or line.strip() == ".":
            continue
        if line.startswith((".de ", ".ig")):
            skipping = True
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].partition(" ")
            words = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
            if name in ("if", "ie"):  # conditional text: keep the nroff branch only
                m = re.match(r"i[fe]\s+n\s+(.*)", line[1:])
                if not m:
                    continue
                line = m.group(1)
            elif name in ("SH", "SS"):  # a heading: a paragraph of its own
                brk()
                paragraphs[-1].append(" ".join(words))
                brk()
                continue
            elif name in _TEXT_MACROS:
                line = " ".join(words)
                if not line:
                    continue
            else:
                if name in _BREAKS:
                    brk()
                if name == "IP" and words:  # .IP tag indent: the tag is text
                    paragraphs[-1].append(words[0])
                if name in ("nf", "fi"):
                    brk()
                    fill = name == "fi"
                continue
        for esc, ch in _ESCAPES.items():
            line = line.replace(esc, ch)
        line = _FORMAT.sub("", line)
        if not fill:
            line += "\n"
        paragraphs[-1].append(line)
    return "\n\n".join(" ".join(p).replace("\n ", "\n").strip() for p in paragraphs if p) + "\n"


def info_text(raw: str, start_node: str) -> str:
    """An info manual's text from node `start_node` on: node separators (0x1f), the
    "File: ..., Node: ..." header lines, menus and the tag table dropped."""
    raw = raw.split("\x1fTag Table:")[0]
    start = raw.index(f"Node: {start_node},")
    out, in_menu = [], False
    for line in raw[start:].split("\n"):
        if line.startswith(("\x1f", "File: ")):
            in_menu = False
            continue
        if line.startswith("* Menu:"):
            in_menu = True
            continue
        if in_menu and (line.startswith("* ") or not line.strip() or line.startswith(" ")):
            continue
        in_menu = False
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _gz(path: str) -> str:
    return gzip.decompress(Path(path).read_bytes()).decode("utf-8", errors="replace")


OUT_OF_DOMAIN = {
    "licence": lambda: Path("/usr/share/common-licenses/GPL-3").read_text(),
    "manpage": lambda: strip_roff(_gz("/usr/share/man/man1/bash.1.gz")),
    "manual": lambda: info_text(_gz("/usr/share/info/coreutils.info.gz"), "Introduction"),
    "releasenotes": lambda: _gz("/usr/share/doc/bash/NEWS.gz"),
}
IN_DOMAIN = {
    "survey": lambda: (CORPORA / "gpt-alternatives-survey.txt").read_text(),
    "ecosystem": lambda: (CORPORA / "llama-ecosystem-overview.txt").read_text(),
}


def texts(names: list[str] | None = None) -> dict[str, str]:
    """name -> text, out-of-domain texts first (all of them when `names` is None)."""
    every = {**OUT_OF_DOMAIN, **IN_DOMAIN}
    return {n: every[n]() for n in (names or every)}


if __name__ == "__main__":  # python benchmarks/quantization/texts.py [NAME]: print a text, or sizes of all
    import sys

    if len(sys.argv) > 1:
        print(texts([sys.argv[1]])[sys.argv[1]], end="")
    else:
        for n, t in texts().items():
            print(f"{n:13s} {len(t):7d} chars  {t[:70]!r}")
