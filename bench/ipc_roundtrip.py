"""What one request costs to cross between a front-end process and the engine process, by transport.

    .venv/bin/python bench/ipc_roundtrip.py     # prints a table; docs/serving-processes.md quotes it

A client process sends ``submit`` records (a 16-token source) and an echo process answers each with a ``done``
record (a 14-token hypothesis and its 14×16 attention matrix), ``window`` requests in flight, as a front-end under
load does. Measured: round trips per second and the CPU time of both processes per round trip, for ZeroMQ with the
project's records (:mod:`server.ipc.records`) over ``ipc://``, and for ``multiprocessing`` pipes with pickled objects.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.ipc import records  # noqa: E402
from server.processes import process_cpu_seconds  # noqa: E402
from server.search import Hypothesis  # noqa: E402
from server.translation import DecodeOptions  # noqa: E402

SOURCE = np.arange(16, dtype=np.int64)
ANSWER = [[Hypothesis(list(range(14)), -3.2, -2.1, np.full((14, 16), 1 / 16, dtype=np.float32))]]


def zmq_echo(address: str, count: int) -> None:
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind(address)
    for _ in range(count):
        peer, *frames = socket.recv_multipart()
        _, header, _ = records.unpack(frames)
        socket.send_multipart([peer, *records.done(header["id"], ANSWER)])
    time.sleep(0.5)


def zmq_client(address: str, count: int, window: int) -> tuple[float, float]:
    import zmq

    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(address)
    options = DecodeOptions()
    started, cpu = time.perf_counter(), time.process_time()
    sent = received = 0
    while received < count:
        while sent < count and sent - received < window:
            socket.send_multipart(records.submit(sent, "m", "1", options, 30.0, [SOURCE]), copy=False)
            sent += 1
        _, header, arrays = records.unpack(socket.recv_multipart())
        records.hypotheses(header, arrays)
        received += 1
    return time.perf_counter() - started, time.process_time() - cpu


def pipe_echo(conn: Connection, count: int) -> None:
    for _ in range(count):
        request: Any = conn.recv()
        conn.send((request[0], ANSWER))


def pipe_client(conn: Connection, count: int, window: int) -> tuple[float, float]:
    options = DecodeOptions()
    started, cpu = time.perf_counter(), time.process_time()
    sent = received = 0
    while received < count:
        while sent < count and sent - received < window:
            conn.send((sent, "m", "1", options, 30.0, [SOURCE]))
            sent += 1
        conn.recv()
        received += 1
    return time.perf_counter() - started, time.process_time() - cpu


def run(transport: str, count: int, window: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    if transport == "zeromq":
        address = f"ipc:///tmp/attn-ipc-bench-{time.time_ns()}.sock"
        echo = context.Process(target=zmq_echo, args=(address, count))
        echo.start()
        wall, client_cpu = zmq_client(address, count, window)
    else:
        ours, theirs = context.Pipe()
        echo = context.Process(target=pipe_echo, args=(theirs, count))
        echo.start()
        wall, client_cpu = pipe_client(ours, count, window)
    echo_cpu = process_cpu_seconds(echo.pid or 0)
    echo.join()
    return {"transport": transport, "round_trips_per_s": round(count / wall),
            "client_cpu_us": round(1e6 * client_cpu / count, 1), "engine_side_cpu_us": round(1e6 * echo_cpu / count, 1)}


def main() -> int:
    print("| transport | round trips/s | front-end CPU µs per request | engine-side CPU µs per request |")
    print("|---|---|---|---|")
    for transport in ("zeromq", "pipe+pickle"):
        r = run(transport, 20_000, 64)
        print(f"| {r['transport']} | {r['round_trips_per_s']} | {r['client_cpu_us']} | {r['engine_side_cpu_us']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
