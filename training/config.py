"""What the fields of a run's config dataclass mean: help text and allowed values, kept in the field's metadata.

``attn-train --help``, its choices and the config's own checks are generated from it, as
:class:`server.settings.Settings` does for the server: the dataclass stays the one description of a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field, fields
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


class InputError(ValueError):
    """A mistake in what the user gave a run (a corpus, a checkpoint, a device) found while running: ``attn-train``
    prints its one-line message and exits 1. A ValueError, so that library callers catching those still do; the CLI
    catches only this class, so a genuine bug still shows its traceback."""


def option(default: Any, help: str, choices: Sequence[str] | None = None, on_resume: bool = False) -> Any:
    """A config field with its ``help`` and, where the value is one of a fixed set, its ``choices``. An
    ``on_resume`` field may be given anew when a run is resumed (the schedule, the run folder, the threads); every
    other field is the saved run's, since the weights were trained for it."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "on_resume": on_resume})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(
    config: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = (), fractions: Sequence[str] = ()
) -> None:
    """Raise ``ValueError`` naming the flag of the first field outside its choices, or of the named fields not
    positive, negative, or outside [0, 1) (NaN is none of these)."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{flag(f.name)} must be one of {', '.join(choices)}, not {value!r}")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{flag(name)} must be positive, not {getattr(config, name)}")
    for name in non_negative:
        if not getattr(config, name) >= 0:  # `not >=` rather than `<`: NaN fails every comparison
            raise ValueError(f"{flag(name)} must not be negative, not {getattr(config, name)}")
    for name in fractions:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{flag(name)} must be in [0, 1), not {getattr(config, name)}")
