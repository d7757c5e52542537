"""Request validation happens in the codec, before any model code runs."""

from __future__ import annotations

import math

import pytest

from attention_pb.v1 import attention_pb2 as pb
from server.codec import check_texts, decode_options
from server.errors import InvalidInput
from server.settings import Settings

SETTINGS = Settings(max_texts=4, max_text_chars=20, default_beam_size=3, max_beam_size=8)


def test_defaults_fill_unset_options() -> None:
    options, detail = decode_options(pb.DecodingOptions(), SETTINGS, max_target_tokens=100)
    assert (options.beam_size, options.nbest, options.max_output_tokens, options.length_penalty) == (3, 1, 0, 1.0)
    assert detail == pb.ATTENTION_DETAIL_FULL and options.word_alignments


def test_explicit_options() -> None:
    options, detail = decode_options(
        pb.DecodingOptions(beam_size=1, max_output_tokens=10, length_penalty=0.0, attention=pb.ATTENTION_DETAIL_NONE),
        SETTINGS, max_target_tokens=100,
    )
    assert (options.beam_size, options.length_penalty, options.word_alignments) == (1, 0.0, False)
    assert detail == pb.ATTENTION_DETAIL_NONE


@pytest.mark.parametrize(("options", "message"), [
    (pb.DecodingOptions(beam_size=9), "beam_size 9 is larger than the limit of 8"),
    (pb.DecodingOptions(beam_size=2, nbest=3), r"nbest 3 is larger than beam_size 2: .* ask for beam_size 3 or more"),
    # A client that sent no beam_size learns where the 3 came from, and what to send.
    (pb.DecodingOptions(nbest=5), r"nbest 5 is larger than beam_size 3 \(the server's default: the request left "
     r"beam_size at 0\): a beam of 3 yields at most 3; ask for beam_size 5 or more"),
    (pb.DecodingOptions(max_output_tokens=100), "max_output_tokens 100 exceeds the model's limit of 99"),
    (pb.DecodingOptions(length_penalty=math.nan), "length_penalty nan must be a finite number"),
    (pb.DecodingOptions(length_penalty=-1.0), "length_penalty -1.0 must be"),
    (pb.DecodingOptions(attention=17), "attention detail 17 is not a known"),  # type: ignore[arg-type]
])
def test_bad_options(options: pb.DecodingOptions, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_options(options, SETTINGS, max_target_tokens=100)


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts is empty"),
    (["a"] * 5, "5 texts in one request; the limit is 4"),
    (["ok", "x" * 21], r"texts\[1\] has 21 characters; the limit is 20"),
])
def test_bad_texts(texts: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_texts(texts, SETTINGS)
