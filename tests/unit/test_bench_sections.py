"""Benchmarks share docs/benchmarks.md, each in its own marked section; the soak's reading of its memory series; the
one-client benchmark's medians."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.one_client import write_section  # noqa: E402
from bench.sections import replace_section  # noqa: E402
from bench.soak import stability, warm_up  # noqa: E402

A, A_END, B, B_END = "<!-- a -->", "<!-- /a -->", "<!-- b -->", "<!-- /b -->"


def test_a_section_is_replaced_in_place_and_the_others_stay(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    replace_section(doc, A, A_END, [A, "first a", A_END])
    assert doc.read_text() == f"{A}\nfirst a\n{A_END}\n"  # a new document starts with the section
    replace_section(doc, B, B_END, [B, "b", B_END])
    doc.write_text(doc.read_text() + "written by hand\n")
    replace_section(doc, A, A_END, [A, "second a", "more", A_END])
    assert doc.read_text() == f"{A}\nsecond a\nmore\n{A_END}\n\n{B}\nb\n{B_END}\nwritten by hand\n"



def test_a_report_in_a_folder_still_to_be_made_is_written(tmp_path: Path) -> None:
    doc = tmp_path / "new" / "benchmarks.md"  # --report accepts it: the benchmark makes the folder when it ends
    replace_section(doc, A, A_END, [A, "a", A_END])
    assert doc.read_text() == f"{A}\na\n{A_END}\n"

def test_the_warm_up_ends_where_every_later_reading_stays_in_the_band() -> None:
    totals = [300.0, 400.0, 460.0, 480.0, 470.0, 490.0, 482.0, 478.0]
    start = warm_up(totals, 0.05)
    assert start == 2  # 460 is within 5% of the median of 460..490; 400 is not
    settled = stability(totals, start)
    assert settled["median_mib"] == 479.0
    assert settled["max_deviation"] == round(19 / 479, 4)
    assert warm_up([100.0, 200.0, 400.0], 0.05) == 2  # still growing: only the last reading is "settled"


def test_the_one_client_section_gives_each_design_its_median_against_the_baseline(tmp_path: Path) -> None:
    def rounds(*p50: float, engine: float = 0.0) -> list[dict[str, Any]]:
        return [{"p50_ms": p, "server_cpu_ms_per_sentence": p - 0.5,
                 "wakeups_per_sentence": {"parent": 0.0 if engine else 2 * p, "engine": engine,
                                          "frontends": 2 * p - engine if engine else 0.0}} for p in p50]

    results = {"commit": "abc1234", "baseline": "ace5a15", "finished": "today", "rounds": 3, "seconds_per_run": 6.0,
               "command": ".venv/bin/python bench/one_client.py --baseline /tmp/before",
               "results_file": "docs/benchmarks/one_client.json",
               "runs": {"before": rounds(6.0, 9.0, 6.4), "0": rounds(6.2, 6.1, 6.3),
                        "1": rounds(7.2, 6.4, 6.8, engine=3.3)}}
    doc = tmp_path / "benchmarks.md"
    write_section(results, doc)
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| ") and "design" not in line]
    assert rows == [
        "| commit ace5a15 (before) | 6.0, 9.0, 6.4 | 6.4 | 1.00× | 5.9 | 12.8 |",  # the median, not the mean
        "| one process (`ATTN_FRONTENDS=0`) | 6.2, 6.1, 6.3 | 6.2 | 0.97× | 5.7 | 12.4 |",
        "| 1 front-end(s) + engine | 7.2, 6.4, 6.8 | 6.8 | 1.06× | 6.3 | 13.6 (3.3) |",  # the engine's apart
    ]


def test_a_section_quotes_the_command_that_ran_and_the_file_it_wrote(tmp_path: Path) -> None:
    from bench import first_call, hostile, overhead, soak
    from bench.sections import command_line, shown

    root = Path(__file__).resolve().parents[2]
    command = command_line("overhead.py", ["--baseline", "/tmp/before", "--engines", "2", "--out", "/tmp/o k.json"])
    assert command == ".venv/bin/python bench/overhead.py --baseline /tmp/before --engines 2 --out '/tmp/o k.json'"
    assert shown(root / "docs" / "benchmarks" / "soak.json") == "docs/benchmarks/soak.json"
    assert shown(tmp_path / "soak.json") == str(tmp_path / "soak.json")
    ran = {"command": ".venv/bin/python bench/X.py --seconds 2", "results_file": "/tmp/results.json",
           "commit": "abc1234", "finished": "today"}
    reading = {"requests": 10, "total_mib": 400.0, "processes": {"server": 400.0}}
    doc = tmp_path / "benchmarks.md"
    overhead.write_section({**ran, "machine": {"cpus": 2}, "seconds_per_run": 2.0}, doc)
    one_client_results = {**ran, "rounds": 1, "seconds_per_run": 1.0, "runs": {"0": [
        {"p50_ms": 1.0, "server_cpu_ms_per_sentence": 1.0, "wakeups_per_sentence": {"engine": 0.0}}]}}
    write_section(one_client_results, doc)
    first_call.write_section({**ran, "starts": 1, "calls": 2, "designs": {}}, doc)
    soak.write_section({**ran, "requests": 10, "concurrency": 1, "chunk": 10, "codes": {"OK": 10}, "band": 0.05,
                        "loaded_mib": {"server": 390.0}, "readings": [reading], "warm_up_requests": 10,
                        "median_mib": 400.0, "max_deviation": 0.0, "drift": 0.0}, doc)
    replace_section(doc, hostile.BEGIN, hostile.END, hostile.report([], "abc1234", ran["command"], ran["results_file"]))
    produced = [line for line in doc.read_text().splitlines() if line.startswith("Produced by")]
    assert len(produced) == 5
    for line in produced:
        assert line.startswith(f"Produced by `{ran['command']}` at commit abc1234"), line
        assert "raw numbers in `/tmp/results.json`" in line, line
