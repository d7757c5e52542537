"""What one request costs to cross between a front-end process and the engine process, by transport.

    .venv/bin/python bench/ipc_roundtrip.py     # a table, and docs/benchmarks/ipc_roundtrip.json; quoted in
                                                # docs/serving-processes.md
    .venv/bin/python bench/ipc_roundtrip.py --round-trips 2000 --transports "unix socket"   # a short run

A client process sends ``submit`` records (a 16-token source) and an echo process answers each with a ``done``
record (a 14-token hypothesis and its 14×16 attention matrix), ``window`` requests in flight: 64, as a front-end
under load, and 1, as one client's call (there the time per round trip is the latency the hop adds). The client
side of each transport runs as a front-end's does, on an asyncio event loop where the server's does. Measured: round
trips per second and the CPU time of both processes per round trip (every thread of each: ZeroMQ's I/O threads
too), counted over the exchange only, not the start-up. Transports:

- the server's: a Unix stream socket carrying :mod:`server.ipc.records` framed by :mod:`server.ipc.framing`;
- ZeroMQ ROUTER/DEALER over ``ipc://`` with the same records (the server's transport before; pyzmq from the dev
  extra);
- ``multiprocessing`` pipes with pickled objects.

``--round-trips`` are timed with 64 in flight and a quarter as many with one (each a round trip's latency).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arguments import positive_int, writable_file  # noqa: E402
from bench.loadgen import commit_of, save_results  # noqa: E402
from server.ipc import framing, records  # noqa: E402
from server.search import Hypothesis  # noqa: E402
from server.translation import DecodeOptions  # noqa: E402

SOURCE = np.arange(16, dtype=np.int64)
ANSWER = [[Hypothesis(list(range(14)), -3.2, -2.1, np.full((14, 16), 1 / 16, dtype=np.float32))]]
OPTIONS = DecodeOptions()
ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ("unix socket", "zeromq", "pipe+pickle")


def _submit(request_id: int) -> records.Frames:
    return records.submit(request_id, "m", "1", OPTIONS, 30.0, [SOURCE])


# -- the echo processes: each answers ``count`` requests, then reports its CPU seconds over them ---------------------


def unix_echo(address: str, count: int, report: Connection) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    report.send("listening")
    connection, _ = listener.accept()
    decoder, answered, cpu = framing.Decoder(), 0, time.process_time()
    while answered < count:
        for frames in decoder.feed(connection.recv(1 << 20)):
            _, header, _ = records.unpack(frames)
            connection.sendall(framing.encode(records.done(header["id"], ANSWER)))
            answered += 1
    report.send(time.process_time() - cpu)
    connection.recv(1)  # until the client closes


def zmq_echo(address: str, count: int, report: Connection) -> None:
    import zmq

    socket_: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    socket_.bind(address)
    report.send("listening")
    cpu = time.process_time()
    for _ in range(count):
        peer, *frames = socket_.recv_multipart()
        _, header, _ = records.unpack(frames)
        socket_.send_multipart([peer, *records.done(header["id"], ANSWER)])
    report.send(time.process_time() - cpu)
    time.sleep(0.5)


def pipe_echo(conn: Connection, count: int, report: Connection) -> None:
    report.send("listening")
    cpu = time.process_time()
    for _ in range(count):
        request: Any = conn.recv()
        conn.send((request[0], ANSWER))
    report.send(time.process_time() - cpu)


# -- the clients: send ``count`` requests, ``window`` in flight; return (wall seconds, CPU seconds) ----------------


async def _window(send: Callable[[int], None], answers: asyncio.Queue[None], count: int, window: int) -> None:
    sent = received = 0
    while received < count:
        while sent < count and sent - received < window:
            send(sent)
            sent += 1
        await answers.get()
        received += 1


def unix_client(address: str, count: int, window: int) -> tuple[float, float]:
    class Link(asyncio.Protocol):  # as server/ipc/remote_models.py's: records handled as they arrive
        def __init__(self) -> None:
            self.decoder, self.answers = framing.Decoder(), asyncio.Queue[None]()

        def data_received(self, data: bytes) -> None:
            for frames in self.decoder.feed(data):
                records.hypotheses(*records.unpack(frames)[1:])
                self.answers.put_nowait(None)

    async def main() -> tuple[float, float]:
        transport, link = await asyncio.get_running_loop().create_unix_connection(Link, address)
        started, cpu = time.perf_counter(), time.process_time()
        await _window(lambda i: transport.write(framing.encode(_submit(i))), link.answers, count, window)
        measured = time.perf_counter() - started, time.process_time() - cpu
        transport.close()
        return measured

    return asyncio.run(main())


def zmq_client(address: str, count: int, window: int) -> tuple[float, float]:
    import zmq
    import zmq.asyncio

    async def main() -> tuple[float, float]:
        socket_ = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket_.connect(address)
        answers = asyncio.Queue[None]()

        async def read() -> None:
            while True:
                _, header, arrays = records.unpack(await socket_.recv_multipart())
                records.hypotheses(header, arrays)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        started, cpu = time.perf_counter(), time.process_time()
        def send(request_id: int) -> None:  # a DEALER never blocks on send: no need to await it
            socket_.send_multipart(_submit(request_id), copy=False)

        await _window(send, answers, count, window)
        measured = time.perf_counter() - started, time.process_time() - cpu
        reader.cancel()
        socket_.close(0)
        return measured

    return asyncio.run(main())


def pipe_client(conn: Connection, count: int, window: int) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    sent = received = 0
    while received < count:
        while sent < count and sent - received < window:
            conn.send((sent, "m", "1", OPTIONS, 30.0, [SOURCE]))
            sent += 1
        conn.recv()
        received += 1
    return time.perf_counter() - started, time.process_time() - cpu


def run(transport: str, count: int, window: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    report, theirs = context.Pipe()
    with tempfile.TemporaryDirectory() as folder:
        address = f"{folder}/engine.sock"
        echo: Callable[..., None]
        client: Callable[..., tuple[float, float]]
        ours: Any
        echoed: Any
        if transport == "unix socket":
            echo, client, ours, echoed = unix_echo, unix_client, address, address
        elif transport == "zeromq":
            echo, client, ours, echoed = zmq_echo, zmq_client, f"ipc://{address}", f"ipc://{address}"
        else:
            (ours, echoed), echo, client = context.Pipe(), pipe_echo, pipe_client
        process = context.Process(target=echo, args=(echoed, count, theirs))
        process.start()
        report.recv()  # listening
        wall, client_cpu = client(ours, count, window)
        echo_cpu = report.recv()
        process.join()
    return {"transport": transport, "window": window, "round_trips_per_s": round(count / wall),
            "us_per_round_trip": round(1e6 * wall / count, 1), "client_cpu_us": round(1e6 * client_cpu / count, 1),
            "engine_side_cpu_us": round(1e6 * echo_cpu / count, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=positive_int, default=20_000,
                        help="round trips per transport with 64 in flight (with one in flight: a quarter as many)")
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS),
                        help="zeromq needs pyzmq (the dev extra)")
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "ipc_roundtrip.json")
    args = parser.parse_args(argv)

    print("| transport | in flight | round trips/s | µs per round trip | front-end CPU µs per request | "
          "engine-side CPU µs per request |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for window, count in ((64, args.round_trips), (1, max(args.round_trips // 4, 1))):
        for transport in args.transports:
            r = run(transport, count, window)
            rows.append({**r, "round_trips": count})
            print(f"| {r['transport']} | {window} | {r['round_trips_per_s']:,} | {r['us_per_round_trip']} | "
                  f"{r['client_cpu_us']} | {r['engine_side_cpu_us']} |", flush=True)
    save_results(args.out, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                            "commit": commit_of(ROOT), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
