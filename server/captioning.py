"""A captioning model on ONNX Runtime: prepare the image, encode it once, search over the decoder step, and give
every caption token its attention over the grid and the pixels of its peak.

The search is the server's own (:mod:`server.search`, the same greedy and beam search as translation); the graphs
are wired by the manifest's :class:`DecoderBinding` (static inputs, recurrent state) and its ``image`` section says
how a decoded picture becomes the encoder's input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from server import search
from server.artifacts import Manifest, ManifestError, Token, Tokenizer
from server.artifacts.attention_maps import Box, peak_box
from server.device import Device
from server.imaging import DecodedImage, prepare
from server.logs import event
from server.runtime import DecoderRuntime
from server.translation import EOS_PIECE, DecodeOptions

log = logging.getLogger("attn.model")


@dataclass
class CaptionHypothesis:
    text: str
    tokens: list[Token]  # ending with EOS
    score: float
    log_prob: float
    attention: np.ndarray  # (len(tokens), grid cells) float32, rows sum to 1
    peak_boxes: list[Box]  # per token: the pixels of its attention peak in the input image
    truncated: bool


@dataclass
class CaptionResult:
    width: int  # of the input image (EXIF orientation applied)
    height: int
    grid: tuple[int, int]  # rows, columns
    hypotheses: list[CaptionHypothesis]


class CaptionModel(DecoderRuntime):
    family = "captioning"

    def __init__(self, directory: Path, manifest: Manifest, device: Device | None, variant: str = "",
                 threads: int = 0, tokenizer: Tokenizer | None = None):
        if manifest.family != "captioning":
            raise ManifestError(f"{directory}: family {manifest.family!r} is not captioning")
        files = {"encoder": manifest.encoder.file, "decoder_step": manifest.decoder_step.file}
        files.update(manifest.variants.get(variant, {}))
        super().__init__(directory, manifest, device, files, threads, tokenizer)
        self.variant = variant if variant in manifest.variants else "fp32"  # captioners ship fp32 graphs only
        self.image_spec = manifest.image
        self.grid = (int(manifest.image["grid"][0]), int(manifest.image["grid"][1]))

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "family": m.family, "architecture": m.architecture,
            "source_language": "", "target_language": m.languages.get("target", ""),
            "attention_type": str(m.attention.get("type", "")), "attention_uniform": bool(m.attention.get("uniform")),
            "max_source_tokens": int(m.limits["max_source_tokens"]), "max_target_tokens": self.max_target_tokens,
            "variant": self.variant, "device": self.device_name,
        }

    def budget(self, max_output_tokens: int) -> int:
        """Decoder steps per caption, EOS included."""
        return min(self.max_target_tokens, max_output_tokens + 1) if max_output_tokens else self.max_target_tokens

    def pixels(self, image: DecodedImage) -> np.ndarray:
        """What the engine decodes: the encoder's input for one image, (3, H, W) float32 (the resize and
        standardisation are the front-end's work)."""
        return prepare(image.image, self.image_spec)

    def budget_for(self, item: np.ndarray, options: DecodeOptions) -> int:
        return self.budget(options.max_output_tokens)

    def cost(self, item: np.ndarray) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, items: Sequence[np.ndarray]) -> tuple[search.State, search.State]:
        """(initial decoder state, static decoder inputs), one row per image's :meth:`pixels`."""
        batch = np.stack(items)  # (n, 3, H, W)
        binding = self.manifest.decoder
        wanted = [*binding.static_inputs, *self._state_inputs]
        outputs = dict(zip(wanted, self.encoder.run(wanted, {self.image_spec["input"]: batch}), strict=True))
        return {n: outputs[n] for n in self._state_inputs}, {n: outputs[n] for n in binding.static_inputs}

    def caption(self, images: list[DecodedImage], options: DecodeOptions,
                check: search.Check | None = None) -> list[CaptionResult]:
        """One batch, start to end (the engine is the serving path; this is for warm-up, tests and tools)."""
        found = self.decode([self.pixels(d) for d in images], options, check)
        return self.finish([(d.width, d.height) for d in images], found)

    def finish(self, sizes: Sequence[tuple[int, int]], found: list[list[search.Hypothesis]]) -> list[CaptionResult]:
        """The results of images of these (width, height): their sizes are all the results need of them, so that
        the serving path keeps no decoded picture (up to 120 MB each) while its caption is decoded."""
        return [CaptionResult(width, height, self.grid, [self._hypothesis(width, height, h) for h in hyps])
                for (width, height), hyps in zip(sizes, found)]

    def _hypothesis(self, width: int, height: int, hyp: search.Hypothesis) -> CaptionHypothesis:
        text, tokens = self.tokenizer.decode(hyp.tokens)
        tokens = [*tokens, Token(self.eos_id, EOS_PIECE, len(text), len(text))]
        if len(tokens) != len(hyp.tokens):
            raise RuntimeError(f"detokenized {len(tokens)} tokens for {len(hyp.tokens)} ids: {hyp.tokens}")
        attention = hyp.attention.astype(np.float32)
        boxes = [peak_box(row, self.grid, width, height) for row in attention]
        return CaptionHypothesis(text, tokens, hyp.score, hyp.log_prob, attention, boxes, hyp.truncated)

    def warm_up(self) -> float:
        """Runs both graphs (greedy and beam) once, so the first request pays no lazy initialisation."""
        started = time.monotonic()
        blank = self._blank()
        self.caption([blank], DecodeOptions(beam_size=1))
        self.caption([blank, blank], DecodeOptions(beam_size=2, nbest=2, max_output_tokens=4))
        seconds = time.monotonic() - started
        event(log, "model_warm", model=self.name, version=self.version, seconds=round(seconds, 3))
        return seconds

    def warm_up_item(self) -> np.ndarray:
        return self.pixels(self._blank())

    def _blank(self) -> DecodedImage:
        height, width = (int(v) for v in self.image_spec["size"])
        return DecodedImage(Image.new("RGB", (width, height), (128, 128, 128)), "PNG")
