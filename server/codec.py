"""Proto messages ⇄ domain objects. Requests are validated here, completely, before any model code sees them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attention_pb.v1 import attention_pb2 as pb
from server import protobuf_fields
from server.artifacts import Token
from server.artifacts.alignment import token_words
from server.captioning import CaptionModel, CaptionResult
from server.errors import FieldError, InvalidInput
from server.imaging import ImageError, ImageLimits
from server.settings import Settings
from server.translation import DecodeOptions, Result, Source, Target, TranslationModel

FULL, WORDS, NONE = pb.ATTENTION_DETAIL_FULL, pb.ATTENTION_DETAIL_WORDS, pb.ATTENTION_DETAIL_NONE
DEFAULT_LENGTH_PENALTY = 1.0
MAX_LENGTH_PENALTY = 10.0


@dataclass
class TranslateJob:
    sources: list[Source]
    options: DecodeOptions
    detail: int


def check_texts(texts: Sequence[str], settings: Settings) -> None:
    """The model-independent limits on ``texts``."""
    if not texts:
        raise InvalidInput("texts is empty: send at least one text")
    if len(texts) > settings.max_texts:
        raise InvalidInput(f"{len(texts)} texts in one request; the limit is {settings.max_texts}")
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise FieldError("texts", i, f"has {len(text)} characters; the limit is {settings.max_text_chars}")


def decode_options(options: pb.DecodingOptions, settings: Settings, max_target_tokens: int) -> tuple[
        DecodeOptions, int]:
    beam = options.beam_size or settings.default_beam_size
    if beam > settings.max_beam_size:
        raise InvalidInput(f"beam_size {beam} is larger than the limit of {settings.max_beam_size}")
    nbest = options.nbest or 1
    if nbest > beam:
        chosen = "" if options.beam_size else " (the server's default: the request left beam_size at 0)"
        raise InvalidInput(f"nbest {nbest} is larger than beam_size {beam}{chosen}: a beam of {beam} yields at most "
                           f"{beam}; ask for beam_size {nbest} or more, or fewer hypotheses")
    if options.max_output_tokens >= max_target_tokens:
        raise InvalidInput(
            f"max_output_tokens {options.max_output_tokens} exceeds the model's limit of {max_target_tokens - 1}"
        )
    alpha = options.length_penalty if options.HasField("length_penalty") else DEFAULT_LENGTH_PENALTY
    if not (math.isfinite(alpha) and 0.0 <= alpha <= MAX_LENGTH_PENALTY):
        raise InvalidInput(f"length_penalty {alpha} must be a finite number between 0 and {MAX_LENGTH_PENALTY:g}")
    if options.attention not in pb.AttentionDetail.values():
        raise InvalidInput(f"attention detail {options.attention} is not a known AttentionDetail value")
    detail = options.attention or FULL
    layer = options.attention_layer if options.HasField("attention_layer") else None
    head = options.attention_head if options.HasField("attention_head") else None
    decode = DecodeOptions(beam, nbest, options.max_output_tokens, float(alpha), detail != NONE, layer, head)
    return decode, detail


def translate_job(request: pb.TranslateRequest, model: TranslationModel, settings: Settings) -> TranslateJob:
    check_texts(request.texts, settings)
    options, detail = decode_options(request.options, settings, model.max_target_tokens)
    model.check_attention_selection(options)
    return TranslateJob(model.prepare(list(request.texts)), options, detail)


# -- responses ---------------------------------------------------------------------------------------------------


def _tokens(field: Any, tokens: Sequence[Token], token_words: Sequence[int], eos_id: int) -> None:
    # Filled in place with add(): building each message first and handing the list over copies every one again,
    # and a response carries one Token per source and target token (about a third of its building time).
    add = field.add
    for t, w in zip(tokens, token_words, strict=True):
        add(id=t.id, piece=t.piece, start=t.start, end=t.end, special=t.id == eos_id, word=w)


def _words(field: Any, text: str, spans: Sequence[tuple[int, int]]) -> None:
    add = field.add
    for s, e in spans:
        add(text=text[s:e], start=s, end=e)


_MATRIX_VALUES = pb.Matrix.DESCRIPTOR.fields_by_name["values"].number


def _matrix(field: pb.Matrix, values: np.ndarray) -> None:
    field.rows, field.cols = values.shape
    # The values as the packed field's bytes, which protobuf parses in C: extending the repeated field makes a Python
    # float of every value first (a 13 × 33 matrix: 10 µs against 1.5 µs).
    field.MergeFromString(protobuf_fields.field(_MATRIX_VALUES, values.astype("<f4").tobytes()))


def _hypothesis(hyp: pb.Hypothesis, target: Target, detail: int, eos_id: int) -> None:
    hyp.text, hyp.score, hyp.log_prob, hyp.truncated = target.text, target.score, target.log_prob, target.truncated
    _tokens(hyp.tokens, target.tokens, target.token_words, eos_id)
    _words(hyp.words, target.text, target.words)
    if detail == FULL:
        _matrix(hyp.attention, target.attention)
    if detail in (FULL, WORDS) and target.word_attention is not None:
        _matrix(hyp.word_attention, target.word_attention)
        add = hyp.alignments.add
        for a in target.alignments:
            add(source_word=a.source_word, target_word=a.target_word, weight=a.weight)


def translate_response(model: TranslationModel, job: TranslateJob, results: list[Result]) -> pb.TranslateResponse:
    info = model.info()
    response = pb.TranslateResponse(model=model.name, version=model.version,
                                    attention_uniform=info["attention_uniform"])
    for result in results:
        source = result.source
        translation = response.translations.add()
        _tokens(translation.source_tokens, source.tokens, source.token_words, model.eos_id)
        _words(translation.source_words, source.text, source.words)
        for target in result.hypotheses:
            _hypothesis(translation.hypotheses.add(), target, job.detail, model.eos_id)
    return response


def model_info(info: dict[str, object], ready: bool, is_default: bool) -> pb.ModelInfo:
    return pb.ModelInfo(ready=ready, is_default=is_default, **info)  # type: ignore[arg-type]


# -- Caption -----------------------------------------------------------------------------------------------------


@dataclass
class CaptionJob:
    image: bytes  # decoded in the worker (server.imaging), not on the event loop
    limits: ImageLimits
    options: DecodeOptions
    detail: int


def caption_job(request: pb.CaptionRequest, model: CaptionModel, settings: Settings) -> CaptionJob:
    """Validates the options and the encoded size; the header and pixel checks come with decoding."""
    limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    if len(request.image) > limits.max_bytes:
        raise ImageError(f"is {len(request.image)} bytes; the limit is {limits.max_bytes} bytes "
                         "(max_image_bytes)")
    options, detail = decode_options(request.options, settings, model.max_target_tokens)
    if options.attention_layer is not None or options.attention_head is not None:
        raise InvalidInput("attention_layer and attention_head apply to multi-head translation models only")
    return CaptionJob(request.image, limits, options, detail)


def caption_response(model: CaptionModel, job: CaptionJob, result: CaptionResult) -> pb.CaptionResponse:
    response = pb.CaptionResponse(
        model=model.name, version=model.version, image_size=pb.ImageSize(width=result.width, height=result.height),
        grid=pb.Grid(height=result.grid[0], width=result.grid[1]),
    )
    for hyp in result.hypotheses:
        caption = response.hypotheses.add(text=hyp.text, score=hyp.score, log_prob=hyp.log_prob,
                                          truncated=hyp.truncated)
        _tokens(caption.tokens, hyp.tokens, token_words(hyp.text, hyp.tokens[:-1]) + [-1], model.eos_id)
        if job.detail in (FULL, WORDS):
            _matrix(caption.attention, hyp.attention)
            caption.peak_boxes.extend(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1) for x0, y0, x1, y1 in hyp.peak_boxes)
    return response


def attention_bytes(response: pb.TranslateResponse | pb.CaptionResponse) -> int:
    """Serialized bytes of the attention a response carries (matrices, alignments, peak boxes)."""
    total = 0
    if isinstance(response, pb.TranslateResponse):
        for translation in response.translations:
            for hyp in translation.hypotheses:
                total += hyp.attention.ByteSize() + hyp.word_attention.ByteSize()
                total += sum(a.ByteSize() for a in hyp.alignments)
    else:
        for caption in response.hypotheses:
            total += caption.attention.ByteSize() + sum(b.ByteSize() for b in caption.peak_boxes)
    return total
