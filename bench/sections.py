"""A benchmark's section of docs/benchmarks.md: the text between its two markers, replaced on every run, so that
several benchmarks write one document without overwriting each other."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_line(script: str, argv: list[str] | None) -> str:
    """How ``bench/<script>`` was run, with ``argv`` (None: this process's own arguments): what a section quotes so
    that its numbers can be reproduced, a baseline or a shorter run included."""
    return shlex.join([".venv/bin/python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def shown(path: Path) -> str:
    """``path`` as a section names the results file it was written beside: relative to the checkout when in it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def replace_section(report: Path, begin: str, end: str, lines: list[str]) -> None:
    """Writes ``lines`` (which start with ``begin`` and end with ``end``) in place of the marked section of
    ``report``, or appends them when the report has none."""
    text = report.read_text() if report.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + "\n".join(lines) + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
