"""A front-end's view of several engine processes (server/ipc/remote_models.py), against fake engines: Unix socket
servers in this test that answer with the records an engine process sends. Which engine gets a request, where its
cancellation goes, what a gone engine fails, which engines a version may go to, and what the front-end's views are
built from."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.artifacts import Manifest
from server.errors import NotReady
from server.ipc import framing, records
from server.ipc.remote_models import RemoteModels
from server.runtime import DecoderRuntime
from server.search import Hypothesis
from server.translation import DecodeOptions, TranslationModel

NAME = "tiny-de-en"


class _Connection(asyncio.Protocol):
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.decoder = engine, framing.Decoder()
        self.transport: asyncio.Transport | None = None
        self.described: set[records.Key] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.engine.connections.append(transport)

    def data_received(self, data: bytes) -> None:
        for frames in self.decoder.feed(data):
            self.engine.received(self, *records.unpack(frames))

    def send(self, frames: records.Frames) -> None:
        assert self.transport is not None
        self.transport.write(framing.encode(frames))


class FakeEngine:
    """Answers ``hello`` with a ``models`` record, records every ``submit`` and ``cancel``, answers when told."""

    def __init__(self, address: str, models: list[DecoderRuntime], pid: int) -> None:
        self.address, self.models, self.pid = address, models, pid
        self.submits: dict[int, tuple[_Connection, dict[str, Any]]] = {}  # request id -> (front-end, header)
        self.cancels: list[int] = []
        self.connections: list[asyncio.Transport] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.get_running_loop().create_unix_server(lambda: _Connection(self), self.address)

    def received(self, connection: _Connection, kind: bytes, header: dict[str, Any], _: Any) -> None:
        if kind == records.HELLO:
            state = {"ready": True, "default_model": NAME, "pid": self.pid, "device": "cpu"}
            connection.send(records.models(state, self.models, connection.described))
        elif kind == records.SUBMIT:
            self.submits[int(header["id"])] = (connection, header)
        elif kind == records.CANCEL:
            self.cancels.append(int(header["id"]))

    async def answer(self, request_id: int) -> None:
        connection, _ = self.submits[request_id]
        found = [[Hypothesis([5, 2], -1.5, -0.75, np.full((2, 3), 1 / 3, dtype=np.float32))]]
        connection.send(records.done(request_id, found))

    def close(self) -> None:
        """As the engine's process exiting: it stops listening and its connections close."""
        if self.server is not None:
            self.server.close()
        for transport in self.connections:
            transport.close()


def _model(directory: Path, version: str) -> DecoderRuntime:
    """A version as an engine holds it (its graphs are not needed here)."""
    folder = directory / NAME / version
    return TranslationModel(folder, Manifest.load(folder), None)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _run(tmp_path: Path, engines: list[tuple[list[DecoderRuntime], int]],
         body: Callable[[RemoteModels, list[FakeEngine]], Awaitable[None]]) -> None:
    async def main() -> None:
        addresses = [str(tmp_path / f"engine-{i}.sock") for i in range(len(engines))]
        fakes = [FakeEngine(address, models, pid) for address, (models, pid) in zip(addresses, engines)]
        for fake in fakes:
            await fake.start()
        remote = RemoteModels(addresses)
        await remote.start()
        try:
            await asyncio.wait_for(remote.wait_ready(), 10)
            await _until(lambda: all(f.pid == e.pid and e.ready for f, e in zip(fakes, remote._engines)),
                         "every engine's models record")
            await body(remote, fakes)
        finally:
            await remote.close()
            for fake in fakes:
                fake.close()

    asyncio.run(main())


def _decode(remote: RemoteModels, version: str = "") -> asyncio.Task[list[list[Hypothesis]]]:
    model = remote.get(NAME, version)
    return asyncio.create_task(remote.decode(model, [np.array([7, 8, 2])], DecodeOptions(), None))


def test_requests_go_to_the_least_busy_engine_and_cancellations_follow_them(models_dir: Path,
                                                                             tmp_path: Path) -> None:
    async def body(remote: RemoteModels, engines: list[FakeEngine]) -> None:
        calls = [_decode(remote) for _ in range(4)]
        await _until(lambda: sum(len(e.submits) for e in engines) == 4, "four submits")
        assert [len(e.submits) for e in engines] == [2, 2]
        # A cancelled call's cancellation reaches the engine that holds it, and only that one.
        holder, other = (engines[0], engines[1]) if 1 in engines[0].submits else (engines[1], engines[0])
        cancelled = sorted(holder.submits)
        for request_id in cancelled:
            calls[request_id - 1].cancel()
        await _until(lambda: sorted(holder.cancels) == cancelled, "the cancellations")
        assert other.cancels == []
        # The holder has nothing in flight now, the other engine two: the next two calls both go to the holder
        # (taking the engines in turn would give one to each).
        more = [_decode(remote) for _ in range(2)]
        await _until(lambda: {5, 6} <= set(holder.submits), "the next two submits at the less busy engine")
        assert len(other.submits) == 2
        for engine in engines:
            for request_id in engine.submits:
                if request_id not in cancelled:
                    await engine.answer(request_id)
        for call in [*(c for i, c in enumerate(calls, 1) if i not in cancelled), *more]:
            [[hypothesis]] = await asyncio.wait_for(call, 10)
            assert hypothesis.tokens == [5, 2] and hypothesis.attention.shape == (2, 3)

    _run(tmp_path, [([_model(models_dir, "1")], os.getpid()), ([_model(models_dir, "1")], os.getpid())], body)


def test_a_gone_engine_fails_only_its_own_requests(models_dir: Path, tmp_path: Path) -> None:
    """An engine's connection closes (its process exited): the requests it held fail with NotReady at once, the
    other engine's go on, the front-end stays ready and sends new requests elsewhere."""

    async def body(remote: RemoteModels, engines: list[FakeEngine]) -> None:
        calls = [_decode(remote) for _ in range(2)]
        await _until(lambda: [len(e.submits) for e in engines] == [1, 1], "one submit each")
        doomed = next(call for call, request_id in zip(calls, (1, 2)) if request_id in engines[0].submits)
        survivor = next(call for call in calls if call is not doomed)
        engines[0].close()
        with pytest.raises(NotReady):
            await asyncio.wait_for(doomed, 5)
        assert not survivor.done() and remote.ready
        await engines[1].answer(next(iter(engines[1].submits)))
        assert (await asyncio.wait_for(survivor, 10))[0][0].tokens == [5, 2]
        later = [_decode(remote) for _ in range(3)]
        await _until(lambda: len(engines[1].submits) == 4, "the later requests at the live engine")
        assert len(engines[0].submits) == 1
        for call in later:
            call.cancel()

    _run(tmp_path, [([_model(models_dir, "1")], os.getpid()), ([_model(models_dir, "1")], os.getpid())], body)


def test_with_its_engine_gone_a_call_is_told_the_engine_is_restarting(models_dir: Path, tmp_path: Path) -> None:
    """Not that the server is still loading its models: it served, and the parent is restarting the engine."""

    async def body(remote: RemoteModels, engines: list[FakeEngine]) -> None:
        engines[0].close()
        await _until(lambda: not remote.ready, "the engine's loss")
        with pytest.raises(NotReady, match="the engine process stopped and is being restarted; retry shortly"):
            remote.get(NAME)

    _run(tmp_path, [([_model(models_dir, "1")], os.getpid())], body)


def test_a_version_goes_only_to_the_engines_that_serve_it(models_dir: Path, tmp_path: Path) -> None:
    """While engines differ (one has loaded version 2 and retired 1, the other not yet), both versions are served,
    each by the engines that have it."""
    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME / "1", root / NAME / "1")
    shutil.copytree(root / NAME / "1", root / NAME / "2")
    manifest = json.loads((root / NAME / "2" / "manifest.json").read_text())
    (root / NAME / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))

    async def body(remote: RemoteModels, engines: list[FakeEngine]) -> None:
        assert gc.get_freeze_count() > 0  # the views it opened are settled (server/heap.py)
        assert [m.version for m in remote.models()] == ["1", "2"]
        assert remote.get(NAME).version == "2"  # the highest, as ever
        newer = [_decode(remote, "2") for _ in range(3)]
        older = [_decode(remote, "1") for _ in range(2)]
        await _until(lambda: sum(len(e.submits) for e in engines) == 5, "five submits")
        assert sorted(h["version"] for _, h in engines[0].submits.values()) == ["1", "1"]
        assert sorted(h["version"] for _, h in engines[1].submits.values()) == ["2", "2", "2"]
        for call in [*newer, *older]:
            call.cancel()

    gc.unfreeze()
    try:
        _run(tmp_path, [([_model(root, "1")], os.getpid()), ([_model(root, "2")], os.getpid())], body)
    finally:
        gc.unfreeze()


def test_views_are_built_from_what_the_engine_sent_not_from_the_model_folder(models_dir: Path,
                                                                               tmp_path: Path) -> None:
    """The version's folder is gone once the engine has loaded it: the front-end's view, built from the manifest and
    tokenizer in the engine's models record, tokenizes as the engine's copy does."""
    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME / "1", root / NAME / "1")
    loaded = _model(root, "1")
    shutil.rmtree(root)

    async def body(remote: RemoteModels, engines: list[FakeEngine]) -> None:
        view = remote.get(NAME)
        assert view is not loaded and view.manifest == loaded.manifest
        text = "Das Haus ist klein."
        assert view.tokenizer.encode_ids(text) == loaded.tokenizer.encode_ids(text)

    _run(tmp_path, [([loaded], os.getpid())], body)


def test_a_front_end_that_can_build_no_view_is_not_ready(models_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A version whose view cannot be built from the record (here, bytes that are no SentencePiece model) is logged
    and not served; with no other version the front-end is not ready and says why, rather than ready and answering
    every call NOT_FOUND."""
    model = _model(models_dir, "1")

    class BrokenTokenizerEngine(FakeEngine):
        def received(self, connection: _Connection, kind: bytes, header: dict[str, Any], _: Any) -> None:
            if kind == records.HELLO:
                entry = {"name": NAME, "version": "1", "directory": str(model.directory), "variant": "fp32",
                         "manifest": dataclasses.asdict(model.manifest), "tokenizer": 0}
                state = {"ready": True, "default_model": NAME, "pid": self.pid, "device": "cpu", "models": [entry]}
                connection.send(records.pack(records.MODELS, state, [np.frombuffer(b"not a model", np.uint8)]))

    async def main() -> None:
        address = str(tmp_path / "engine-0.sock")
        engine = BrokenTokenizerEngine(address, [], os.getpid())
        await engine.start()
        remote = RemoteModels([address])
        await remote.start()
        try:
            await _until(lambda: remote._engines[0].ready, "the engine's models record")
            assert not remote.ready
            with pytest.raises(NotReady, match="could not build a view of any version"):
                remote.get(NAME)
        finally:
            await remote.close()
            engine.close()

    with caplog.at_level(logging.ERROR, logger="attn.ipc"):
        asyncio.run(main())
    assert any("model_view_failed" in r.getMessage() for r in caplog.records)
