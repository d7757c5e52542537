"""What the connection age costs a client that reads its answers slowly (docs/serving-processes.md, "What the age
costs").

The server asks each connection to move after half a second (``ATTN_MAX_CONNECTION_AGE`` 0.5); a relay reads the
server's answers at about 1.6 MB/s (``bench/slow_reader.py``); the model's searches all run to their length budget.
Three threads send 8-text calls at beam 16 with full attention, one hypothesis per text and then 16, through one
channel with gRPC's default options and then through one of ``client.connection``, and count the calls lost
(``UNAVAILABLE``: the reset took the rest of the answer). With ``--baseline DIR`` the server of that checkout (another
commit, e.g. ``git worktree add /tmp/before REV``) is measured the same way, first.

    .venv/bin/python bench/connection_age.py [--seconds 60] [--baseline /tmp/before]

Results: ``docs/benchmarks/connection_age.json``; the figures are quoted in docs/serving-processes.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from attention_pb.v1 import attention_pb2_grpc as pb_grpc  # noqa: E402
from bench.arguments import checkout, positive_float, writable_file  # noqa: E402
from bench.loadgen import ServerProcess, commit_of, save_results  # noqa: E402
from bench.overhead import negligible_model  # noqa: E402
from bench.slow_reader import SlowReader, ban_end_of_sentence  # noqa: E402
from client.connection import MAX_MESSAGE_BYTES, ChannelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLERS = 3  # threads, each with one call in flight
CLIENTS: dict[str, Any] = {
    "gRPC's default channel options": lambda target: grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]),
    "client.connection's channel": lambda target: ChannelConfig(target).channel(),
}


def endless_models(workdir: Path) -> Path:
    """The negligible model with end-of-sentence banned: every answer as long as its budget allows."""
    models = workdir / "endless-models"
    if not (models / "tiny8" / "1" / "manifest.json").exists():
        shutil.rmtree(models, ignore_errors=True)
        shutil.copytree(negligible_model(workdir) / "tiny8" / "1", models / "tiny8" / "1")
        ban_end_of_sentence(models / "tiny8" / "1")
    return models


def lost_calls(server: ServerProcess, client: str, nbest: int, seconds: float) -> dict[str, Any]:
    """Calls answered and lost in ``seconds`` through a fresh slow relay."""
    relay = SlowReader(server.port)
    request = pb.TranslateRequest(texts=["Hallo Welt " * 10] * 8, options=pb.DecodingOptions(
        beam_size=16, nbest=nbest, attention=pb.ATTENTION_DETAIL_FULL))
    codes: Counter[str] = Counter()
    answer_bytes: list[int] = []
    until = time.monotonic() + seconds
    with CLIENTS[client](relay.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)

        def caller() -> None:
            while time.monotonic() < until:
                try:
                    answer_bytes.append(stub.Translate(request, timeout=60).ByteSize())
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"client": client, "nbest": nbest, "calls": sum(codes.values()), "lost": codes["UNAVAILABLE"],
            "codes": dict(codes), "answer_bytes": max(answer_bytes, default=0), "connections": relay.connections,
            "resets": relay.resets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="of calls per client and answer size")
    parser.add_argument("--age", type=positive_float, default=0.5, help="the server's max connection age, seconds")
    parser.add_argument("--baseline", type=checkout, help="a checkout of another commit, measured the same way first")
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "connection_age.json")
    args = parser.parse_args(argv)

    models = endless_models(ROOT / "runs" / "bench-overhead")
    servers = [*([("baseline", args.baseline)] if args.baseline else []), ("this commit", ROOT)]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "commit": commit_of(), "seconds": args.seconds, "age": args.age, "runs": []}
    print(f"{'server':<22} {'client':<32} {'nbest':>5} {'calls':>6} {'lost':>5} {'answer MB':>9} {'connections':>11}")
    for name, root in servers:
        with ServerProcess(models, root, max_connection_age=args.age, grace_seconds=60, reload_interval=0) as server:
            for client in CLIENTS:
                for nbest in (1, 16):
                    run = {"server": f"{name} ({commit_of(root)})", **lost_calls(server, client, nbest, args.seconds)}
                    results["runs"].append(run)
                    print(f"{run['server']:<22} {client:<32} {nbest:>5} {run['calls']:>6} {run['lost']:>5} "
                          f"{run['answer_bytes'] / 1e6:>9.2f} {run['connections']:>11}", flush=True)
    save_results(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
