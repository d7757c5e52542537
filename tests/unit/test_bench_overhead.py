"""bench/overhead.py compares its designs under the same conditions: every server is up before the first run, and
each load is measured on the designs in turn, the "before" checkout's included."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench import overhead  # noqa: E402


def test_each_load_is_measured_on_the_designs_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, ...]] = []

    class Server:
        def __init__(self, models: Path, root: Path, **settings: Any) -> None:
            self.name = str(settings.get("frontends", root.name))
            events.append(("start", self.name))

        def __enter__(self) -> Server:
            return self

        def __exit__(self, *exc: object) -> None:
            events.append(("stop", self.name))

    def measure(server: Server, texts: list[str], concurrency: int, options: pb.DecodingOptions, seconds: float,
                processes: int, texts_per_call: int = 1) -> dict[str, Any]:
        events.append(("run", server.name, str(concurrency), str(processes)))
        return {"concurrency": concurrency, "client_processes": processes, "sentences_per_s": 100.0}

    monkeypatch.setattr(overhead, "ServerProcess", Server)
    monkeypatch.setattr(overhead, "measure", measure)
    designs = [("before", {}, Path("/tmp/before")), ("0", {"frontends": 0}, overhead.ROOT),
               ("1", {"frontends": 1}, overhead.ROOT)]
    runs = overhead.in_turns(Path("models"), ["Hallo"], designs, pb.DecodingOptions(), 1.0, 3)
    assert events[:3] == [("start", "before"), ("start", "0"), ("start", "1")]  # every server up before any run
    measured = [e[1:] for e in events if e[0] == "run"]
    assert measured == [(name, str(c), str(p)) for c, p in ((1, 1), (64, 3), (256, 3), (256, 4))
                        for name in ("before", "0", "1")]
    assert [r["concurrency"] for r in runs["before"]] == [1, 64, 256, 256] and runs["1"][-1]["check"]
    assert sorted(events[-3:]) == [("stop", "0"), ("stop", "1"), ("stop", "before")]
