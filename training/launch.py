"""The ``attn-train`` and ``attn-export`` commands' entry points: each imports its command (torch and onnx take a
second or more) where a Ctrl-C during that import ends it with one line and exit 130, as one during the run does,
instead of Python's traceback through the import machinery."""

from __future__ import annotations

import importlib
import sys


def _run(program: str, module: str, argv: list[str] | None) -> int:
    try:
        command = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"{program}: interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    return int(command(argv))


def attn_train(argv: list[str] | None = None) -> int:
    return _run("attn-train", "training.cli", argv)


def attn_export(argv: list[str] | None = None) -> int:
    return _run("attn-export", "exporter.cli", argv)
