"""bench/engine_ceiling.py measures the negligible model as bench/overhead.py does (outputs capped, the fixture's
sources) however its folder is named on the command line, and its table says when outputs were capped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.engine_ceiling import NEGLIGIBLE, is_negligible, table  # noqa: E402


def test_the_negligible_model_is_recognised_by_any_path_to_it(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # as docs/benchmarks.md runs it: --model runs/bench-overhead/models/tiny8/1
    assert is_negligible(Path("runs/bench-overhead/models/tiny8/1"))
    assert is_negligible(NEGLIGIBLE) and is_negligible(ROOT / "runs" / "bench-overhead" / "models" / "tiny8" / "."
                                                       / "1")
    link = tmp_path / "tiny8"
    os.symlink(NEGLIGIBLE, link)
    assert is_negligible(link)
    assert not is_negligible(Path("models/de-en-bahdanau/1")) and not is_negligible(NEGLIGIBLE.parent)


def test_the_table_says_when_outputs_were_capped() -> None:
    row = {"model": "tiny8", "beam": 1, "submitters": 2, "window": 64, "sentences_per_s": 5000.0,
           "engine_cores": 1.0, "engine_cpu_ms_per_sentence": 0.2, "rows_per_decoder_call": 30.0}
    capped, uncapped = table([{**row, "max_output_tokens": 12}])[-1], table([{**row, "max_output_tokens": 0}])[-1]
    assert capped.startswith("| tiny8 (outputs ≤ 12 tokens) | 1 |") and uncapped.startswith("| tiny8 | 1 |")
