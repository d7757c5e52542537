"""bench/ipc_roundtrip.py says what it measures on --help instead of measuring, takes a short run's size, and writes
the rows it prints to its results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ipc_roundtrip import main  # noqa: E402


def test_help_describes_the_benchmark_and_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "What one request costs to cross" in out and "--round-trips" in out and "| unix socket |" not in out


def test_a_short_run_writes_the_rows_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ipc.json"
    assert main(["--round-trips", "40", "--transports", "unix socket", "pipe+pickle", "--out", str(out)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| unix") or
               line.startswith("| pipe")]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["transport"], r["window"], r["round_trips"]) for r in rows] == [
        ("unix socket", 64, 40), ("pipe+pickle", 64, 40), ("unix socket", 1, 10), ("pipe+pickle", 1, 10)]
    assert printed == [f"| {r['transport']} | {r['window']} | {r['round_trips_per_s']:,} | {r['us_per_round_trip']} | "
                       f"{r['client_cpu_us']} | {r['engine_side_cpu_us']} |" for r in rows]
