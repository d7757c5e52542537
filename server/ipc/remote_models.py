"""A front-end process's view of the engine processes' models (:class:`server.models.Models` over ZeroMQ).

The front-end opens each served version without its graphs (tokenizer, manifest, limits: what validation,
tokenization and response building need) and sends only compact records to an engine: token ids or pixels in,
token ids, scores and attention matrices back.

With several engine processes (``ATTN_ENGINES``) each loads every model, and a request goes to the ready engine that
serves its version with the fewest of this front-end's requests in flight. The front-end is ready while any engine
is: an engine process that is gone fails every request it held with ``UNAVAILABLE`` at once
(:class:`~server.errors.NotReady`), the others go on serving, and the front-end greets the gone one again until the
restarted process answers.
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
import zmq
import zmq.asyncio

from server.artifacts import Manifest
from server.errors import NotReady
from server.ipc import records
from server.logs import event
from server.models import ModelIndex
from server.registry import RUNTIMES
from server.runtime import DecoderRuntime
from server.search import Hypothesis

log = logging.getLogger("attn.ipc")

WATCH_SECONDS = 0.1  # how often the engine processes' liveness is checked
HELLO_SECONDS = 0.5  # how often an engine that has not answered is greeted again

Key = tuple[str, str]  # (model name, version)
Answer = asyncio.Future[tuple[dict[str, Any], list[np.ndarray]]]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class _Engine:
    """One engine process as this front-end sees it: its socket, what it serves, the requests it holds."""

    def __init__(self, context: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.pending: dict[int, Answer] = {}
        self.serves: set[Key] = set()
        self.default_model = ""
        self.device = ""
        self.pid = 0
        self.ready = False
        self.since_hello = HELLO_SECONDS


class RemoteModels(ModelIndex):
    def __init__(self, addresses: Sequence[str], on_change: Callable[[bool], None] = lambda ready: None) -> None:
        """``addresses``: the engine processes' sockets; ``on_change(ready)`` is called on the event loop whenever
        readiness changes (health follows it)."""
        self.on_change = on_change
        self.default_model = ""
        self._models: dict[Key, DecoderRuntime] = {}
        self._views: dict[Key, DecoderRuntime] = {}  # opened once, whichever engines serve them
        self._ready = False
        self._ids = itertools.count(1)
        self._turn = itertools.count()  # the engine asked first among those equally busy
        self._context = zmq.asyncio.Context()
        self._engines = [_Engine(self._context, address) for address in addresses]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        for engine in self._engines:
            engine.socket.connect(engine.address)
        self._tasks = [*(asyncio.create_task(self._read(engine)) for engine in self._engines),
                       asyncio.create_task(self._watch())]

    async def wait_ready(self) -> None:
        while not self._ready:
            await asyncio.sleep(WATCH_SECONDS)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self._engines:
            engine.socket.close(0)
        self._context.term()

    async def decode(self, model: DecoderRuntime, items: Sequence[Any], options: Any,
                     timeout: float | None) -> list[list[Hypothesis]]:
        engine = self._choose((model.name, model.version))
        request_id = next(self._ids)
        answer: Answer = asyncio.get_running_loop().create_future()
        engine.pending[request_id] = answer
        try:
            await engine.socket.send_multipart(
                records.submit(request_id, model.name, model.version, options, timeout, items), copy=False)
            header, arrays = await answer
        except asyncio.CancelledError:
            if engine.pending.pop(request_id, None) is not None and engine.ready:
                await engine.socket.send_multipart(records.pack(records.CANCEL, {"id": request_id}))
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

    # -- background tasks ----------------------------------------------------------------------------------------

    async def _read(self, engine: _Engine) -> None:
        while True:
            frames = await engine.socket.recv_multipart()
            try:
                kind, header, arrays = records.unpack(frames)
            except Exception:  # noqa: BLE001 - logged and dropped
                event(log, "ipc_bad_record", level=logging.ERROR, exc_info=True)
                continue
            if kind == records.MODELS:
                await self._update(engine, header)
                continue
            answer = engine.pending.pop(int(header["id"]), None)
            if answer is None or answer.done():
                continue  # cancelled meanwhile
            if kind == records.DONE:
                answer.set_result((header, arrays))
            elif kind == records.FAILED:
                answer.set_exception(records.error_of(header))

    async def _watch(self) -> None:
        while True:
            for engine in self._engines:
                if engine.ready and not alive(engine.pid):
                    self._lost(engine)
                if not engine.ready:
                    engine.since_hello += WATCH_SECONDS
                    if engine.since_hello >= HELLO_SECONDS:
                        engine.since_hello = 0.0
                        await engine.socket.send_multipart(records.pack(records.HELLO, {"pid": os.getpid()}))
            await asyncio.sleep(WATCH_SECONDS)

    async def _update(self, engine: _Engine, header: dict[str, Any]) -> None:
        """A ``models`` record: opens the versions not seen before (off the event loop)."""
        wanted = {(m["name"], m["version"]): m for m in header["models"]}
        fresh = [(key, m) for key, m in wanted.items() if key not in self._views]
        if fresh:
            opened = await asyncio.to_thread(lambda: [(key, _view(m)) for key, m in fresh])
            for key, view in opened:
                self._views.setdefault(key, view)
        engine.serves, engine.default_model, engine.device = set(wanted), header["default_model"], header["device"]
        engine.pid = int(header["pid"])
        was, engine.ready = engine.ready, bool(header["ready"]) and alive(engine.pid)
        if was != engine.ready:
            event(log, "engine_ready" if engine.ready else "engine_not_ready", engine_pid=engine.pid,
                  models=[f"{name}/{version}" for name, version in sorted(engine.serves)])
        self._refresh()

    def _lost(self, engine: _Engine) -> None:
        event(log, "engine_lost", level=logging.ERROR, engine_pid=engine.pid, failed_requests=len(engine.pending))
        engine.ready = False
        failure = NotReady("the engine process stopped while the request was in it; retry")
        for answer in engine.pending.values():
            if not answer.done():
                answer.set_exception(failure)
        engine.pending.clear()
        self._refresh()

    def _refresh(self) -> None:
        """The served versions: those of the ready engines (all of them while none is, so that lookups still say
        what the server serves); readiness follows the engines."""
        ready = [e for e in self._engines if e.ready]
        serving = set().union(*(e.serves for e in ready or self._engines))
        device = next((e.device for e in ready or self._engines if e.device), "")
        for view in self._views.values():
            view.device_name = device
        self._views = {key: view for key, view in self._views.items()
                       if any(key in e.serves for e in self._engines)}
        self._models = {key: self._views[key] for key in serving if key in self._views}
        self.default_model = next((e.default_model for e in ready or self._engines if e.default_model), "")
        was, self._ready = self._ready, bool(ready)
        if was != self._ready:
            self.on_change(self._ready)


def _view(model: dict[str, Any]) -> DecoderRuntime:
    directory = Path(model["directory"])
    manifest = Manifest.load(directory)
    return RUNTIMES[manifest.family](directory, manifest, None, model["variant"] if model["variant"] != "fp32"
                                     else "", 0)
