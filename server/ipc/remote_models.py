"""A front-end process's view of the engine processes' models (:class:`server.models.Models` over Unix sockets).

The front-end holds a view of each served version without its graphs (tokenizer, manifest, limits: what validation,
tokenization and response building need), built from the manifest and tokenizer the engine sends with its ``models``
record: never from the model folder, whose files may have changed since the engine read them. It sends only compact
records to an engine: token ids or pixels in, token ids, scores and attention matrices back
(:mod:`server.ipc.records`, framed by :mod:`server.ipc.framing`).

With several engine processes (``ATTN_ENGINES``) each loads every model, and a request goes to the ready engine that
serves its version with the fewest of this front-end's requests in flight. The front-end is ready while any engine
is. An engine process that is gone closes its connection: every request it held fails with ``UNAVAILABLE`` at once
(:class:`~server.errors.NotReady`), the others go on serving, and the front-end connects again until the restarted
process answers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server import heap
from server.artifacts import Manifest, Tokenizer
from server.errors import NotReady
from server.ipc import framing, records
from server.logs import event
from server.models import ModelIndex
from server.registry import RUNTIMES
from server.runtime import DecoderRuntime
from server.search import Hypothesis

log = logging.getLogger("attn.ipc")

CONNECT_SECONDS = 0.2  # how often an engine process that is not listening (yet, or again) is tried

Key = records.Key
Announcement = tuple[dict[str, Any], list[np.ndarray]]  # a models record's header and arrays
Answer = asyncio.Future[tuple[dict[str, Any], list[np.ndarray]]]


class _Link(asyncio.Protocol):
    """The connection to one engine process: whole records go to :meth:`RemoteModels._record` as they arrive (no
    reader task between the socket and the waiting call)."""

    def __init__(self, owner: RemoteModels, engine: _Engine) -> None:
        self.owner, self.engine = owner, engine
        self.decoder = framing.Decoder()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except framing.BrokenStream as exc:
            event(log, "ipc_bad_stream", level=logging.ERROR, error=str(exc))
            assert self.transport is not None
            self.transport.close()
            return
        for frames in messages:
            self.owner._record(self.engine, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._disconnected(self.engine)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, frames: records.Frames) -> None:
        assert self.transport is not None
        self.transport.write(framing.encode(frames))


class _Engine:
    """One engine process as this front-end sees it: its connection, what it serves, the requests it holds."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.link: _Link | None = None  # while connected
        self.announced: asyncio.Queue[Announcement] = asyncio.Queue()  # its models records, in order
        self.pending: dict[int, Answer] = {}
        self.serves: set[Key] = set()
        self.default_model = ""
        self.device = ""
        self.pid = 0
        self.ready = False


class RemoteModels(ModelIndex):
    def __init__(self, addresses: Sequence[str], on_change: Callable[[bool], None] = lambda ready: None) -> None:
        """``addresses``: the engine processes' socket paths; ``on_change(ready)`` is called on the event loop
        whenever readiness changes (health follows it)."""
        self.on_change = on_change
        self.default_model = ""
        self._models: dict[Key, DecoderRuntime] = {}
        self._views: dict[Key, DecoderRuntime] = {}  # whichever engines serve them
        self._unopened: dict[Key, str] = {}  # versions an engine sent whose view could not be built: why
        self._ready = False
        self._ids = itertools.count(1)
        self._turn = itertools.count()  # the engine asked first among those equally busy
        self._engines = [_Engine(address) for address in addresses]
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_connected(engine)) for engine in self._engines]

    async def wait_ready(self) -> None:
        while not self._ready:
            await asyncio.sleep(CONNECT_SECONDS)

    async def close(self) -> None:
        self._closing = True  # the connections closed from here on are ours: no engine was lost
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self._engines:
            if engine.link is not None and engine.link.transport is not None:
                engine.link.transport.close()

    async def decode(self, model: DecoderRuntime, items: Sequence[Any], options: Any,
                     timeout: float | None) -> list[list[Hypothesis]]:
        engine = self._choose((model.name, model.version))
        link = engine.link
        assert link is not None  # a ready engine is connected
        request_id = next(self._ids)
        answer: Answer = asyncio.get_running_loop().create_future()
        engine.pending[request_id] = answer
        try:
            link.send(records.submit(request_id, model.name, model.version, options, timeout, items))
            header, arrays = await answer
        except asyncio.CancelledError:
            if engine.pending.pop(request_id, None) is not None and engine.link is link:
                link.send(records.pack(records.CANCEL, {"id": request_id}))
            raise
        finally:
            engine.pending.pop(request_id, None)
        return records.hypotheses(header, arrays)

    def _choose(self, key: Key) -> _Engine:
        """The ready engine serving ``key`` with the fewest requests in flight; ties go round the engines."""
        engines = self._engines
        if len(engines) == 1:  # the default: nothing to choose
            if not engines[0].ready:
                raise NotReady("the engine process is not ready; retry shortly")
            return engines[0]
        start = next(self._turn) % len(engines)
        candidates = [e for e in engines[start:] + engines[:start] if e.ready and key in e.serves]
        if not candidates:
            raise NotReady(f"no engine process serving {key[0]} version {key[1]} is ready; retry shortly")
        return min(candidates, key=lambda e: len(e.pending))

    # -- the connections -----------------------------------------------------------------------------------------

    async def _keep_connected(self, engine: _Engine) -> None:
        """Connects to the engine process, greets it, applies its ``models`` records in order; connects again
        after it is gone (the parent restarts it at the same address)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, link = await loop.create_unix_connection(lambda: _Link(self, engine), engine.address)
            except OSError:  # not listening yet, or not again
                await asyncio.sleep(CONNECT_SECONDS)
                continue
            engine.link = link
            link.send(records.pack(records.HELLO, {"pid": os.getpid()}))
            while not link.closed.done():
                announced = asyncio.ensure_future(engine.announced.get())
                await asyncio.wait([announced, link.closed], return_when=asyncio.FIRST_COMPLETED)
                if not announced.done():
                    announced.cancel()
                    break
                await self._update(engine, link, *announced.result())
            await asyncio.sleep(CONNECT_SECONDS)

    def _record(self, engine: _Engine, frames: list[bytes]) -> None:
        try:
            kind, header, arrays = records.unpack(frames)
        except Exception:  # noqa: BLE001 - logged and dropped
            event(log, "ipc_bad_record", level=logging.ERROR, exc_info=True)
            return
        if kind == records.MODELS:
            engine.announced.put_nowait((header, arrays))
            return
        answer = engine.pending.pop(int(header["id"]), None)
        if answer is None or answer.done():
            return  # cancelled meanwhile
        if kind == records.DONE:
            answer.set_result((header, arrays))
        elif kind == records.FAILED:
            answer.set_exception(records.error_of(header))

    def _disconnected(self, engine: _Engine) -> None:
        """The engine process closed the connection: it exited or crashed. What it held fails now."""
        engine.link = None
        if self._closing:
            return
        while not engine.announced.empty():  # what it announced before it went no longer holds
            engine.announced.get_nowait()
        if engine.ready or engine.pending:
            event(log, "engine_lost", level=logging.ERROR, engine_pid=engine.pid,
                  failed_requests=len(engine.pending))
        engine.ready = False
        # Calls that find no engine ready from here on are told why; "still loading" would send an operator
        # looking at a start-up, and the parent is restarting the engine.
        self.not_ready = "the engine process stopped and is being restarted; retry shortly"
        failure = NotReady("the engine process stopped while the request was in it; retry")
        for answer in engine.pending.values():
            if not answer.done():
                answer.set_exception(failure)
        engine.pending.clear()
        self._refresh()

    async def _update(self, engine: _Engine, link: _Link, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """A ``models`` record: builds a view of each version it describes (off the event loop). An engine describes
        a version once per connection, so a restarted engine's replace what this front-end held: it may have read a
        version's files anew."""
        wanted = {(m["name"], m["version"]): m for m in header["models"]}
        viewed = dict(self._views)
        described = records.views(header, arrays)
        opened, failed = await asyncio.to_thread(_open_views, wanted, described) if described else ({}, {})
        self._views.update(opened)
        self._note_unopened(opened, failed)  # not served here: _refresh serves only the versions with a view
        if engine.link is not link:  # the engine went away while the versions were being opened
            return
        engine.serves, engine.default_model, engine.device = set(wanted), header["default_model"], header["device"]
        engine.pid = int(header["pid"])
        was, engine.ready = engine.ready, bool(header["ready"])
        if was != engine.ready:
            event(log, "engine_ready" if engine.ready else "engine_not_ready", engine_pid=engine.pid,
                  models=[f"{name}/{version}" for name, version in sorted(engine.serves)])
        self._refresh()
        if self._views != viewed:
            heap.settle()  # what this process keeps changed: freeze it anew (server/heap.py)

    def _note_unopened(self, opened: dict[Key, DecoderRuntime], failed: dict[Key, str]) -> None:
        """Logs each version whose view this front-end could not build from what the engine sent, once per error."""
        for key in opened:
            self._unopened.pop(key, None)
        for key, error in failed.items():
            if self._unopened.get(key) != error:
                event(log, "model_view_failed", level=logging.ERROR, model=key[0], version=key[1], error=error,
                      reason="the engine serves this version but this front-end cannot build its view from the "
                             "manifest and tokenizer the engine sent; it answers for the other versions")
        self._unopened.update(failed)

    def _refresh(self) -> None:
        """The served versions: those of the ready engines (all of them while none is, so that lookups still say
        what the server serves); readiness follows the engines, and this front-end having opened one of their
        versions: with none readable here it would say SERVING and answer every call NOT_FOUND, where NOT_SERVING
        and UNAVAILABLE send probes and retries elsewhere."""
        ready = [e for e in self._engines if e.ready]
        serving = set().union(*(e.serves for e in ready or self._engines))
        device = next((e.device for e in ready or self._engines if e.device), "")
        for view in self._views.values():
            view.device_name = device
        self._views = {key: view for key, view in self._views.items()
                       if any(key in e.serves for e in self._engines)}
        self._models = {key: self._views[key] for key in serving if key in self._views}
        self.default_model = next((e.default_model for e in ready or self._engines if e.default_model), "")
        if ready and not self._models:
            self.not_ready = ("this front-end could not build a view of any version the engine serves "
                              "(model_view_failed in the server's log); retry")
        was, self._ready = self._ready, bool(ready) and bool(self._models)
        if was != self._ready:
            self.on_change(self._ready)


def _open_views(wanted: dict[Key, dict[str, Any]], described: dict[Key, tuple[dict[str, Any], bytes]]) -> tuple[
        dict[Key, DecoderRuntime], dict[Key, str]]:
    """A view of each version described (its manifest and tokenizer as the engine loaded them), or why there is
    none."""
    opened: dict[Key, DecoderRuntime] = {}
    failed: dict[Key, str] = {}
    for key, (manifest, tokenizer) in described.items():
        model = wanted[key]
        try:
            opened[key] = _view(model, Manifest.from_dict(manifest), Tokenizer(tokenizer))
        except Exception as exc:  # noqa: BLE001 - one version that cannot be viewed must not stop the others
            failed[key] = str(exc)
    return opened, failed


def _view(model: dict[str, Any], manifest: Manifest, tokenizer: Tokenizer) -> DecoderRuntime:
    variant = model["variant"] if model["variant"] != "fp32" else ""
    return RUNTIMES[manifest.family](Path(model["directory"]), manifest, None, variant, 0, tokenizer=tokenizer)
