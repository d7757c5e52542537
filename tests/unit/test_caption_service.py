"""The Caption serving path around the engine, without sockets: what it keeps of a request's image while the
caption is decoded, and where a call that ended (deadline, cancellation) stops preparing its image."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from attention_pb.v1 import attention_pb2 as pb
from server import codec, service
from server.captioning import CaptionModel
from server.errors import DeadlineExceeded
from server.imaging import DecodedImage, ImageLimits
from server.metrics import Metrics
from server.settings import Settings
from server.translation import DecodeOptions
from tests.unit.test_caption_imaging import encode


class Captioner:
    """What run_caption asks of a model: its input for a picture, and results for the pictures' sizes."""

    def pixels(self, image: DecodedImage) -> np.ndarray:
        return np.zeros((3, 8, 8), dtype=np.float32)

    def finish(self, sizes: list[tuple[int, int]], found: list[Any]) -> list[tuple[int, int]]:
        return sizes


def test_no_decoded_picture_is_held_while_its_caption_is_decoded(monkeypatch: Any) -> None:
    pictures: list[weakref.ref[Image.Image]] = []
    decode = service.decode

    def decoding(data: bytes, limits: ImageLimits) -> DecodedImage:
        decoded = decode(data, limits)
        pictures.append(weakref.ref(decoded.image))
        return decoded

    class Engine:
        async def decode(self, model: Any, items: list[np.ndarray], options: Any, timeout: Any) -> list[Any]:
            gc.collect()  # a picture still alive now is held by the call for as long as the engine takes
            assert pictures and [p for p in pictures if p() is not None] == [], "the decoded picture is still held"
            return [[]]

    monkeypatch.setattr(service, "decode", decoding)
    job = codec.CaptionJob(encode(Image.new("RGB", (300, 200), "red"), "PNG"), ImageLimits(),
                           DecodeOptions(beam_size=1), codec.FULL)
    with ThreadPoolExecutor(1) as pool:
        servicer = service.AttentionServicer(Engine(), pool, Settings(), None, lambda: False)  # type: ignore[arg-type]
        result = asyncio.run(servicer.run_caption(Captioner(), job, None))  # type: ignore[arg-type]
    assert result == (300, 200)  # the size is all the answer needs of the picture


class Stages:
    """Records which stages of a Caption call ran: the image's decode, its resize (the model's ``pixels``), the
    engine."""

    def __init__(self, monkeypatch: Any, decode_until: float = 0.0,
                 decoding: threading.Event | None = None, release: threading.Event | None = None) -> None:
        self.ran: list[str] = []
        decode = service.decode

        def slow_decode(data: bytes, limits: ImageLimits) -> DecodedImage:
            self.ran.append("decode")
            if decoding is not None and release is not None:
                decoding.set()
                assert release.wait(30), "the test never released the decode"
            time.sleep(max(0.0, decode_until - time.monotonic()))
            return decode(data, limits)

        monkeypatch.setattr(service, "decode", slow_decode)


class StagedCaptioner(CaptionModel):
    """A captioning model for the handler's checks, without graphs; its resize is recorded."""

    name, version, max_target_tokens = "fake-captioner", "1", 20

    def __init__(self, stages: Stages) -> None:  # no graphs to load
        self.stages = stages

    def pixels(self, image: DecodedImage) -> np.ndarray:
        self.stages.ran.append("resize")
        return np.zeros((3, 8, 8), dtype=np.float32)


class StagedModels:
    """The model registry and its engine, as the handler sees them; an expired request fails as the engine's does."""

    def __init__(self, model: StagedCaptioner) -> None:
        self.model = model

    def get_for(self, family: str, name: str, version: str) -> StagedCaptioner:
        return self.model

    async def decode(self, model: Any, items: list[np.ndarray], options: Any, timeout: float | None) -> list[Any]:
        self.model.stages.ran.append("engine")
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request was complete")
        return [[]]


class Aborted(Exception):
    pass


class CallContext:
    """A gRPC call's context as the rpc wrapper uses it, with ``seconds`` left before its deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def add_done_callback(self, callback: Any) -> None:
        pass

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        self.code = code
        raise Aborted(message)


def staged_job() -> codec.CaptionJob:
    return codec.CaptionJob(encode(Image.new("RGB", (300, 200), "red"), "PNG"), ImageLimits(),
                            DecodeOptions(beam_size=1), codec.FULL)


def test_a_caption_whose_deadline_passed_before_its_image_is_decoded_does_no_more_work(monkeypatch: Any) -> None:
    """The call waits in the worker pool's queue behind another image past its deadline: it is answered
    DEADLINE_EXCEEDED, and neither the decode, nor the resize, nor the engine runs for it."""
    stages = Stages(monkeypatch)
    models = StagedModels(StagedCaptioner(stages))
    request = pb.CaptionRequest(image=staged_job().image)
    context = CallContext(seconds=0.05)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(time.sleep, 0.3)  # the pool's one thread, on another call's image
        servicer = service.AttentionServicer(models, pool, Settings(), Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                                             lambda: False)
        with pytest.raises(Aborted, match="deadline passed before the image was decoded"):
            asyncio.run(servicer.Caption(request, context))  # type: ignore[arg-type]
        busy.result()
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stages.ran == []


def test_a_deadline_that_passes_while_the_image_is_decoded_stops_it_before_the_resize(monkeypatch: Any) -> None:
    """A decode already running cannot be interrupted (Pillow's decoders hold no check); the stages after it do not
    run, and the image's pixels never go to the engine."""
    timeout = 0.5  # ample for the pool's idle thread to start the decode, which then runs past the deadline
    stages = Stages(monkeypatch, decode_until=time.monotonic() + timeout + 0.1)
    with ThreadPoolExecutor(1) as pool:
        servicer = service.AttentionServicer(StagedModels(StagedCaptioner(stages)), pool, Settings(), None,  # type: ignore[arg-type]
                                             lambda: False)
        with pytest.raises(DeadlineExceeded, match="before the image was resized"):
            asyncio.run(servicer.run_caption(StagedCaptioner(stages), staged_job(), timeout))
    assert stages.ran == ["decode"]


def test_a_call_cancelled_while_its_image_is_decoded_stops_it_before_the_resize(monkeypatch: Any) -> None:
    """The client goes away (gRPC cancels the handler): the worker's thread is not cancelled with it, but it goes no
    further than the stage it was in."""
    decoding, release = threading.Event(), threading.Event()
    stages = Stages(monkeypatch, decoding=decoding, release=release)

    async def cancelled_mid_decode(servicer: service.AttentionServicer) -> None:
        call = asyncio.ensure_future(servicer.run_caption(StagedCaptioner(stages), staged_job(), None))
        assert await asyncio.to_thread(decoding.wait, 30), "the decode never started"
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()

    with ThreadPoolExecutor(1) as pool:
        servicer = service.AttentionServicer(StagedModels(StagedCaptioner(stages)), pool, Settings(), None,  # type: ignore[arg-type]
                                             lambda: False)
        asyncio.run(cancelled_mid_decode(servicer))
    # the pool's shutdown waited for the thread
    assert stages.ran == ["decode"]
