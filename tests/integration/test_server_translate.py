"""Translate against a real server on port 0 with the tiny exported model."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from attention_pb.v1 import attention_pb2 as pb
from server import service
from server.errors import StartupError
from server.translation import DecodeOptions, TranslationModel
from tests.integration.serving import RunningServer, check_hypothesis, check_spans, matrix, settings

TEXTS = [
    "Ich hoffe, es geht dir gut.",
    "Guten Morgen!",
    "Das Haus ist groß und schön.",
    "  Straße  über\tÄrger 😀 ",
    "Wir sehen uns morgen.",
    "Zwei Kaffee, bitte.",
    "Wo ist der Bahnhof?",
    "Sch\u00f6n, dass du da bist.",
]


def translate(running: RunningServer, texts: list[str], **options: object) -> pb.TranslateResponse:
    request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(**options))  # type: ignore[arg-type]
    return running.stub.Translate(request, timeout=60)


def test_one_text(running: RunningServer) -> None:
    response = translate(running, TEXTS[:1])
    assert (response.model, response.version) == ("tiny-de-en", "1")
    [translation] = response.translations
    check_spans(TEXTS[0], translation.source_tokens)
    assert [w.text for w in translation.source_words] == TEXTS[0].split()
    [hyp] = translation.hypotheses
    check_hypothesis(translation, hyp)
    assert hyp.tokens[-1].special and math.isfinite(hyp.score) and hyp.log_prob <= 0


def test_eight_texts_in_order(running: RunningServer) -> None:
    response = translate(running, TEXTS, beam_size=1)
    assert len(response.translations) == 8
    for text, translation in zip(TEXTS, response.translations):
        check_spans(text, translation.source_tokens)
        assert "".join(text[t.start : t.end] for t in translation.source_tokens).split() == text.split()
        [hyp] = translation.hypotheses
        check_hypothesis(translation, hyp)


def test_each_text_translates_as_it_would_alone(running: RunningServer) -> None:
    batch = translate(running, TEXTS[:4], beam_size=2)
    for text, translation in zip(TEXTS[:4], batch.translations):
        [alone] = translate(running, [text], beam_size=2).translations
        assert [h.text for h in alone.hypotheses] == [h.text for h in translation.hypotheses]


def test_answers_on_the_loop_equal_those_from_the_worker_pool(running: RunningServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    texts = TEXTS[2:4]  # non-ASCII: the byte-to-character spans
    on_loop = translate(running, texts, beam_size=2, nbest=2)
    monkeypatch.setattr(service, "INLINE_CHARS", -1)  # every call through the pool
    assert translate(running, texts, beam_size=2, nbest=2) == on_loop


def test_beam_four_with_three_hypotheses(running: RunningServer) -> None:
    response = translate(running, TEXTS[:3], beam_size=4, nbest=3)
    for translation in response.translations:
        assert len(translation.hypotheses) == 3
        scores = [h.score for h in translation.hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert len({h.text for h in translation.hypotheses}) >= 2 or len({
            tuple(t.id for t in h.tokens) for h in translation.hypotheses}) == 3
        for hyp in translation.hypotheses:
            check_hypothesis(translation, hyp)


def test_beam_attention_matches_forced_decoding(running: RunningServer) -> None:
    """The best hypothesis's matrix (and every other's) equals a forced decoding of its tokens through the step
    graph: under beam search each hypothesis kept its own rows through the back-pointers."""
    response = translate(running, TEXTS, beam_size=4, nbest=4)
    assert running.server.registry is not None
    model = running.server.registry.get()
    assert isinstance(model, TranslationModel)
    sources = model.prepare(TEXTS)
    for source, translation in zip(sources, response.translations):
        targets = [[t.id for t in h.tokens] for h in translation.hypotheses]
        forced = model.force([source] * len(targets), targets)
        for hyp, (log_prob, rows) in zip(translation.hypotheses, forced):
            np.testing.assert_allclose(matrix(hyp.attention), rows, atol=2e-5)
            assert hyp.log_prob == pytest.approx(log_prob, abs=2e-3)


@pytest.mark.parametrize("detail", [pb.ATTENTION_DETAIL_UNSPECIFIED, pb.ATTENTION_DETAIL_FULL,
                                    pb.ATTENTION_DETAIL_WORDS, pb.ATTENTION_DETAIL_NONE])
def test_attention_detail_levels(running: RunningServer, detail: int) -> None:
    response = translate(running, TEXTS[:2], beam_size=2, nbest=2, attention=detail)
    for translation in response.translations:
        for hyp in translation.hypotheses:
            check_hypothesis(translation, hyp, detail)
            assert hyp.tokens and hyp.words is not None


def test_max_output_tokens_truncates(running: RunningServer) -> None:
    response = translate(running, TEXTS[:2], beam_size=2, nbest=2, max_output_tokens=1)
    for translation in response.translations:
        for hyp in translation.hypotheses:
            assert len(hyp.tokens) <= 2 and hyp.tokens[-1].special
            check_hypothesis(translation, hyp)


def test_max_output_tokens_is_the_limit_whatever_the_source_length(running: RunningServer) -> None:
    # 0 takes the budget for the input (2 * source tokens + 10); a request's own limit replaces it, up to the
    # model's max_target_tokens, as for captions: "Ja" may get 40 tokens when the request allows 40.
    assert running.server.registry is not None
    model = running.server.registry.get()
    assert isinstance(model, TranslationModel)
    [source] = model.prepare(["Ja"])
    default = 2 * len(source.tokens) + 10
    assert model.budget_for(source.ids, DecodeOptions()) == default
    for limit in (1, default, default + 30, model.max_target_tokens - 1):
        assert model.budget_for(source.ids, DecodeOptions(max_output_tokens=limit)) == limit + 1  # and its EOS


def test_list_models(running: RunningServer) -> None:
    [info] = running.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert (info.name, info.version, info.family, info.ready, info.is_default) == (
        "tiny-de-en", "1", "translation", True, True)
    assert (info.source_language, info.target_language, info.attention_type) == ("de", "en", "bahdanau")
    assert (info.device, info.variant, info.max_source_tokens) == ("cpu", "fp32", 128)


def test_request_id_is_echoed(running: RunningServer) -> None:
    _, call = running.stub.ListModels.with_call(pb.ListModelsRequest(), metadata=[("x-request-id", "abc-123")])
    assert ("x-request-id", "abc-123") in call.trailing_metadata()
    _, call = running.stub.ListModels.with_call(pb.ListModelsRequest())
    assert dict(call.trailing_metadata())["x-request-id"]


def test_caption_without_a_captioning_model(running: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        running.stub.Caption(pb.CaptionRequest(image=b"\x89PNG"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no captioning model is loaded" in error.value.details()


def test_int8_variant(models_dir: Path) -> None:
    running = RunningServer(settings(models_dir, variant="int8"))
    try:
        [info] = running.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert info.variant == "int8"
        response = running.stub.Translate(pb.TranslateRequest(texts=TEXTS[:2]), timeout=30)
        for translation in response.translations:
            check_hypothesis(translation, translation.hypotheses[0])
    finally:
        running.close()


def test_unknown_default_model_stops_the_start(models_dir: Path) -> None:
    running = RunningServer(settings(models_dir, default_model="nope"), load=False)
    try:
        with pytest.raises(StartupError, match="default model 'nope' is not among the loaded models"):
            running.load()
    finally:
        running.close()
