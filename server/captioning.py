"""A captioning model on ONNX Runtime: prepare the image, encode it once, search over the decoder step, and give
every caption token its attention over the grid and the pixels of its peak.

The search is the server's own (:mod:`server.search`, the same greedy and beam search as translation); the graphs
are wired by the manifest's :class:`DecoderBinding` (static inputs, recurrent state) and its ``image`` section says
how a decoded picture becomes the encoder's input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from server import search
from server.artifacts import Manifest, ManifestError, Token, Tokenizer
from server.artifacts.attention_maps import Box, peak_box
from server.device import Device, session
from server.imaging import DecodedImage, prepare
from server.logs import event
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


class CaptionModel:
    family = "captioning"

    def __init__(self, directory: Path, manifest: Manifest, device: Device, variant: str = "", threads: int = 0):
        if manifest.family != "captioning":
            raise ManifestError(f"{directory}: family {manifest.family!r} is not captioning")
        self.directory, self.manifest, self.device = directory, manifest, device
        self.variant = variant if variant in manifest.variants else "fp32"  # captioners ship fp32 graphs only
        files = {"encoder": manifest.encoder.file, "decoder_step": manifest.decoder_step.file}
        files.update(manifest.variants.get(variant, {}))
        self.tokenizer = Tokenizer.load(directory / manifest.tokenizer["file"])
        self.encoder: ort.InferenceSession = session(directory / files["encoder"], device, threads)
        self.decoder: ort.InferenceSession = session(directory / files["decoder_step"], device, threads)
        self.image_spec = manifest.image
        self.grid = (int(manifest.image["grid"][0]), int(manifest.image["grid"][1]))
        binding = manifest.decoder
        self._state_inputs = list(binding.state)
        self._outputs = [binding.log_probs_output, binding.attention_output, *binding.state.values()]
        dtypes = {t.name: t.dtype for t in manifest.decoder_step.inputs}
        self._token_dtype = np.dtype(dtypes[binding.token_input])
        ids = manifest.special_ids
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.banned = sorted({self.pad_id, self.bos_id} - {self.eos_id})
        self.max_target_tokens = int(manifest.limits["max_target_tokens"])

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "family": m.family, "architecture": m.architecture,
            "source_language": "", "target_language": m.languages.get("target", ""),
            "attention_type": str(m.attention.get("type", "")), "attention_uniform": bool(m.attention.get("uniform")),
            "max_source_tokens": int(m.limits["max_source_tokens"]), "max_target_tokens": self.max_target_tokens,
            "variant": self.variant, "device": self.device.name,
        }

    def budget(self, max_output_tokens: int) -> int:
        """Decoder steps per caption, EOS included."""
        return min(self.max_target_tokens, max_output_tokens + 1) if max_output_tokens else self.max_target_tokens

    # -- graphs --------------------------------------------------------------------------------------------------

    def encode(self, images: list[DecodedImage]) -> tuple[search.State, search.State]:
        """(initial decoder state, static decoder inputs), one row per image."""
        batch = np.stack([prepare(d.image, self.image_spec) for d in images])  # (n, 3, H, W)
        binding = self.manifest.decoder
        wanted = [*binding.static_inputs, *self._state_inputs]
        outputs = dict(zip(wanted, self.encoder.run(wanted, {self.image_spec["input"]: batch}), strict=True))
        return {n: outputs[n] for n in self._state_inputs}, {n: outputs[n] for n in binding.static_inputs}

    def step(self, tokens: np.ndarray, state: search.State, static: search.State) -> tuple[
            np.ndarray, np.ndarray, search.State]:
        feeds = {self.manifest.decoder.token_input: tokens.astype(self._token_dtype), **static, **state}
        log_probs, attention, *new_state = self.decoder.run(self._outputs, feeds)
        return log_probs, attention, dict(zip(self._state_inputs, new_state, strict=True))

    # -- captioning ----------------------------------------------------------------------------------------------

    def caption(self, images: list[DecodedImage], options: DecodeOptions,
                check: search.Check | None = None) -> list[CaptionResult]:
        state, static = self.encode(images)
        budgets = [self.budget(options.max_output_tokens)] * len(images)
        if options.beam_size == 1:
            found = [[h] for h in search.greedy_search(
                self.step, state, static, bos=self.bos_id, eos=self.eos_id, max_steps=budgets,
                alpha=options.length_penalty, banned=self.banned, check=check,
            )]
        else:
            found = search.beam_search(
                self.step, state, static, bos=self.bos_id, eos=self.eos_id, max_steps=budgets,
                beam_size=options.beam_size, nbest=options.nbest, alpha=options.length_penalty,
                banned=self.banned, check=check,
            )
        return [CaptionResult(d.width, d.height, self.grid, [self._hypothesis(d, h) for h in hyps])
                for d, hyps in zip(images, found)]

    def _hypothesis(self, image: DecodedImage, hyp: search.Hypothesis) -> CaptionHypothesis:
        text, tokens = self.tokenizer.decode(hyp.tokens)
        tokens = [*tokens, Token(self.eos_id, EOS_PIECE, len(text), len(text))]
        if len(tokens) != len(hyp.tokens):
            raise RuntimeError(f"detokenized {len(tokens)} tokens for {len(hyp.tokens)} ids: {hyp.tokens}")
        attention = hyp.attention.astype(np.float32)
        boxes = [peak_box(row, self.grid, image.width, image.height) for row in attention]
        return CaptionHypothesis(text, tokens, hyp.score, hyp.log_prob, attention, boxes, hyp.truncated)

    def warm_up(self) -> float:
        """Runs both graphs (greedy and beam) once, so the first request pays no lazy initialisation."""
        started = time.monotonic()
        height, width = (int(v) for v in self.image_spec["size"])
        blank = DecodedImage(Image.new("RGB", (width, height), (128, 128, 128)), "PNG", 1)
        self.caption([blank], DecodeOptions(beam_size=1))
        self.caption([blank, blank], DecodeOptions(beam_size=2, nbest=2, max_output_tokens=4))
        seconds = time.monotonic() - started
        event(log, "model_warm", model=self.name, version=self.version, seconds=round(seconds, 3))
        return seconds
