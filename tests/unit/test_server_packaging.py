"""The server stays torch-free, and the committed generated protocol code matches the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_server_and_client_does_not_import_torch() -> None:
    code = (
        "import sys, server, server.app, server.cli, client.cli, client.render\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training', 'exporter')))\n"
        "print(loaded)\nsys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the server imports {result.stdout.strip()} {result.stderr[-2000:]}"


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
