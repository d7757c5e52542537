"""What a drain waits for (server/drain.py): the bytes this process's TCP connections have not had acknowledged, and
calls not yet answered."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import pytest

from server.drain import Unanswered, settle, unacknowledged_bytes
from tests.unit.engine_fakes import wait_until

linux = pytest.mark.skipif(sys.platform != "linux", reason="the send queues are read from Linux's /proc/net/tcp")


class _Context:
    """Stands in for a gRPC call's context: keeps its done callbacks for the test to run."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def add_done_callback(self, callback: object) -> None:
        self.callbacks.append(callback)

    def done(self) -> None:
        for callback in self.callbacks:
            callback(self)


@linux
def test_bytes_the_peer_has_not_acknowledged_are_counted_until_it_reads_them() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, before connecting
    reader.connect(listener.getsockname())
    writer, _ = listener.accept()
    try:
        writer.setblocking(False)
        sent = 0
        try:
            while True:  # until the send buffer is full: the reader's window closed long before
                sent += writer.send(b"x" * 65536)
        except BlockingIOError:
            pass
        waiting = unacknowledged_bytes()
        assert 0 < waiting <= sent
        received = 0
        while received < sent:
            received += len(reader.recv(1 << 20))
        wait_until(lambda: unacknowledged_bytes() == 0, "the peer's acknowledgement of every byte", 10)
    finally:
        for end in (writer, reader, listener):
            end.close()


def test_unanswered_counts_a_call_until_its_done_callback() -> None:
    unanswered, first, second = Unanswered(), _Context(), _Context()
    unanswered.begin(first)
    unanswered.begin(second)
    assert unanswered.count == 2
    first.done()
    assert unanswered.count == 1
    second.done()
    assert unanswered.count == 0


def test_settle_waits_for_the_last_answer_and_gives_up_at_its_timeout() -> None:
    unanswered, call = Unanswered(), _Context()
    unanswered.begin(call)

    async def answered_later() -> tuple[bool, float]:
        asyncio.get_running_loop().call_later(0.2, call.done)
        started = time.monotonic()
        return await settle(unanswered, timeout=10.0), time.monotonic() - started

    settled, waited = asyncio.run(answered_later())
    assert settled and 0.2 <= waited < 5.0
    unanswered.begin(_Context())  # never answered
    started = time.monotonic()
    assert not asyncio.run(settle(unanswered, timeout=0.1))
    assert 0.1 <= time.monotonic() - started < 5.0
