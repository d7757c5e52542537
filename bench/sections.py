"""A benchmark's section of docs/benchmarks.md: the text between its two markers, replaced on every run, so that
several benchmarks write one document without overwriting each other."""

from __future__ import annotations

from pathlib import Path


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
