"""The load generator's check, reported: a run repeated with one client process more says in words whether the
figure rose, beside the tables of bench/overhead.py and bench/gpu.py and in bench/grpc_floor.py's results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.loadgen import client_check, client_checks  # noqa: E402


def _run(concurrency: int, processes: int, rate: float, check: str = "") -> dict[str, Any]:
    run = {"concurrency": concurrency, "client_processes": processes, "sentences_per_s": rate, "texts_per_call": 1,
           "seconds": 2.0, "ok": int(2 * rate), "target_tokens_per_s": 12 * rate, "p50_ms": 1.0, "p99_ms": 2.0,
           "codes": {"OK": int(2 * rate)}, "client_cores": 0.3, "busiest_client_cores": 0.2}
    return {**run, "check": check} if check else run  # as overhead.py marks its rows: the check's alone


def test_a_figure_that_rises_with_one_client_process_more_is_called_the_clients() -> None:
    held = client_check(_run(256, 3, 1000.0), _run(256, 4, 1030.0))
    assert held.startswith("4 client processes instead of 3 at 256 clients: 1,030.0 against 1,000.0 sentences/s "
                           "(1.03×)") and "did not raise the figure" in held
    rose = client_check(_run(256, 3, 1000.0), _run(256, 4, 1200.0))
    assert "(1.20×)" in rose and "raised the figure" in rose and "the load generator may have limited it" in rose
    assert "calls/s" in client_check({**_run(16, 1, 0.0), "calls_per_s": 0.0},
                                     {**_run(16, 2, 5.0), "calls_per_s": 5.0}, "calls_per_s")


def test_each_check_row_is_set_against_the_run_it_repeats() -> None:
    rows = [_run(1, 1, 300.0), _run(256, 3, 1000.0), _run(256, 4, 1300.0, "one client process more"),
            _run(1, 1, 280.0), _run(256, 3, 900.0), _run(256, 4, 880.0, "one client process more")]
    first, second = client_checks(rows)
    assert "1,300.0 against 1,000.0" in first and "raised the figure" in first
    assert "880.0 against 900.0" in second and "did not raise the figure" in second


def test_the_overhead_and_gpu_sections_say_what_the_check_found(tmp_path: Path) -> None:
    from bench import gpu, overhead

    doc = tmp_path / "benchmarks.md"
    runs = [_run(1, 1, 300.0), _run(64, 3, 900.0), _run(256, 3, 1000.0),
            _run(256, 4, 1300.0, "one client process more")]
    for r in runs:
        r.update(server_cpu_ms_per_sentence=1.0, server_cores=1.0, engine_cpu_ms_per_sentence=0.5,
                 frontend_cpu_ms_per_sentence=0.5, rows_per_decoder_call=4.0)
    overhead.write_section({"machine": {"cpus": 2}, "seconds_per_run": 2.0, "finished": "today", "commit": "abc1234",
                            "command": ".venv/bin/python bench/overhead.py", "results_file": "overhead.json",
                            "negligible": {"0": runs}}, doc)
    assert ("- one process (`ATTN_FRONTENDS=0`), 4 client processes instead of 3 at 256 clients: 1,300.0 against "
            "1,000.0 sentences/s (1.30×); adding a client process raised the figure") in doc.read_text()
    served = [{"check": "", **r, "variant": "fp32", "beam": 1, "attention": "full", "settings": {},
               "gpu_utilisation": None} for r in runs]  # as gpu.py marks its rows: every one
    table = "\n".join(gpu._serving_table(served))
    assert "- 4 client processes instead of 3 at 256 clients: 1,300.0 against 1,000.0 sentences/s" in table
