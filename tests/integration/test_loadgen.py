"""bench/loadgen.py's client processes: a run split over several of them adds up their answers, and the next run
reuses them instead of starting new ones (each start costs a second or two of a device machine's minutes)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.loadgen import CLIENTS, ServerProcess, drive_processes  # noqa: E402

SENTENCES = ["Ich habe Hunger.", "Das Haus ist groß.", "Wo ist der Bahnhof?", "Guten Morgen."]


def _clients() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if "PoolWorker" in p.name and p.pid is not None}


def test_client_processes_serve_run_after_run(models_dir: Path) -> None:
    options = pb.DecodingOptions(beam_size=1, max_output_tokens=4)
    CLIENTS.close()
    try:
        with ServerProcess(models_dir, reload_interval=0, frontends=0) as server:
            first = drive_processes(server.target, SENTENCES, 4, options, seconds=0.5, processes=2, texts_per_call=2)
            started = _clients()
            second = drive_processes(server.target, SENTENCES, 3, options, seconds=0.5, processes=2)
            assert _clients() == started and len(started) == 2  # the same two processes, none new
            assert CLIENTS.warm
            third = drive_processes(server.target, SENTENCES, 3, options, seconds=0.5, processes=3)
            grown = _clients()
            assert len(grown) == 3 and not grown & started  # three processes: a new pool replaced the two
        for run, processes in ((first, 2), (second, 2), (third, 3)):
            assert run["client_processes"] == processes and run["ok"] > 0 and set(run["codes"]) == {"OK"}, run
            # the clients' own CPU: something, and no process more than the machine's cores
            assert run["busiest_client_cores"] > 0 and 0 < run["client_cores"] <= (os.cpu_count() or 1), run
        assert first["ok"] == 2 * first["codes"]["OK"]  # two sentences per call, counted as sentences
    finally:
        CLIENTS.close()
    assert not _clients()
