"""A translation model on ONNX Runtime: tokenize, encode, search over the decoder step, label the attention.

Everything graph-specific comes from the manifest's :class:`DecoderBinding` (which encoder outputs are static
decoder inputs, which are recurrent state and which output replaces them), so a model family that only renames
tensors or adds state entries needs no code here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server import search
from server.artifacts import GraphSpec, Manifest, ManifestError, Token, Tokenizer
from server.artifacts.alignment import WordAlignment, strongest, token_words, word_matrix, words
from server.device import Device
from server.errors import FieldError, InvalidInput
from server.logs import event
from server.runtime import DecoderRuntime

log = logging.getLogger("attn.model")

EOS_PIECE = "</s>"
WARM_UP_TEXT = "Hallo Welt, wie geht es dir?"


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1
    nbest: int = 1
    max_output_tokens: int = 0  # 0: the model's budget for each input
    length_penalty: float = 1.0
    word_alignments: bool = True  # compute word matrices and alignments
    attention_layer: int | None = None  # multi-head models: whose cross-attention; None = the manifest's choice
    attention_head: int | None = None  # that layer's head, -1 for the mean over heads; None = the manifest's choice


@dataclass
class Source:
    text: str
    tokens: list[Token]  # ending with the EOS token (empty span at the end of the text)
    words: list[tuple[int, int]]
    token_words: list[int]  # per token (EOS included, as -1)

    @property
    def ids(self) -> np.ndarray:
        """What the engine decodes: the token ids, EOS included (the text and spans stay with the front-end)."""
        return np.fromiter((t.id for t in self.tokens), dtype=np.int64, count=len(self.tokens))


@dataclass
class Target:
    text: str
    tokens: list[Token]  # ending with EOS
    words: list[tuple[int, int]]
    token_words: list[int]
    score: float
    log_prob: float
    attention: np.ndarray  # (len(tokens), len(source.tokens)), float32
    truncated: bool
    word_attention: np.ndarray | None = None  # (len(words), len(source.words))
    alignments: list[WordAlignment] = field(default_factory=list)


@dataclass
class Result:
    source: Source
    hypotheses: list[Target]


def _encoder_inputs(spec: GraphSpec) -> tuple[str, str | None]:
    """The (batch, src_len) ids input and the optional (batch,) lengths input of the encoder graph."""
    ids = [t.name for t in spec.inputs if len(t.shape) == 2 and t.dtype == "int64"]
    lengths = [t.name for t in spec.inputs if len(t.shape) == 1 and t.dtype == "int64"]
    if len(ids) != 1 or len(lengths) > 1 or len(spec.inputs) != len(ids) + len(lengths):
        raise ManifestError(f"{spec.file}: expected inputs (batch, src_len) ids and optionally (batch,) lengths")
    return ids[0], (lengths[0] if lengths else None)


class TranslationModel(DecoderRuntime):
    family = "translation"

    def __init__(self, directory: Path, manifest: Manifest, device: Device | None, variant: str = "",
                 threads: int = 0, tokenizer: Tokenizer | None = None):
        files = {"encoder": manifest.encoder.file, "decoder_step": manifest.decoder_step.file}
        if variant:
            if variant not in manifest.variants:
                raise ManifestError(f"{directory}: no variant {variant!r} (has {sorted(manifest.variants)})")
            files.update(manifest.variants[variant])
        super().__init__(directory, manifest, device, files, threads, tokenizer)
        self.variant = variant or "fp32"
        self._ids_input, self._lengths_input = _encoder_inputs(manifest.encoder)
        self._mask_dtype = np.dtype({t.name: t.dtype for t in manifest.decoder_step.inputs}[
            manifest.decoder.mask_input])
        self.max_source_tokens = int(manifest.limits["max_source_tokens"])
        # Multi-head models export every layer's and head's cross-attention beside the default alignment, so a
        # request may pick another layer or head; fetching it costs a copy, so only requests that ask pay for it.
        attention = manifest.attention
        self._all_heads: str | None = attention.get("all_heads_output")
        self.attention_layers = int(attention.get("layers", 0)) if self._all_heads else 0
        self.attention_heads = int(attention.get("heads", 0)) if self._all_heads else 0
        self.attention_layer = int(attention.get("layer", 0)) if self._all_heads else 0
        head = attention.get("head", "mean")
        self.attention_head = (-1 if head == "mean" else int(head)) if self._all_heads else 0

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "family": m.family, "architecture": m.architecture,
            "source_language": m.languages.get("source", ""), "target_language": m.languages.get("target", ""),
            "attention_type": str(m.attention.get("type", "")), "attention_uniform": bool(m.attention.get("uniform")),
            "max_source_tokens": self.max_source_tokens, "max_target_tokens": self.max_target_tokens,
            "variant": self.variant, "device": self.device_name,
            "attention_layers": self.attention_layers, "attention_heads": self.attention_heads,
            "attention_layer": self.attention_layer, "attention_head": self.attention_head,
        }

    def check_attention_selection(self, options: DecodeOptions) -> None:
        """A requested layer/head must exist; raises :class:`InvalidInput`."""
        layer, head = options.attention_layer, options.attention_head
        if layer is None and head is None:
            return
        if not self._all_heads:
            raise InvalidInput(
                f"model {self.name} has a single attention ({self.manifest.attention.get('type')}): "
                "attention_layer and attention_head apply to multi-head models only"
            )
        if layer is not None and not 0 <= layer < self.attention_layers:
            raise InvalidInput(
                f"attention_layer {layer} is not a layer of {self.name} (0..{self.attention_layers - 1})"
            )
        if head is not None and not -1 <= head < self.attention_heads:
            raise InvalidInput(
                f"attention_head {head} is not -1 (mean) or a head of {self.name} (0..{self.attention_heads - 1})"
            )

    # -- input -------------------------------------------------------------------------------------------------

    def prepare(self, texts: list[str]) -> list[Source]:
        """Tokenizes and checks every text against the model's limits; raises :class:`~server.errors.FieldError`."""
        sources = []
        for i, text in enumerate(texts):
            if not text.strip():
                raise FieldError("texts", i, "is empty or only whitespace")
            tokens = self.tokenizer.encode(text)
            if not tokens:  # the normaliser removed every character: the model would translate an empty source
                raise FieldError("texts", i, "has no character the model reads: its normalisation removes "
                                 "zero-width, control and format characters, and the text has nothing else")
            if len(tokens) + 1 > self.max_source_tokens:
                raise FieldError(
                    "texts", i, f"has {len(tokens)} tokens; model {self.name} accepts at most "
                    f"{self.max_source_tokens - 1} (plus end of sentence)"
                )
            tokens.append(Token(self.eos_id, EOS_PIECE, len(text), len(text)))
            spans = words(text)
            sources.append(Source(text, tokens, spans, token_words(text, tokens[:-1], spans) + [-1]))
        return sources

    def budget(self, source_tokens: int, max_output_tokens: int) -> int:
        """Decoder steps for one source of ``source_tokens`` (EOS included), EOS included: the request's
        ``max_output_tokens`` and EOS, or else 2 * source tokens + 10; capped by the manifest either way."""
        if max_output_tokens:  # the request's own limit replaces the default, as for captions
            return min(max_output_tokens + 1, self.max_target_tokens)
        return min(2 * source_tokens + 10, self.max_target_tokens)

    # -- graphs (the engine's side: an item is a source's token ids, EOS included) -------------------------------

    def encode(self, items: Sequence[np.ndarray]) -> tuple[search.State, search.State]:
        """(initial decoder state, static decoder inputs) for a batch of sources, one row each."""
        lengths = np.array([len(item) for item in items], dtype=np.int64)
        ids = np.full((len(items), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : len(item)] = item
        feeds = {self._ids_input: ids}
        if self._lengths_input:
            feeds[self._lengths_input] = lengths
        binding = self.manifest.decoder
        wanted = [*binding.static_inputs, *self._state_inputs]
        outputs = dict(zip(wanted, self.encoder.run(wanted, feeds), strict=True))
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(self._mask_dtype)
        static = {name: outputs[name] for name in binding.static_inputs}
        static[binding.mask_input] = mask
        return {name: outputs[name] for name in self._state_inputs}, static

    def src_len(self, item: np.ndarray) -> int:
        return len(item)

    def budget_for(self, item: np.ndarray, options: DecodeOptions) -> int:
        return self.budget(len(item), options.max_output_tokens)

    def step_rows(self, tokens: np.ndarray, state: search.State, static: search.State, all_heads: bool) -> tuple[
            np.ndarray, np.ndarray, search.State, np.ndarray | None]:
        if not (all_heads and self._all_heads):
            return (*self.step(tokens, state, static), None)
        log_probs, attention, new_state, [every] = self.run_step(tokens, state, static, [self._all_heads])
        return log_probs, attention, new_state, every

    def selection(self, options: DecodeOptions) -> tuple[int, int] | None:
        layer = self.attention_layer if options.attention_layer is None else options.attention_layer
        head = self.attention_head if options.attention_head is None else options.attention_head
        if not self._all_heads or (layer, head) == (self.attention_layer, self.attention_head):
            return None
        return layer, head

    # -- translation ---------------------------------------------------------------------------------------------

    def translate(self, sources: list[Source], options: DecodeOptions, check: search.Check | None = None) -> list[
            Result]:
        """One batch, start to end (the engine is the serving path; this is for warm-up, tests and tools)."""
        return self.finish(sources, self.decode([s.ids for s in sources], options, check), options)

    def finish(self, sources: list[Source], found: list[list[search.Hypothesis]], options: DecodeOptions) -> list[
            Result]:
        """Detokenized hypotheses with word-level attention and alignments (off the engine's thread)."""
        return [Result(s, [self._target(s, h, options) for h in hyps]) for s, hyps in zip(sources, found)]

    def force(self, sources: list[Source], targets: list[list[int]]) -> list[tuple[float, np.ndarray]]:
        """Log-probability and attention of given target ids (EOS included): the reference for beam search."""
        state, static = self.encode([s.ids for s in sources])
        out = search.forced_decode(self.step, state, static, bos=self.bos_id, targets=targets)
        return [(lp, rows[:, : len(s.tokens)]) for s, (lp, rows) in zip(sources, out)]

    def _target(self, source: Source, hyp: search.Hypothesis, options: DecodeOptions) -> Target:
        text, tokens = self.tokenizer.decode(hyp.tokens)
        tokens = [*tokens, Token(self.eos_id, EOS_PIECE, len(text), len(text))]
        spans = words(text)
        target = Target(
            text, tokens, spans, token_words(text, tokens[:-1], spans) + [-1], hyp.score, hyp.log_prob,
            hyp.attention[:, : len(source.tokens)], hyp.truncated,
        )
        if len(target.tokens) != len(hyp.tokens):
            raise RuntimeError(f"detokenized {len(target.tokens)} tokens for {len(hyp.tokens)} ids: {hyp.tokens}")
        if options.word_alignments:
            matrix = word_matrix(target.attention, source.token_words[:-1], target.token_words[:-1])
            shaped = matrix.astype(np.float32)
            if shaped.shape != (len(target.words), len(source.words)):  # a word that no token starts in
                shaped = np.zeros((len(target.words), len(source.words)), dtype=np.float32)
                rows, cols = min(matrix.shape[0], shaped.shape[0]), min(matrix.shape[1], shaped.shape[1])
                shaped[:rows, :cols] = matrix[:rows, :cols]
            target.word_attention = shaped
            target.alignments = strongest(matrix)
        return target

    def warm_up(self) -> float:
        """Runs every graph once (greedy and beam) so the first request pays no lazy initialisation."""
        started = time.monotonic()
        sources = self.prepare([WARM_UP_TEXT])
        self.translate(sources, DecodeOptions(beam_size=1))
        self.translate(sources * 2, DecodeOptions(beam_size=2, nbest=2, max_output_tokens=8))
        seconds = time.monotonic() - started
        event(log, "model_warm", model=self.name, version=self.version, seconds=round(seconds, 3))
        return seconds

    def warm_up_item(self) -> np.ndarray:
        return self.prepare([WARM_UP_TEXT])[0].ids
