"""The server stays torch-free, the committed generated protocol code matches the .proto, the dependencies' oldest
allowed versions work (these tests run under `make test-lowest` too), and set-up installs what the machine needs."""

from __future__ import annotations

import os
import re
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


def _fake_venv(folder: Path) -> Path:
    """A virtual environment whose attn-serve prints the port it was given, so that `make run` returns at once."""
    (folder / "bin").mkdir(parents=True)
    serve = folder / "bin" / "attn-serve"
    serve.write_text("#!/bin/sh\necho \"attn-serve on ${ATTN_PORT:-50051}\"\n")
    serve.chmod(0o755)
    (folder / ".installed").touch()
    return folder


def _make_run(venv: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`make run` with ``venv``'s stand-in attn-serve, set-up taken as done (-o): nothing is installed."""
    installed = str(venv / ".installed")
    result = subprocess.run(["make", "-s", "-o", installed, "run", f"VENV={venv}", f"DING={installed}",
                             f"PROMETHEUS={installed}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize(("port", "target"), [(None, ""), ("51999", " --target localhost:51999")])
def test_make_run_suggests_commands_that_reach_the_port_it_serves_on(port: str | None, target: str,
                                                                     tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTN_")}
    if port:
        env["ATTN_PORT"] = port
    result = _make_run(venv, env)
    suggested = [line.strip() for line in result.stdout.splitlines() if line.startswith(f"  {venv}/bin/attn ")]
    assert len(suggested) == 3  # translate, caption, models
    assert all(line.endswith(target) for line in suggested)
    assert sum("--target" in line for line in suggested) == (3 if target else 0)
    assert f"attn-serve on {port or 50051}" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize(("settings", "hints"), [
    ({}, []),
    ({"ATTN_TLS_CERT": "s.pem", "ATTN_TLS_KEY": "s.key"}, ["--tls-ca"]),
    ({"ATTN_TLS_CERT": "s.pem", "ATTN_TLS_KEY": "s.key", "ATTN_TLS_CLIENT_CA": "ca.pem",
      "ATTN_AUTH_TOKEN_FILE": "tokens"}, ["--tls-ca", "--tls-cert and --tls-key", "--token-file"]),
])
def test_make_run_says_what_its_suggested_commands_need_with_tls_and_tokens(settings: dict[str, str],
                                                                          hints: list[str], tmp_path: Path) -> None:
    # Plaintext commands against a TLS port fail with a handshake error that does not say what is missing.
    venv = _fake_venv(tmp_path / "venv")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ATTN_")}, **settings}
    result = _make_run(venv, env)
    notes = [line.strip() for line in result.stdout.splitlines() if line.startswith("  (")]
    assert len(notes) == len([h for h in ("--tls-ca", "--token-file") if h in hints])
    for hint in hints:
        assert any(hint in note for note in notes), (hint, notes)


def test_the_readmes_pip_commands_install_this_checkout() -> None:
    # The project is installed from its folder, not from a package index: `pip install NAME[extra]` would ask an
    # index for a project of that name, which is not this one (or anyone's).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"`(pip install [^`]*)`", readme)
    assert commands, "the README shows no pip command: update this test"
    assert [c for c in commands if not re.fullmatch(r"pip install -e '\.\[[a-z,]+\]'", c)] == []
