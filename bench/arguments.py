"""Command-line values the benchmarks share, checked while the arguments are parsed: a bad one is a usage error (one
line, exit status 2) before any model is trained or server started, not a traceback after minutes of work, and never
a run that measures nothing (no clients, no seconds) or never ends (a chunk of no requests)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = _number(int, text, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def at_least_two(text: str) -> int:
    """A count of calls of which the first is reported apart from the later ones."""
    value = _number(int, text, "a whole number")
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 2 or more (the first call and a later one), not {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not value > 0 or value == float("inf"):  # NaN and infinity too: a run of them never ends or never starts
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def _number(kind: type[int] | type[float], text: str, what: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
