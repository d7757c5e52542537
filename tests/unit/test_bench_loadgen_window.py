"""bench/loadgen.py's client processes: their counts are summed over the window in which they were counted, so a
process that started late does not add answers from outside a window of one process's length."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench import loadgen  # noqa: E402


def _part(began: float, seconds: float, ok: int) -> dict[str, Any]:
    return {"ok": ok, "codes": {"OK": ok, "UNAVAILABLE": 3}, "target_tokens": 10 * ok, "latencies": [0.01] * ok,
            "seconds": seconds, "cpu_seconds": 0.1 * seconds, "began": began, "ended": began + seconds}


class _Clients:
    def __init__(self, parts: list[dict[str, Any]]) -> None:
        self.parts = parts
        self.tasks: list[Any] = []

    def start(self, processes: int) -> float:
        return 0.0

    def map_async(self, fn: Any, tasks: list[Any]) -> Any:
        self.tasks = tasks
        parts = self.parts[: len(tasks)]

        class Done:
            def get(self) -> list[dict[str, Any]]:
                return parts

        return Done()


def test_the_parts_are_summed_over_the_window_they_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    # the second process began 2 s late: 4 s of answers came in 6 s, not in 4
    monkeypatch.setattr(loadgen, "CLIENTS", _Clients([_part(100.0, 4.0, 400), _part(102.0, 4.0, 400)]))
    run = loadgen.drive_processes("127.0.0.1:1", ["Hallo"], 8, pb.DecodingOptions(), seconds=4.0, processes=2)
    assert run["ok"] == 800 and run["codes"] == {"OK": 800, "UNAVAILABLE": 6}  # every part's, none twice
    assert run["seconds"] == 6.0 and run["sentences_per_s"] == round(800 / 6, 1) and run["start_spread_s"] == 2.0


def test_parts_that_started_together_keep_their_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "CLIENTS", _Clients([_part(100.0, 4.1, 400), _part(100.0, 4.0, 300)]))
    run = loadgen.drive_processes("127.0.0.1:1", ["Hallo"], 8, pb.DecodingOptions(), seconds=4.0, processes=2)
    assert run["seconds"] == 4.1 and run["sentences_per_s"] == round(700 / 4.1, 1) and run["start_spread_s"] == 0.0


def test_each_part_starts_at_its_own_sentence_and_their_outputs_are_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [{**_part(100.0, 4.0, 2), "outputs": {0: [4], 1: [5]}}, {**_part(100.0, 4.0, 2), "outputs": {3: [6]}},
             {**_part(100.0, 4.0, 2), "outputs": {6: [7]}}]
    clients = _Clients(parts)
    monkeypatch.setattr(loadgen, "CLIENTS", clients)
    texts = [f"Satz {i}" for i in range(9)]
    run = loadgen.drive_processes("127.0.0.1:1", texts, 6, pb.DecodingOptions(), seconds=4.0, processes=3,
                                  outputs=True)
    # three parts, a third of the texts apart: together they send the mix one process would, not its start thrice
    assert [task[7] for task in clients.tasks] == [0, 3, 6] and all(task[8] for task in clients.tasks)
    assert run["outputs"] == {0: [4], 1: [5], 3: [6], 6: [7]}
    assert "outputs" not in loadgen.drive_processes("127.0.0.1:1", texts, 6, pb.DecodingOptions(), seconds=4.0,
                                                    processes=3)
