"""Command-line values the benchmarks share, checked while the arguments are parsed: a bad one is a usage error (one
line, exit status 2) before any model is trained or server started, not a traceback after minutes of work, and never
a run that measures nothing (no clients, no seconds) or never ends (a chunk of no requests)."""

from __future__ import annotations

import argparse
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from training.folders import why_unwritable

Number = TypeVar("Number", int, float)
PROJECT = "attention-serving"  # pyproject.toml's name: what makes a folder a checkout of this project


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


def _number(kind: Callable[[str], Number], text: str, what: str) -> Number:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None


def checkout(text: str) -> Path:
    """A folder holding a git checkout of this project (``git worktree add /tmp/before REV``): the benchmark runs its
    server as the design "before" and names its commit."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder (make one with: git worktree add {text} REV)")
    try:
        name = tomllib.loads((path / "pyproject.toml").read_text()).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        name = None
    if name != PROJECT or not (path / "server" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a checkout of {PROJECT} (no pyproject.toml naming it, or "
                                         "no server/__main__.py)")
    head = subprocess.run(["git", "-C", text, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        raise argparse.ArgumentTypeError(f"{text} is not a git checkout: its commit cannot be named")
    return path


def writable_file(text: str) -> Path:
    """A file the benchmark writes when it ends: its folder (made then if missing) must be one this process can write
    in now, so that a typo does not cost the results of a long run."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    _check_writable(path.parent, text)
    return path


def writable_folder(text: str) -> Path:
    """A folder the benchmark writes in (made then if missing)."""
    path = Path(text)
    _check_writable(path, text)
    return path


def _check_writable(folder: Path, text: str) -> None:
    reason = why_unwritable(folder)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {reason}")
