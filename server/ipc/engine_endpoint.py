"""The engine process's side of the IPC: a Unix socket that every front-end connects to, serving their records.

One thread owns the sockets. It accepts the front-ends' connections, reads ``submit`` records and hands each to its
model's engine (:meth:`server.engine.Engine.submit`, which returns at once); an engine thread that finishes a request
only appends its future to the outbox and writes a byte to a wake-up pipe, which the socket's thread polls beside
the sockets, so replies are packed and sent by the socket's thread, never by an engine's. ``cancel`` cancels the
future (the engine drops the request at its next step); a front-end whose connection closes (it exited or crashed)
has every request it still held cancelled the same way.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from server.errors import ServiceError
from server.ipc import framing, records
from server.logs import event
from server.registry import Registry
from server.translation import DecodeOptions

log = logging.getLogger("attn.ipc")

MAX_UNSENT_BYTES = 256 << 20  # replies a front-end has not read; past this it is taken for stuck and disconnected
READ_BYTES = 1 << 20


class _FrontEnd:
    """One front-end's connection: what it sent that is not a whole record yet, what it has not read yet."""

    def __init__(self, connection: socket.socket, number: int) -> None:
        self.connection, self.number = connection, number
        self.decoder = framing.Decoder()
        self.unsent = bytearray()
        self.described: set[records.Key] = set()  # versions whose manifest and tokenizer it has been sent


Key = tuple[int, int]  # (front-end connection's number, its request id)


class EngineEndpoint:
    def __init__(self, registry: Registry, address: str, state: Callable[[], dict[str, Any]]) -> None:
        """``address``: the socket's path; ``state`` gives what the ``models`` record says besides the versions
        served (readiness, the default model, the process, the device)."""
        self.registry, self.address, self.state = registry, address, state
        Path(address).unlink(missing_ok=True)  # left by an engine process that crashed
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(address)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._outbox: deque[tuple[Key, Future[Any]]] = deque()
        self._pending: dict[Key, Future[Any]] = {}
        self._front_ends: dict[int, _FrontEnd] = {}
        self._numbers = itertools.count(1)
        self._publish = threading.Event()
        self._woken = False  # a wake-up byte is in the pipe and not yet read
        self._sleeping = False  # the socket's thread is (about to be) in select

    def publish(self) -> None:
        """Sends the ``models`` record to every front-end (after loading or reloading); any thread may call it."""
        self._publish.set()
        self._wake()

    def run(self, stop: threading.Event) -> None:
        """Serves until ``stop`` is set, then sends the replies still in the outbox (set it after closing the
        registry, which fails what is left). A failure of this thread's own code ends it, logged: the engine
        process then exits (:func:`server.processes.run_engine` watches it) and is restarted, where a process whose
        engines no request could reach any more would hold every call it had until its deadline."""
        try:
            self._serve(stop)
        except Exception:
            event(log, "ipc_failed", level=logging.ERROR, exc_info=True)

    def _serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # Engine threads write a wake-up byte only while this thread sleeps in select: it is marked sleeping
            # before the outbox is looked at, so a reply appended after that look finds the mark and wakes it.
            self._sleeping = True
            ready = self._selector.select(0 if self._outbox or self._publish.is_set() else 0.1)
            self._sleeping = False
            for key, mask in ready:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_read:
                    os.read(self._wake_read, 65536)
                    self._woken = False  # after the read, before the outbox is drained: a later reply wakes us
                elif key.data.number in self._front_ends:  # not disconnected earlier in this loop
                    if mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                    # A front-end gone while replies to it wait is readable and writable at once (epoll's HUP), and
                    # the failed write has disconnected it.
                    if mask & selectors.EVENT_READ and key.data.number in self._front_ends:
                        self._receive(key.data)
            if self._publish.is_set():
                self._publish.clear()
                for front_end in list(self._front_ends.values()):
                    self._send_models(front_end)
            self._flush()
        self._flush()  # the replies of what stopping the engines failed

    def close(self) -> None:
        for front_end in list(self._front_ends.values()):
            front_end.connection.close()
        self._selector.close()
        self._listener.close()
        Path(self.address).unlink(missing_ok=True)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- the socket's thread -------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return
            connection.setblocking(False)
            front_end = _FrontEnd(connection, next(self._numbers))
            self._front_ends[front_end.number] = front_end
            self._selector.register(connection, selectors.EVENT_READ, front_end)

    def _receive(self, front_end: _FrontEnd) -> None:
        try:
            data = front_end.connection.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect(front_end, "closed")
            return
        try:
            messages = front_end.decoder.feed(data)
        except framing.BrokenStream as exc:
            event(log, "ipc_bad_stream", level=logging.ERROR, error=str(exc))
            self._disconnect(front_end, "broken stream")
            return
        for frames in messages:
            if front_end.number not in self._front_ends:  # a reply to it failed to send: what is left has no reader
                return
            try:
                kind, header, arrays = records.unpack(frames)
            except Exception:  # noqa: BLE001 - a broken record is logged and dropped; the engine goes on
                event(log, "ipc_bad_record", level=logging.ERROR, exc_info=True)
                continue
            if kind == records.SUBMIT:
                self._submit(front_end.number, header, arrays)
            elif kind == records.CANCEL:
                future = self._pending.get((front_end.number, int(header["id"])))
                if future is not None:
                    future.cancel()
            elif kind == records.HELLO:
                self._send_models(front_end)

    def _send_models(self, front_end: _FrontEnd) -> None:
        self._send(front_end, framing.encode(records.models(self.state(), self.registry.models(),
                                                            front_end.described)))

    def _submit(self, number: int, header: dict[str, Any], items: list[Any]) -> None:
        key = (number, int(header["id"]))
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
        # A front-end's replies leave in one write: a step that finishes many requests (a GPU's batches of hundreds
        # of rows) costs one send and one wake-up of each front-end, not one of each per request.
        replies: dict[int, list[bytes]] = {}
        while self._outbox:
            (number, request_id), future = self._outbox.popleft()
            self._pending.pop((number, request_id), None)
            if number not in self._front_ends or future.cancelled():
                continue  # the front-end cancelled it, or is gone, and expects nothing
            error = future.exception()
            if error is not None and not isinstance(error, ServiceError):
                event(log, "engine_request_failed", level=logging.ERROR, error=repr(error))
            try:
                frames = records.done(request_id, future.result()) if error is None else records.failed(request_id,
                                                                                                        error)
            except Exception as exc:  # a reply that cannot be packed (a bug): its request fails, not this thread
                event(log, "engine_reply_failed", level=logging.ERROR, exc_info=True)
                frames = records.failed(request_id, exc)
            replies.setdefault(number, []).append(framing.encode(frames))
        for number, messages in replies.items():
            self._send(self._front_ends[number], messages[0] if len(messages) == 1 else b"".join(messages))

    def _send(self, front_end: _FrontEnd, message: bytes) -> None:
        """Writes what it can of ``message`` now; the rest waits in ``unsent`` for the socket to take it."""
        if front_end.unsent:  # behind what waits: keep the order
            front_end.unsent += message
        else:
            try:
                sent = front_end.connection.send(message)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._disconnect(front_end, "send failed")
                return
            if sent == len(message):
                return
            front_end.unsent += memoryview(message)[sent:]
            self._selector.modify(front_end.connection, selectors.EVENT_READ | selectors.EVENT_WRITE, front_end)
        if len(front_end.unsent) > MAX_UNSENT_BYTES:
            self._disconnect(front_end, f"more than {MAX_UNSENT_BYTES} bytes of replies unread")

    def _write(self, front_end: _FrontEnd) -> None:
        try:
            sent = front_end.connection.send(front_end.unsent)
        except BlockingIOError:
            return
        except OSError:
            self._disconnect(front_end, "send failed")
            return
        del front_end.unsent[:sent]
        if not front_end.unsent:
            self._selector.modify(front_end.connection, selectors.EVENT_READ, front_end)

    def _disconnect(self, front_end: _FrontEnd, why: str) -> None:
        """Closes a front-end's connection; the requests it still held are cancelled (nobody waits for them)."""
        del self._front_ends[front_end.number]
        self._selector.unregister(front_end.connection)
        front_end.connection.close()
        held = [future for (number, _), future in self._pending.items() if number == front_end.number]
        for future in held:
            future.cancel()
        if why != "closed" or held:
            event(log, "frontend_disconnected", level=logging.WARNING, reason=why, cancelled_requests=len(held))
