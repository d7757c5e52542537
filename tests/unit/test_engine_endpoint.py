"""The engine process's end of the IPC (server/ipc/engine_endpoint.py) against a front-end played by this test on a
plain socket: replies reach the connection that asked, whole even when they outgrow the socket's buffer, those
finished together in one write per connection, and a front-end that goes away has its requests cancelled, each
connection hears of a version's manifest and tokenizer once, and a failure of the endpoint's own code fails one
request, or ends its thread logged, never silently."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.artifacts import Manifest
from server.errors import Overloaded
from server.ipc import engine_endpoint, framing, records
from server.ipc.engine_endpoint import EngineEndpoint
from server.search import Hypothesis
from server.translation import DecodeOptions, TranslationModel
from tests.unit.engine_fakes import wait_until


class FakeEngine:
    def __init__(self) -> None:
        self.submitted: list[Future[Any]] = []

    def submit(self, items: list[np.ndarray], options: DecodeOptions, timeout: float | None) -> Future[Any]:
        if len(self.submitted) >= 3:
            raise Overloaded("the queue is full")
        future: Future[Any] = Future()  # pending, and cancellable, as the engine's
        self.submitted.append(future)
        return future


class FakeRegistry:
    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.loaded: list[Any] = []

    def engine_of(self, name: str, version: str) -> FakeEngine:
        return self.engine

    def models(self) -> list[Any]:
        return self.loaded


class FrontEnd:
    def __init__(self, address: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.connect(address)
        self.socket.settimeout(10)
        self.decoder = framing.Decoder()
        self.waiting: list[list[bytes]] = []

    def send(self, frames: records.Frames) -> None:
        self.socket.sendall(framing.encode(frames))

    def receive(self) -> tuple[bytes, dict[str, Any], list[np.ndarray]]:
        while not self.waiting:
            data = self.socket.recv(65536)
            assert data, "the engine closed the connection"
            self.waiting += self.decoder.feed(data)
        return records.unpack(self.waiting.pop(0))


@pytest.fixture()
def endpoint(tmp_path: Path) -> Iterator[tuple[EngineEndpoint, FakeRegistry]]:
    registry = FakeRegistry()
    served = EngineEndpoint(registry, str(tmp_path / "engine-0.sock"),  # type: ignore[arg-type]
                            lambda: {"ready": True})
    stop = threading.Event()
    thread = threading.Thread(target=served.run, args=(stop,), daemon=True)
    thread.start()
    yield served, registry
    stop.set()
    thread.join(5)
    served.close()


def _submit(request_id: int) -> records.Frames:
    return records.submit(request_id, "m", "1", DecodeOptions(), None, [np.array([4, 5, 2])])


def test_each_reply_reaches_the_front_end_that_asked_whole(endpoint: tuple[EngineEndpoint, FakeRegistry]) -> None:
    served, registry = endpoint
    first, second = FrontEnd(served.address), FrontEnd(served.address)
    for front_end in (first, second):
        front_end.send(records.pack(records.HELLO, {"pid": 1}))
        assert front_end.receive()[0] == records.MODELS
    first.send(_submit(1))
    wait_until(lambda: len(registry.engine.submitted) == 1, "the first submit", seconds=10)
    second.send(_submit(1))  # the same request id from another front-end
    wait_until(lambda: len(registry.engine.submitted) == 2, "the second submit", seconds=10)
    # Several megabytes: more than the socket holds, so the endpoint keeps the rest until the front-end reads.
    attention = np.random.default_rng(0).random((2000, 1000), dtype=np.float32)
    registry.engine.submitted[0].set_result([[Hypothesis([7, 2], -1.0, -0.5, attention)]])
    registry.engine.submitted[1].set_result([[Hypothesis([9, 2], -2.0, -1.0, attention[:2, :3])]])
    kind, header, arrays = second.receive()
    assert kind == records.DONE and records.hypotheses(header, arrays)[0][0].tokens == [9, 2]
    time.sleep(0.2)  # the first front-end reads late
    kind, header, arrays = first.receive()
    [[hypothesis]] = records.hypotheses(header, arrays)
    assert kind == records.DONE and hypothesis.tokens == [7, 2]
    np.testing.assert_array_equal(hypothesis.attention, attention)
    # A refusal travels as a failed record that names its error.
    first.send(_submit(2))
    wait_until(lambda: len(registry.engine.submitted) == 3, "the third submit", seconds=10)
    first.send(_submit(3))
    kind, header, _ = first.receive()
    assert kind == records.FAILED and header["id"] == 3
    assert isinstance(records.error_of(header), Overloaded)


def test_replies_finished_together_leave_in_one_write_for_each_front_end(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that finishes many requests (a GPU's batches of hundreds of rows) costs one send, and one wake-up of
    each front-end, not one of each per request: the engine process's Python is what caps the server there. This
    test drives the endpoint's parts itself, its thread not running."""
    served = EngineEndpoint(FakeRegistry(), str(tmp_path / "engine-0.sock"),  # type: ignore[arg-type]
                            lambda: {"ready": True})
    connections: dict[int, FrontEnd] = {}
    for _ in range(2):  # connected and accepted one at a time: each one's number is known
        front_end = FrontEnd(served.address)
        wait_until(lambda: served._accept() or len(served._front_ends) > len(connections), "the connection",
                   seconds=10)
        connections[max(served._front_ends)] = front_end
    writes: list[int] = []
    send = served._send
    monkeypatch.setattr(served, "_send", lambda front_end, message: (writes.append(front_end.number),
                                                                     send(front_end, message)))
    first, second = connections
    finishing = [(first, 1), (second, 2), (first, 3), (second, 4), (first, 5)]  # in one step, interleaved
    for number, request_id in finishing:
        finished: Future[Any] = Future()
        finished.set_result([[Hypothesis([request_id, 2], -1.0, -0.5, np.ones((2, 3), np.float32))]])
        served._outbox.append(((number, request_id), finished))
    served._flush()
    assert sorted(writes) == [first, second]
    for number, front_end in connections.items():  # each connection's records whole, in the order they finished
        expected = [request_id for n, request_id in finishing if n == number]
        received = [front_end.receive() for _ in expected]
        assert [header["id"] for _, header, _ in received] == expected
        assert [records.hypotheses(header, arrays)[0][0].tokens[0] for _, header, arrays in received] == expected
    served.close()


def test_a_front_end_that_goes_away_has_its_requests_cancelled(
        endpoint: tuple[EngineEndpoint, FakeRegistry]) -> None:
    served, registry = endpoint
    leaving, staying = FrontEnd(served.address), FrontEnd(served.address)
    leaving.send(_submit(1))
    staying.send(_submit(1))
    wait_until(lambda: len(registry.engine.submitted) == 2, "both submits", seconds=10)
    leaving.socket.close()
    wait_until(lambda: any(f.cancelled() for f in registry.engine.submitted), "the cancellation", seconds=10)
    assert [f.cancelled() for f in registry.engine.submitted].count(True) == 1
    staying.send(records.pack(records.CANCEL, {"id": 1}))
    wait_until(lambda: all(f.cancelled() for f in registry.engine.submitted), "the cancel record", seconds=10)


def test_a_front_end_gone_while_replies_to_it_wait_leaves_the_others_served(
        endpoint: tuple[EngineEndpoint, FakeRegistry], caplog: pytest.LogCaptureFixture) -> None:
    """Its socket is then readable and writable at once: the write failed and disconnected it, and the read that
    followed disconnected it again, a KeyError that ended the socket's thread, so the engine process exited (and
    every call of the other front-ends failed) whenever a front-end went away behind on its replies; seen as an
    ``ipc_failed`` traceback when the server was stopped just as it became ready."""
    served, registry = endpoint
    leaving, staying = FrontEnd(served.address), FrontEnd(served.address)
    leaving.send(_submit(1))
    staying.send(_submit(1))
    wait_until(lambda: len(registry.engine.submitted) == 2, "both submits", seconds=10)
    with caplog.at_level(logging.INFO, logger=engine_endpoint.log.name):
        # Several megabytes that the leaving front-end never reads: the endpoint holds most of them, unsent.
        attention = np.zeros((2000, 1000), dtype=np.float32)
        registry.engine.submitted[0].set_result([[Hypothesis([7, 2], -1.0, -0.5, attention)]])
        wait_until(lambda: any(f.unsent for f in served._front_ends.values()), "replies waiting", seconds=10)
        leaving.socket.close()
        wait_until(lambda: len(served._front_ends) == 1, "the leaving front-end disconnected", seconds=10)
        registry.engine.submitted[1].set_result([[Hypothesis([9, 2], -2.0, -1.0, attention[:2, :3])]])
        kind, header, arrays = staying.receive()
    assert kind == records.DONE and records.hypotheses(header, arrays)[0][0].tokens == [9, 2]
    assert "ipc_failed" not in [r.getMessage() for r in caplog.records]


def test_a_connection_hears_of_a_versions_manifest_and_tokenizer_once(
        endpoint: tuple[EngineEndpoint, FakeRegistry], models_dir: Path) -> None:
    """What a front-end builds its view from travels with the first models record that names the version on each
    connection (a reload publishes one every few seconds; a tokenizer is hundreds of kilobytes)."""
    served, registry = endpoint
    folder = models_dir / "tiny-de-en" / "1"
    registry.loaded = [TranslationModel(folder, Manifest.load(folder), None)]

    def announced(front_end: FrontEnd) -> list[dict[str, Any]]:
        kind, header, arrays = front_end.receive()
        assert kind == records.MODELS
        views = records.views(header, arrays)
        for manifest, tokenizer in views.values():
            assert Manifest.from_dict(manifest) == registry.loaded[0].manifest
            assert tokenizer == (folder / registry.loaded[0].manifest.tokenizer["file"]).read_bytes()
        return [{"key": (m["name"], m["version"]), "described": (m["name"], m["version"]) in views}
                for m in header["models"]]

    first = FrontEnd(served.address)
    first.send(records.pack(records.HELLO, {"pid": 1}))
    assert announced(first) == [{"key": ("tiny-de-en", "1"), "described": True}]
    served.publish()  # after a reload that changed nothing
    assert announced(first) == [{"key": ("tiny-de-en", "1"), "described": False}]
    second = FrontEnd(served.address)  # a restarted front-end: a new connection hears of it again
    second.send(records.pack(records.HELLO, {"pid": 2}))
    assert announced(second) == [{"key": ("tiny-de-en", "1"), "described": True}]
    registry.loaded = []  # retired, then loaded again: described again
    served.publish()
    assert announced(first) == [] and announced(second) == []
    registry.loaded = [TranslationModel(folder, Manifest.load(folder), None)]
    served.publish()
    assert announced(first) == [{"key": ("tiny-de-en", "1"), "described": True}]


def test_a_reply_that_cannot_be_packed_fails_its_request_and_the_endpoint_goes_on(
        endpoint: tuple[EngineEndpoint, FakeRegistry]) -> None:
    """Before, the exception ended the socket's thread: no later reply left the engine process, and every call it
    held waited for its deadline."""
    served, registry = endpoint
    front_end = FrontEnd(served.address)
    front_end.send(_submit(1))
    wait_until(lambda: len(registry.engine.submitted) == 1, "the first submit", seconds=10)
    registry.engine.submitted[0].set_result([[object()]])  # not a hypothesis: a bug upstream of the packing
    kind, header, _ = front_end.receive()
    assert kind == records.FAILED and header["id"] == 1
    assert isinstance(records.error_of(header), records.EngineError)
    front_end.send(_submit(2))
    wait_until(lambda: len(registry.engine.submitted) == 2, "the second submit", seconds=10)
    registry.engine.submitted[1].set_result([[Hypothesis([9, 2], -2.0, -1.0, np.ones((2, 3), np.float32))]])
    kind, header, arrays = front_end.receive()
    assert kind == records.DONE and records.hypotheses(header, arrays)[0][0].tokens == [9, 2]


def test_a_failure_of_the_socket_thread_is_logged_and_ends_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The engine process watches the thread and exits when it ends (the parent restarts it): logged, not silent."""
    served = EngineEndpoint(FakeRegistry(), str(tmp_path / "engine-0.sock"),  # type: ignore[arg-type]
                            lambda: {"ready": True})

    def broken() -> None:
        raise RuntimeError("a bug in the socket's thread")

    monkeypatch.setattr(served, "_accept", broken)
    thread = threading.Thread(target=served.run, args=(threading.Event(),), daemon=True)
    with caplog.at_level(logging.ERROR, logger=engine_endpoint.log.name):
        thread.start()
        FrontEnd(served.address)
        thread.join(10)
    assert not thread.is_alive()
    assert [r.getMessage() for r in caplog.records] == ["ipc_failed"]
    served.close()
