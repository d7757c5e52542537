"""The Caption serving path around the engine, without sockets: what it keeps of a request's image while the
caption is decoded."""

from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from server import codec, service
from server.imaging import DecodedImage, ImageLimits
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
