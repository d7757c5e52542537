"""A front-end process's view of the engine process's models (:class:`server.models.Models` over ZeroMQ).

The front-end opens each served version without its graphs (tokenizer, manifest, limits: what validation,
tokenization and response building need) and sends only compact records to the engine: token ids or pixels in,
token ids, scores and attention matrices back. It is ready once the engine's ``models`` record says so, and stops
being ready the moment the engine process is gone: every request it held then fails with ``UNAVAILABLE`` at once
(:class:`~server.errors.NotReady`), and it greets the engine again until the restarted one answers.
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

WATCH_SECONDS = 0.1  # how often the engine process's liveness is checked
HELLO_SECONDS = 0.5  # how often an engine that has not answered is greeted again


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


class RemoteModels(ModelIndex):
    def __init__(self, address: str, on_change: Callable[[bool], None] = lambda ready: None) -> None:
        """``on_change(ready)`` is called on the event loop whenever readiness changes (health follows it)."""
        self.address, self.on_change = address, on_change
        self.default_model = ""
        self._models: dict[tuple[str, str], DecoderRuntime] = {}
        self._ready = False
        self._engine_pid = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[np.ndarray]]]] = {}
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        self._socket.connect(self.address)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]

    async def wait_ready(self) -> None:
        while not self._ready:
            await asyncio.sleep(WATCH_SECONDS)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.close(0)
        self._context.term()

    async def decode(self, model: DecoderRuntime, items: Sequence[Any], options: Any,
                     timeout: float | None) -> list[list[Hypothesis]]:
        if not self._ready:
            raise NotReady("the engine process is not ready; retry shortly")
        request_id = next(self._ids)
        answer: asyncio.Future[tuple[dict[str, Any], list[np.ndarray]]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            await self._socket.send_multipart(
                records.submit(request_id, model.name, model.version, options, timeout, items), copy=False)
            header, arrays = await answer
        except asyncio.CancelledError:
            if self._pending.pop(request_id, None) is not None and self._ready:
                await self._socket.send_multipart(records.pack(records.CANCEL, {"id": request_id}))
            raise
        finally:
            self._pending.pop(request_id, None)
        return records.hypotheses(header, arrays)

    # -- background tasks ----------------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                kind, header, arrays = records.unpack(frames)
            except Exception:  # noqa: BLE001 - logged and dropped
                event(log, "ipc_bad_record", level=logging.ERROR, exc_info=True)
                continue
            if kind == records.MODELS:
                await self._update(header)
                continue
            answer = self._pending.pop(int(header["id"]), None)
            if answer is None or answer.done():
                continue  # cancelled meanwhile
            if kind == records.DONE:
                answer.set_result((header, arrays))
            elif kind == records.FAILED:
                answer.set_exception(records.error_of(header))

    async def _watch(self) -> None:
        since_hello = HELLO_SECONDS
        while True:
            if self._ready and not alive(self._engine_pid):
                self._lost()
            if not self._ready:
                since_hello += WATCH_SECONDS
                if since_hello >= HELLO_SECONDS:
                    since_hello = 0.0
                    await self._socket.send_multipart(records.pack(records.HELLO, {"pid": os.getpid()}))
            await asyncio.sleep(WATCH_SECONDS)

    async def _update(self, header: dict[str, Any]) -> None:
        """A ``models`` record: opens the versions not seen before (off the event loop), drops retired ones."""
        wanted = {(m["name"], m["version"]): m for m in header["models"]}
        known = dict(self._models)
        fresh = [m for key, m in wanted.items() if key not in known]
        if fresh:
            opened = await asyncio.to_thread(lambda: [_view(m) for m in fresh])
            known.update({(v.name, v.version): v for v in opened})
        for view in known.values():
            view.device_name = header["device"]
        self._models = {key: known[key] for key in wanted}
        self.default_model = header["default_model"]
        self._engine_pid = int(header["pid"])
        was, self._ready = self._ready, bool(header["ready"]) and alive(self._engine_pid)
        if was != self._ready:
            event(log, "engine_ready" if self._ready else "engine_not_ready", engine_pid=self._engine_pid,
                  models=[f"{name}/{version}" for name, version in self._models])
            self.on_change(self._ready)

    def _lost(self) -> None:
        event(log, "engine_lost", level=logging.ERROR, engine_pid=self._engine_pid, failed_requests=len(self._pending))
        self._ready = False
        failure = NotReady("the engine process stopped while the request was in it; retry")
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(failure)
        self._pending.clear()
        self.on_change(False)


def _view(model: dict[str, Any]) -> DecoderRuntime:
    directory = Path(model["directory"])
    manifest = Manifest.load(directory)
    return RUNTIMES[manifest.family](directory, manifest, None, model["variant"] if model["variant"] != "fp32"
                                     else "", 0)
