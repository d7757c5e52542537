"""The modules the benchmarks import, run on their own, say what they are and which benchmark to run, instead of
doing nothing (exit status 0) or failing on an import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["loadgen", "slow_reader", "variants_report", "serving_report", "sections",
                                    "arguments"])
def test_a_module_run_as_a_script_says_it_is_not_a_benchmark(module: str) -> None:
    script = ROOT / "bench" / f"{module}.py"
    help_ = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_.returncode == 0 and help_.stdout.startswith(f"usage: {module}.py"), help_.stderr
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "is not a benchmark: " in run.stderr.splitlines()[-1] and "bench/" in run.stderr.splitlines()[-1]
