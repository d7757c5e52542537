"""Every failure reaches the client as the right status code with a message that says what was wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from attention_pb.v1 import attention_pb2 as pb
from kserve_v2_pb import grpc_service_pb2 as v2
from kserve_v2_pb import grpc_service_pb2_grpc as v2_grpc
from server.translation import TranslationModel
from tests.integration.serving import RunningServer, settings

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _error(call: object, request: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30, **kwargs)  # type: ignore[operator]
    return error.value


@pytest.mark.parametrize(("request_", "code", "message"), [
    (pb.TranslateRequest(texts=[""]), INVALID, "texts[0] is empty or only whitespace"),
    (pb.TranslateRequest(texts=["Hallo", " \t "]), INVALID, "texts[1] is empty or only whitespace"),
    (pb.TranslateRequest(texts=[]), INVALID, "texts is empty"),
    (pb.TranslateRequest(texts=["\u200b"]), INVALID, "texts[0] has no character the model reads"),
    (pb.TranslateRequest(texts=["Hallo", "\x01\ufeff\x02"]), INVALID, "texts[1] has no character the model reads"),
    (pb.TranslateRequest(texts=["Hallo"] * 33), INVALID, "33 texts in one request; the limit is 32"),
    (pb.TranslateRequest(texts=["x" * 2001]), INVALID, "texts[0] has 2001 characters; the limit is 2000"),
    (pb.TranslateRequest(texts=["Hallo Welt " * 30]), INVALID, "tokens; model tiny-de-en accepts at most 127"),
    (pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(beam_size=17)), INVALID,
     "beam_size 17 is larger than the limit of 16"),
    (pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(beam_size=2, nbest=3)), INVALID,
     "nbest 3 is larger than beam_size 2"),
    (pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(max_output_tokens=1000)), INVALID,
     "max_output_tokens 1000 exceeds the model's limit of 265"),
    (pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(length_penalty=float("inf"))), INVALID,
     "length_penalty inf must be a finite number"),
    (pb.TranslateRequest(model="nope", texts=["Hallo"]), grpc.StatusCode.NOT_FOUND,
     "model 'nope' is not loaded; loaded models: tiny-de-en"),
    (pb.TranslateRequest(model="tiny-de-en", version="7", texts=["Hallo"]), grpc.StatusCode.NOT_FOUND,
     "model 'tiny-de-en' has no version '7'; loaded versions: 1"),
])
def test_error_codes_and_messages(running: RunningServer, request_: pb.TranslateRequest, code: grpc.StatusCode,
                                  message: str) -> None:
    error = _error(running.stub.Translate, request_)
    assert error.code() == code
    assert message in error.details()


def test_unexpected_error_is_internal_with_request_id_only(running: RunningServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert running.server.registry is not None
    model = running.server.registry.get()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("/secret/path/encoder.onnx exploded")

    monkeypatch.setattr(model, "encode", broken)  # fails inside the engine's thread
    error = _error(running.stub.Translate, pb.TranslateRequest(texts=["Hallo"]),
                   metadata=[("x-request-id", "req-42")])
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "req-42" in error.details() and "secret" not in error.details()


def _block_encoder(model: object, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The model's encoder waits for ``release`` (its engine is stuck inside it); ``entered`` says it got there."""
    entered, release = threading.Event(), threading.Event()
    original = model.encode  # type: ignore[attr-defined]

    def blocking(*args: object, **kwargs: object) -> object:
        entered.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode", blocking)
    return entered, release


@pytest.fixture()
def one_slot_server(models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir, max_inflight=1, workers=1))
    yield server
    server.close()


def test_overload_is_resource_exhausted(one_slot_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert one_slot_server.server.registry is not None
    model = one_slot_server.server.registry.get()
    assert isinstance(model, TranslationModel)
    entered, release = _block_encoder(model, monkeypatch)
    first = one_slot_server.stub.Translate.future(pb.TranslateRequest(texts=["Hallo"]), timeout=60)
    assert entered.wait(30)
    error = _error(one_slot_server.stub.Translate, pb.TranslateRequest(texts=["Hallo"]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight" in error.details()
    release.set()
    assert first.result(timeout=60).translations
    # Counted apart from a full queue: the alert's description tells the two apart.
    sample = one_slot_server.server.metrics.registry.get_sample_value
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "inflight_full"}) == 1.0
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "queue_full"}) is None


@pytest.fixture()
def short_queue_server(models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir, max_queue_requests=1))
    yield server
    server.close()


def test_full_queue_is_resource_exhausted_naming_the_limit(short_queue_server: RunningServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One request decoding (its encoder blocked), one waiting: the queue is full and the next is refused at once;
    the refusal is counted, and the two admitted requests still complete."""
    running = short_queue_server
    assert running.server.registry is not None
    model = running.server.registry.get()
    entered, release = _block_encoder(model, monkeypatch)
    first = running.stub.Translate.future(pb.TranslateRequest(texts=["Hallo"]), timeout=60)
    assert entered.wait(30)
    second = running.stub.Translate.future(pb.TranslateRequest(texts=["Guten Tag"]), timeout=60)
    engine = running.server.registry.engine(model)
    for _ in range(100):  # the second call reaches the queue
        if engine.queued:
            break
        time.sleep(0.05)
    error = _error(running.stub.Translate, pb.TranslateRequest(texts=["Danke"]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_requests" in error.details()
    release.set()
    assert first.result(timeout=60).translations and second.result(timeout=60).translations
    refused = running.server.metrics.registry.get_sample_value(
        "attn_refused_requests_total", {"rpc": "Translate", "reason": "queue_full"})
    assert refused == 1.0


@pytest.fixture()
def small_answers_server(models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir, max_send_bytes=6000))
    yield server
    server.close()


def test_an_answer_over_the_largest_message_is_refused_saying_how_to_shrink_it(
        small_answers_server: RunningServer) -> None:
    """gRPC would refuse it after the handler, with the call logged and counted as answered: the servicer refuses it
    itself, counted as too large, and says which limit and what to ask for instead."""
    running = small_answers_server
    texts = ["Hallo Welt, guten Tag"] * 12
    full = pb.DecodingOptions(attention=pb.ATTENTION_DETAIL_FULL, beam_size=4, nbest=4)
    error = _error(running.stub.Translate, pb.TranslateRequest(texts=texts, options=full))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this server sends in one message (6,000, max_send_bytes)" in error.details()
    assert "less attention" in error.details()
    sample = running.server.metrics.registry.get_sample_value
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "too_large"}) == 1.0
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "queue_full"}) is None
    # The same texts without attention fit.
    none = pb.DecodingOptions(attention=pb.ATTENTION_DETAIL_NONE)
    assert len(running.stub.Translate(pb.TranslateRequest(texts=texts, options=none), timeout=30).translations) == 12

    # A V2 stream answers that message with the error and goes on with the next.
    def infer(count: int, request_id: str) -> v2.ModelInferRequest:
        request = v2.ModelInferRequest(model_name="tiny-de-en", id=request_id)
        tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[count, 1])
        tensor.contents.bytes_contents.extend([b"Hallo Welt, guten Tag"] * count)
        request.outputs.add(name="ATTENTION")
        return request

    stream = v2_grpc.GRPCInferenceServiceStub(running.channel).ModelStreamInfer
    answers = list(stream(iter([infer(32, "big"), infer(1, "small")]), timeout=30))
    assert [a.infer_response.id for a in answers] == ["big", "small"]
    assert answers[0].error_message.startswith("RESOURCE_EXHAUSTED: the answer is ")
    assert not answers[1].error_message and answers[1].infer_response.outputs


def test_deadline_stops_the_search(one_slot_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose deadline passes stops computing at the next decoder step and frees its worker."""
    assert one_slot_server.server.registry is not None
    model = one_slot_server.server.registry.get()
    assert isinstance(model, TranslationModel)
    original = model.step_reduced
    release = threading.Event()
    calls = []

    def endless_step(tokens: Any, state: Any, static: Any, all_heads: bool, width: int, banned: Any) -> Any:
        calls.append(1)
        assert release.wait(30)
        # EOS banned: left alone, the search would run to its full budget
        return original(tokens, state, static, all_heads, width, [*banned, model.eos_id])

    monkeypatch.setattr(model, "step_reduced", endless_step)
    with pytest.raises(grpc.RpcError) as error:
        one_slot_server.stub.Translate(pb.TranslateRequest(texts=["Hallo Welt"]), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server records it as a deadline too (gRPC cancels the handler when the deadline passes), not as a call
    # the client cancelled, which the error-ratio alert leaves out.
    sample = one_slot_server.server.metrics.registry.get_sample_value
    for _ in range(200):
        if sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "deadline"}):
            break
        time.sleep(0.05)
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "deadline"}) == 1.0
    assert not sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "cancelled"})
    monkeypatch.setattr(model, "step_reduced", original)
    release.set()
    # The expired call left the batch before its next step: the engine made no more steps for it.
    assert one_slot_server.stub.Translate(pb.TranslateRequest(texts=["Hallo"]), timeout=30).translations
    assert len(calls) == 1


def test_a_huge_model_name_is_not_echoed_whole(running: RunningServer) -> None:
    """A 20,000-character name would make a 20 kB status message, past a default client's 16 kB metadata limit
    (the client would see RESOURCE_EXHAUSTED): the message repeats only the start of it."""
    name = "m" * 20_000
    error = _error(running.stub.Translate, pb.TranslateRequest(model=name, texts=["Hallo"]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "20000 in all" in error.details() and len(error.details()) < 500
    error = _error(running.stub.Translate, pb.TranslateRequest(model="tiny-de-en", version="9" * 20_000,
                                                               texts=["Hallo"]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 500


@pytest.mark.parametrize("raw", [
    b"\x1a\x02\xff\xfe",  # texts[0] is not UTF-8
    b"\x1a\x05ab",  # a field longer than the message: truncated
], ids=["invalid-utf8", "truncated"])
def test_malformed_request_bytes_are_invalid_argument_logged_and_counted(running: RunningServer,
                                                                         raw: bytes) -> None:
    sample = running.server.metrics.registry.get_sample_value
    before = sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "invalid"}) or 0.0
    translate = running.channel.unary_unary("/attention.v1.AttentionService/Translate")  # bytes as they are
    error = _error(translate, raw)
    assert error.code() == INVALID
    assert "not a valid attention.v1.TranslateRequest" in error.details()
    for _ in range(100):
        if sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "invalid"}) == before + 1:
            break
        time.sleep(0.05)
    assert sample("attn_refused_requests_total", {"rpc": "Translate", "reason": "invalid"}) == before + 1
