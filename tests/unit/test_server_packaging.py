"""The server stays torch-free, the committed generated protocol code matches the .proto, the dependencies' oldest
allowed versions work (these tests run under `make test-lowest` too), and set-up installs what the machine needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.artifacts import Tokenizer

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


def test_an_empty_hypothesis_decodes_to_nothing() -> None:
    """sentencepiece 0.2.2 (the floor) cannot decode an empty list as a proto; a captioner's warm-up on a blank
    image may give one, and a model that fails its warm-up stops the server."""
    tokenizer = Tokenizer.load(ROOT / "models" / "scenes-sat" / "1" / "spm.model")
    assert tokenizer.decode([]) == ("", [])
    assert tokenizer.decode([tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]) == ("", [])
    text, tokens = tokenizer.decode(tokenizer.encode_ids("a red circle"))
    assert text == "a red circle" and [text[t.start:t.end].strip() for t in tokens] == ["a", "red", "circle"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize(("nvidia_smi", "extras"), [
    ("echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'", "train,dev,gpu"),
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9", "train,dev"),
])
def test_setup_adds_the_gpu_extra_where_nvidia_smi_lists_a_gpu(nvidia_smi: str, extras: str, tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    # -n -B: the commands that would (re)create .venv, printed, none run.
    result = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"-e '.[{extras}]'" in result.stdout
