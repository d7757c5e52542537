"""The engine process's side of the IPC: one ZeroMQ ROUTER socket serving the front-ends' records.

One thread owns the socket (ZeroMQ sockets are not thread-safe). It reads ``submit`` records and hands each to its
model's engine (:meth:`server.engine.Engine.submit`, which returns at once); an engine thread that finishes a request
only appends its future to the outbox and writes a byte to a wake-up pipe, which the socket's thread polls beside
the socket, so replies are packed and sent by the socket's thread, never by an engine's. ``cancel`` cancels the
future (the engine drops the request at its next step).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from server.errors import ServiceError
from server.ipc import records
from server.logs import event
from server.registry import Registry
from server.translation import DecodeOptions

log = logging.getLogger("attn.ipc")

Key = tuple[bytes, int]  # (front-end identity, its request id)


class EngineEndpoint:
    def __init__(self, registry: Registry, address: str, describe: Callable[[], dict[str, Any]]) -> None:
        """``describe`` gives the ``models`` record's header: what is loaded, the device, readiness."""
        self.registry, self.address, self.describe = registry, address, describe
        self._context: Any = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a front-end that is gone is dropped
        self._socket.bind(address)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._outbox: deque[tuple[Key, Future[Any]]] = deque()
        self._pending: dict[Key, Future[Any]] = {}
        self._peers: set[bytes] = set()
        self._publish = threading.Event()
        self._woken = False  # a wake-up byte is in the pipe and not yet read
        self._sleeping = False  # the socket's thread is (about to be) in poll

    def publish(self) -> None:
        """Sends the ``models`` record to every front-end (after loading or reloading); any thread may call it."""
        self._publish.set()
        self._wake()

    def run(self, stop: threading.Event) -> None:
        """Serves until ``stop`` is set, then sends the replies still in the outbox (set it after closing the
        registry, which fails what is left)."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not stop.is_set():
            # Engine threads write a wake-up byte only while this thread sleeps in poll: it is marked sleeping
            # before the outbox is looked at, so a reply appended after that look finds the mark and wakes it.
            self._sleeping = True
            ready = dict(poller.poll(0 if self._outbox or self._publish.is_set() else 100))
            self._sleeping = False
            if self._wake_read in ready:
                os.read(self._wake_read, 65536)
                self._woken = False  # after the read, before the outbox is drained: a later reply wakes us again
            if self._socket in ready:
                self._receive()
            if self._publish.is_set():
                self._publish.clear()
                header = self.describe()
                for peer in list(self._peers):
                    self._socket.send_multipart([peer, *records.pack(records.MODELS, header)])
            self._flush()
        self._flush()  # the replies of what stopping the engines failed

    def close(self) -> None:
        self._socket.close(0)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- the socket's thread -------------------------------------------------------------------------------------

    def _receive(self) -> None:
        # Reads while the socket says a message waits, rather than until recv raises Again: at one request in
        # flight the exception, which pyzmq builds in Python, cost more than the read.
        while self._socket.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            peer = frames[0]
            try:
                kind, header, arrays = records.unpack(frames[1:])
            except Exception:  # noqa: BLE001 - a broken record is logged and dropped; the engine goes on
                event(log, "ipc_bad_record", level=logging.ERROR, exc_info=True)
                continue
            if kind == records.SUBMIT:
                self._submit(peer, header, arrays)
            elif kind == records.CANCEL:
                future = self._pending.get((peer, int(header["id"])))
                if future is not None:
                    future.cancel()
            elif kind == records.HELLO:
                self._peers.add(peer)
                self._socket.send_multipart([peer, *records.pack(records.MODELS, self.describe())])

    def _submit(self, peer: bytes, header: dict[str, Any], items: list[Any]) -> None:
        key = (peer, int(header["id"]))
        try:
            engine = self.registry.engine_of(header["model"], header["version"])
            future = engine.submit(items, DecodeOptions(**header["options"]), header["timeout"])
        except Exception as exc:  # noqa: BLE001 - refused at once (queue full, unloaded): the record says why
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            self._outbox.append((key, failed))
            return
        self._pending[key] = future
        future.add_done_callback(lambda done: self._finished(key, done))

    def _finished(self, key: Key, future: Future[Any]) -> None:  # on an engine's thread
        self._outbox.append((key, future))
        if self._sleeping and not self._woken:  # a busy socket thread drains the outbox before it sleeps again
            self._wake()

    def _wake(self) -> None:
        self._woken = True
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _flush(self) -> None:
        while self._outbox:
            (peer, request_id), future = self._outbox.popleft()
            self._pending.pop((peer, request_id), None)
            if future.cancelled():
                continue  # the front-end cancelled it and expects nothing
            error = future.exception()
            frames = records.done(request_id, future.result()) if error is None else records.failed(request_id, error)
            if error is not None and not isinstance(error, ServiceError):
                event(log, "engine_request_failed", level=logging.ERROR, error=repr(error))
            self._socket.send_multipart([peer, *frames])
