"""The floor under the server's CPU per call: gRPC's Python server doing no work at all.

    .venv/bin/python bench/grpc_floor.py      # docs/benchmarks/grpc_floor.json and a table on stdout

The same load as bench/overhead.py (one sentence per Translate call, 256 clients from several client processes)
against ``grpc.aio`` servers in a child process that answer every call at once:

* ``empty``: a response of one empty hypothesis: gRPC's own cost per unary call (HTTP/2, the asyncio layer, parsing the
  request);
* ``recorded``: the response the real server gave for the same sentence (the negligible-compute model, greedy, full
  attention, 12 tokens), built anew for every call from its fields and serialised: what gRPC and protobuf cost
  before the server has tokenized, decoded or aligned anything.

Reported: calls/s and the floor server's CPU milliseconds per call (its process's user + system time over the run).
Whatever the serving path does costs this much more; no design in one Python process per core can answer a
one-sentence call for less than its floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from attention_pb.v1 import attention_pb2_grpc as pb_grpc  # noqa: E402
from bench.arguments import positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import (  # noqa: E402
    ServerProcess,
    client_check,
    drive,
    drive_processes,
    save_results,
    tree_cpu_seconds,
)
from bench.overhead import fixture_sources, negligible_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPPED = pb.DecodingOptions(beam_size=1, max_output_tokens=12, attention=pb.ATTENTION_DETAIL_FULL)


class Answering(pb_grpc.AttentionServiceServicer):
    def __init__(self, recorded: bytes) -> None:
        self.recorded = recorded

    async def Translate(self, request: pb.TranslateRequest, context: Any) -> pb.TranslateResponse:
        if not self.recorded:  # the least the load generator reads: one translation, one hypothesis
            return pb.TranslateResponse(translations=[pb.Translation(hypotheses=[pb.Hypothesis()])])
        response = pb.TranslateResponse()
        response.MergeFromString(self.recorded)  # a new message every call, as a real answer is
        return response


def _serve(recorded: bytes, port: Any, stop: Any) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        # The floor answers Translate only: the load sends nothing else.
        pb_grpc.add_AttentionServiceServicer_to_server(Answering(recorded), server)  # type: ignore[abstract]
        port.value = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(0)

    asyncio.run(main())


def floor(recorded: bytes, texts: list[str], concurrency: int, seconds: float, processes: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    port, stop = context.Value("i", 0), context.Event()
    server = context.Process(target=_serve, args=(recorded, port, stop), daemon=True)
    server.start()
    while not port.value:
        time.sleep(0.05)
    target = f"127.0.0.1:{port.value}"
    drive(target, texts, 8, CAPPED, requests=64)  # warm-up
    before = tree_cpu_seconds(server.pid)  # type: ignore[arg-type]
    run = drive_processes(target, texts, concurrency, CAPPED, seconds=seconds, processes=processes)
    cpu = tree_cpu_seconds(server.pid) - before  # type: ignore[arg-type]
    stop.set()
    server.join(10)
    return {"calls_per_s": run["sentences_per_s"], "p50_ms": run["p50_ms"], "concurrency": concurrency,
            "client_processes": processes, "server_cpu_ms_per_call": round(1000 * cpu / max(run["ok"], 1), 3),
            "server_cores": round(cpu / run["seconds"], 2), "codes": run["codes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_float, default=8.0)
    parser.add_argument("--concurrency", type=positive_int, default=256)
    parser.add_argument("--client-processes", type=positive_int, default=2)
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "grpc_floor.json")
    args = parser.parse_args(argv)

    texts = fixture_sources()
    with ServerProcess(negligible_model(ROOT / "runs" / "bench-overhead"), frontends=0, reload_interval=0) as real:
        with grpc.insecure_channel(real.target) as channel:
            answer = pb_grpc.AttentionServiceStub(channel).Translate(
                pb.TranslateRequest(texts=texts[:1], options=CAPPED), timeout=30)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "recorded_response_bytes": answer.ByteSize()}
    for name, payload in (("empty", b""), ("recorded", answer.SerializeToString())):
        results[name] = floor(payload, texts, args.concurrency, args.seconds, args.client_processes)
        more = floor(payload, texts, args.concurrency, args.seconds, args.client_processes + 1)
        results[f"{name}_one_client_process_more"] = more
        results[f"{name}_client_check"] = client_check(results[name], more, "calls_per_s")
        print(name, json.dumps(results[name]), flush=True)
        print(f"{name}, {results[f'{name}_client_check']}", flush=True)
    save_results(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
