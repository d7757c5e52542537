"""bench/serving.py's account of where the server's time went is the benchmarked model's (--model), not the
bundled one's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench import serving  # noqa: E402
from bench.loadgen import Run  # noqa: E402


class _Server:
    """Two scrapes of /metrics: before the measured run and after it."""

    target = "127.0.0.1:0"

    def __init__(self, model: str) -> None:
        compute = 'attn_compute_duration_seconds_sum{{model="{}",stage="{}",version="1"}}'
        self.scrapes = [{compute.format(model, "decoder"): 1.0, compute.format(model, "encoder"): 0.5},
                        {compute.format(model, "decoder"): 4.0, compute.format(model, "encoder"): 1.5}]

    def metrics(self) -> dict[str, float]:
        return self.scrapes.pop(0)


def test_the_compute_seconds_are_the_benchmarked_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def drive(target: str, texts: list[str], concurrency: int, *args: Any, **kwargs: Any) -> Run:
        return Run(concurrency, 1.0)

    monkeypatch.setattr(serving, "drive", drive)
    summary, _ = serving.server_run(_Server("de-en-mixed"), ["Hallo"], 4, pb.DecodingOptions(), 1.0, "de-en-mixed")
    assert (summary["server"]["decoder_seconds"], summary["server"]["encoder_seconds"]) == (3.0, 1.0)


def test_the_report_counts_the_cores_the_machine_has(tmp_path: Path) -> None:
    import json

    from bench.serving_report import write_report

    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "docs" / "benchmarks" / "serving.json").read_text())  # a full run's numbers
    results["machine"]["cpus"] = 16
    text = write_report(results, tmp_path, ".venv/bin/python bench/serving.py").read_text()
    top = next(r for r in results["c"] if r["concurrency"] == 256)["server"]
    assert f"CPU-seconds of the {16 * top['wall_seconds']:.1f} available on its 16 cores" in text
    assert "two cores" not in text and "shares the 16 cores with the server" in text


def test_the_report_names_the_results_file_it_wrote_and_how_long_the_run_took(tmp_path: Path) -> None:
    import json

    from bench.serving_report import write_report

    root = Path(__file__).resolve().parents[2]
    results = {**json.loads((root / "docs" / "benchmarks" / "serving.json").read_text()), "minutes": 1.4}
    text = write_report(results, tmp_path, ".venv/bin/python bench/serving.py --seconds 1").read_text()
    assert (f"Produced by `.venv/bin/python bench/serving.py --seconds 1` (1.4 minutes); raw numbers in "
            f"`{tmp_path / 'benchmarks' / 'serving.json'}`.") in text
    assert json.loads((tmp_path / "benchmarks" / "serving.json").read_text())["minutes"] == 1.4
