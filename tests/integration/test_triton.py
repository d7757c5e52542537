"""The Triton / KServe V2 protocol, driven by the stock ``tritonclient`` against ``attn-serve`` in a subprocess.

tritonclient ships its own generated copy of the ``inference`` protos, so the test talks to a server in another
process rather than importing the server's V2 code next to it (the server keeps its copy out of protobuf's default
pool, so even that would work; the subprocess keeps the test honest about what a client on another machine sees).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from server.service import INLINE_HYPOTHESES

tc = pytest.importorskip("tritonclient.grpc", reason="the stock V2 client (dev extra: tritonclient)")
from tritonclient.grpc import service_pb2 as v2  # noqa: E402  (tritonclient's own copy of the protocol)
from tritonclient.grpc import service_pb2_grpc as v2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRANSLATOR, CAPTIONER = "tiny-de-en", "tiny-scenes"
TEXTS = ["Guten Morgen.", "Das Haus ist groß und schön.", "Wo ist der Bahnhof?"]


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(models_dir: Path, caption_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("triton-models")
    shutil.copytree(models_dir / TRANSLATOR, root / TRANSLATOR)
    shutil.copytree(caption_models_dir / CAPTIONER, root / CAPTIONER)
    env = {**os.environ, "ATTN_MODELS_DIR": str(root), "ATTN_PORT": "0", "ATTN_METRICS_PORT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--device", "cpu", "--workers", "1",
         "--ort-threads", "1", "--grace-seconds", "5", "--default-model", TRANSLATOR],
        env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert process.stderr is not None
    listening: dict[str, Any] = {}
    for line in process.stderr:  # the JSON log lines, until the models are loaded
        record = json.loads(line)
        listening = record if record["event"] == "listening" else listening
        if record["event"] == "ready":
            break
    else:
        raise AssertionError(f"the server exited (code {process.wait()}) before it was ready")
    server = Served(process, int(listening["port"]), int(listening["metrics_port"]))

    def drain() -> None:  # keeps the pipe from filling up, and keeps the lines for the tests to read
        assert process.stderr is not None
        for line in process.stderr:
            try:
                server.log.append(json.loads(line))
            except ValueError:  # the server logs JSON only: test_every_log_line_is_json fails on this
                server.log.append({"unparsed": line})

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    yield server
    process.terminate()
    assert process.wait(60) == 0
    reader.join(10)


@pytest.fixture()
def client(served: Served) -> Iterator[Any]:
    with tc.InferenceServerClient(served.url) as triton:
        yield triton


def text_input(texts: list[str], shape: list[int] | None = None) -> Any:
    shape = shape or [len(texts), 1]
    tensor = tc.InferInput("TEXT", shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape))
    return tensor


def outputs(*names: str) -> list[Any]:
    return [tc.InferRequestedOutput(name) for name in names]


def translate(served: Served, texts: list[str], **options: int) -> pb.TranslateResponse:
    with grpc.insecure_channel(served.url) as channel:
        response: pb.TranslateResponse = pb_grpc.AttentionServiceStub(channel).Translate(
            pb.TranslateRequest(model=TRANSLATOR, texts=texts, options=pb.DecodingOptions(**options)), timeout=60)
    return response


def scene_png(index: int = 0) -> bytes:
    from tests.unit.test_caption_imaging import encode
    from training.data.scenes import render, scenes

    return encode(render(scenes("test", index + 1)[index]), "PNG")


def status(error: InferenceServerException) -> str:
    return str(error.status())


# -- health and metadata -------------------------------------------------------------------------------------------


def test_live_ready_and_model_ready(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(TRANSLATOR) and client.is_model_ready(TRANSLATOR, "1")
    assert client.is_model_ready(CAPTIONER)
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(TRANSLATOR, "9")
    assert client.get_server_metadata().name == "attention-serving"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {(TRANSLATOR, "1", "READY"),
                                                                       (CAPTIONER, "1", "READY")}


def test_model_metadata_describes_the_tensors(client: Any) -> None:
    meta = client.get_model_metadata(TRANSLATOR)
    assert meta.name == TRANSLATOR and list(meta.versions) == ["1"] and meta.platform == "attention_translation"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("TEXT", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("TRANSLATION", "BYTES", [-1, 1]), ("TOKENS", "BYTES", [-1, -1]), ("TARGET_LENGTHS", "INT32", [-1]),
        ("SOURCE_TOKENS", "BYTES", [-1, -1]), ("SOURCE_LENGTHS", "INT32", [-1]), ("ATTENTION", "FP32", [-1, -1, -1]),
    ]
    caption = client.get_model_metadata(CAPTIONER, "1")
    assert [(t.name, t.datatype) for t in caption.inputs] == [("IMAGE", "BYTES")]
    shapes = {t.name: list(t.shape) for t in caption.outputs}
    assert shapes["GRID"] == [-1, 2] and shapes["ATTENTION"][:2] == [-1, -1] and shapes["ATTENTION"][2] > 1
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert status(missing.value) == "StatusCode.NOT_FOUND"


def test_model_config(client: Any) -> None:
    config = client.get_model_config(TRANSLATOR, as_json=True)["config"]
    assert config["name"] == TRANSLATOR and config["max_batch_size"] == 32  # ATTN_MAX_TEXTS
    assert config["input"] == [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["1"]}]
    by_name = {o["name"]: o for o in config["output"]}
    assert by_name["ATTENTION"]["data_type"] == "TYPE_FP32" and by_name["ATTENTION"]["dims"] == ["-1", "-1"]
    assert by_name["TARGET_LENGTHS"]["dims"] == ["1"] and "reshape" in by_name["TARGET_LENGTHS"]
    assert config["parameters"]["family"]["string_value"] == "translation"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}  # ATTN_VERSION_POLICY's default


def test_reflection_describes_the_v2_service(served: Served) -> None:
    with grpc.insecure_channel(served.url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert service.FindMethodByName("ModelInfer").input_type.full_name == "inference.ModelInferRequest"
        for name in ("attention.v1.AttentionService", "grpc.health.v1.Health"):  # the others are still described
            assert name in database.get_services() and pool.FindServiceByName(name).methods


# -- inference ---------------------------------------------------------------------------------------------------


def test_translation_without_attention_matches_translate(served: Served, client: Any) -> None:
    result = client.infer(TRANSLATOR, [text_input(TEXTS)], parameters={"beam_size": 2})
    names = [o["name"] for o in result.get_response(as_json=True)["outputs"]]
    assert names == ["TRANSLATION", "TOKENS", "TARGET_LENGTHS", "SOURCE_TOKENS", "SOURCE_LENGTHS"]  # no ATTENTION
    assert result.as_numpy("ATTENTION") is None
    reference = translate(served, TEXTS, beam_size=2)
    best = [t.hypotheses[0] for t in reference.translations]
    translations = result.as_numpy("TRANSLATION")
    assert translations.shape == (len(TEXTS), 1)
    assert [t.decode() for t in translations[:, 0]] == [h.text for h in best]
    tokens, lengths = result.as_numpy("TOKENS"), result.as_numpy("TARGET_LENGTHS")
    assert lengths.dtype == np.int32 and list(lengths) == [len(h.tokens) for h in best]
    assert tokens.shape == (len(TEXTS), max(lengths))
    for row, n, hyp in zip(tokens, lengths, best):
        assert [p.decode() for p in row[:n]] == [t.piece for t in hyp.tokens] and not any(row[n:])
    source_lengths = result.as_numpy("SOURCE_LENGTHS")
    assert list(source_lengths) == [len(t.source_tokens) for t in reference.translations]
    source = result.as_numpy("SOURCE_TOKENS")
    assert [p.decode() for p in source[0, : source_lengths[0]]] == [t.piece for t in
                                                                    reference.translations[0].source_tokens]


def test_translation_with_attention(served: Served, client: Any) -> None:
    result = client.infer(TRANSLATOR, [text_input(TEXTS)],
                          outputs=outputs("ATTENTION", "TARGET_LENGTHS", "SOURCE_LENGTHS", "TRANSLATION"))
    assert [o["name"] for o in result.get_response(as_json=True)["outputs"]] == [
        "ATTENTION", "TARGET_LENGTHS", "SOURCE_LENGTHS", "TRANSLATION"]
    attention = result.as_numpy("ATTENTION")
    targets, sources = result.as_numpy("TARGET_LENGTHS"), result.as_numpy("SOURCE_LENGTHS")
    assert attention.dtype == np.float32 and attention.shape == (len(TEXTS), max(targets), max(sources))
    reference = translate(served, TEXTS)  # the server's default beam, like the V2 call
    for b, translation in enumerate(reference.translations):
        rows, cols = int(targets[b]), int(sources[b])
        np.testing.assert_allclose(attention[b, :rows, :cols].sum(axis=1), 1.0, atol=1e-4)
        assert not attention[b, rows:].any() and not attention[b, :, cols:].any()  # zero padding
        hyp = translation.hypotheses[0]
        expected = np.asarray(hyp.attention.values, dtype=np.float32).reshape(hyp.attention.rows, hyp.attention.cols)
        np.testing.assert_allclose(attention[b, :rows, :cols], expected, atol=1e-6)
        assert result.as_numpy("TRANSLATION")[b, 0].decode() == hyp.text


def test_flat_batch_and_typed_contents(served: Served, client: Any) -> None:
    """[batch] instead of [batch, 1], and the typed ``contents`` instead of raw bytes (here through the raw stub)."""
    flat = client.infer(TRANSLATOR, [text_input(TEXTS[:2], [2])], outputs=outputs("TRANSLATION"))
    assert flat.as_numpy("TRANSLATION").shape == (2,)
    request = v2.ModelInferRequest(model_name=TRANSLATOR, id="typed-1")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [t.encode() for t in TEXTS[:2]])
    request.outputs.add(name="TRANSLATION")
    with grpc.insecure_channel(served.url) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert response.id == "typed-1" and response.model_version == "1"
    assert tc.InferResult(response).as_numpy("TRANSLATION").tolist() == flat.as_numpy("TRANSLATION").tolist()


def test_a_request_as_mlserver_codecs_encode_it(served: Served, client: Any) -> None:
    """MLServer's PandasCodec (Seldon's clients use it) marks the request as a table (``content_type: pd``) and a
    column of strings as ``str``; a requested output may carry one too. Before, the request's was an unknown
    parameter."""
    request = v2.ModelInferRequest(model_name=TRANSLATOR, id="mlserver-1")
    request.parameters["content_type"].string_param = "pd"
    text = request.inputs.add(name="TEXT", datatype="BYTES", shape=[2, 1])
    text.parameters["content_type"].string_param = "str"
    text.contents.bytes_contents.extend([t.encode() for t in TEXTS[:2]])
    request.outputs.add(name="TRANSLATION").parameters["content_type"].string_param = "str"
    with grpc.insecure_channel(served.url) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    expected = client.infer(TRANSLATOR, [text_input(TEXTS[:2])], outputs=outputs("TRANSLATION"))
    assert tc.InferResult(response).as_numpy("TRANSLATION").tolist() == expected.as_numpy("TRANSLATION").tolist()


def test_a_batch_beyond_the_inline_bounds_translates_as_small_ones(served: Served, client: Any) -> None:
    """More texts than a call answered on the event loop may hold (INLINE_HYPOTHESES): this batch goes through the
    worker pool, the small one stays on the loop; both give the same tensors."""
    copies = INLINE_HYPOTHESES // len(TEXTS) + 1
    texts = TEXTS * copies
    wanted = outputs("TRANSLATION", "TARGET_LENGTHS", "ATTENTION")
    large = client.infer(TRANSLATOR, [text_input(texts)], outputs=wanted)
    small = client.infer(TRANSLATOR, [text_input(TEXTS)], outputs=wanted)
    assert large.as_numpy("TRANSLATION")[:, 0].tolist() == small.as_numpy("TRANSLATION")[:, 0].tolist() * copies
    lengths = small.as_numpy("TARGET_LENGTHS")
    assert large.as_numpy("TARGET_LENGTHS").tolist() == lengths.tolist() * copies
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(large.as_numpy("ATTENTION")[b + len(texts) - len(TEXTS), :n],
                                   small.as_numpy("ATTENTION")[b, :n], atol=1e-5)


def test_caption_of_an_encoded_png(served: Served, client: Any) -> None:
    image = scene_png()
    tensor = tc.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    result = client.infer(CAPTIONER, [tensor], parameters={"beam_size": 1},
                          outputs=outputs("CAPTION", "TOKENS", "TARGET_LENGTHS", "GRID", "ATTENTION"))
    grid, lengths, attention = result.as_numpy("GRID"), result.as_numpy("TARGET_LENGTHS"), result.as_numpy("ATTENTION")
    rows, cols = (int(v) for v in grid[0])
    assert attention.shape == (1, int(lengths[0]), rows * cols)
    np.testing.assert_allclose(attention[0].sum(axis=1), 1.0, atol=1e-4)
    with grpc.insecure_channel(served.url) as channel:
        reference = pb_grpc.AttentionServiceStub(channel).Caption(
            pb.CaptionRequest(model=CAPTIONER, image=image, options=pb.DecodingOptions(beam_size=1)), timeout=60)
    assert (reference.grid.height, reference.grid.width) == (rows, cols)
    assert result.as_numpy("CAPTION")[0, 0].decode() == reference.hypotheses[0].text
    assert [p.decode() for p in result.as_numpy("TOKENS")[0]] == [t.piece for t in reference.hypotheses[0].tokens]


# -- errors ------------------------------------------------------------------------------------------------------


def test_a_sequence_is_taken_and_ignored_as_triton_does_for_a_model_without_sequence_batching(client: Any) -> None:
    """Each request stands alone here; before, tritonclient's sequence_id (with sequence_start and sequence_end) was
    refused as an unknown parameter."""
    result = client.infer(TRANSLATOR, [text_input(TEXTS[:1])], outputs=outputs("TRANSLATION"), sequence_id=7,
                          sequence_start=True, sequence_end=True)
    plain = client.infer(TRANSLATOR, [text_input(TEXTS[:1])], outputs=outputs("TRANSLATION"))
    assert result.as_numpy("TRANSLATION").tolist() == plain.as_numpy("TRANSLATION").tolist()


def test_too_short_client_timeout_is_deadline_exceeded(client: Any) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer(TRANSLATOR, [text_input(TEXTS * 10)], parameters={"beam_size": 16}, client_timeout=0.001)
    assert status(error.value) == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer(TRANSLATOR, [text_input(TEXTS[:1])]).as_numpy("TRANSLATION").shape == (1, 1)  # still serving


def test_triton_timeout_parameter_is_the_servers_deadline(client: Any) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer(TRANSLATOR, [text_input(TEXTS)], timeout=1)  # one microsecond, enforced by the server
    assert status(error.value) == "StatusCode.DEADLINE_EXCEEDED"


@pytest.mark.parametrize(("model", "make_inputs", "parameters", "code", "words"), [
    ("no-such-model", lambda: [text_input(TEXTS)], None, "NOT_FOUND", "not loaded"),
    (TRANSLATOR, lambda: [text_input(TEXTS, [1, 3])], None, "INVALID_ARGUMENT", "shape"),
    (TRANSLATOR, lambda: [tc.InferInput("IMAGE", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=object))],
     None, "INVALID_ARGUMENT", "takes one input TEXT"),
    (TRANSLATOR, lambda: [text_input(TEXTS)], {"nbest": 2}, "INVALID_ARGUMENT", "unknown parameter"),
    (TRANSLATOR, lambda: [text_input(TEXTS)], {"beam_size": 99}, "INVALID_ARGUMENT", "beam_size"),
    (TRANSLATOR, lambda: [text_input(TEXTS)], {"content_type": "base64"}, "INVALID_ARGUMENT",
     "the request has content_type 'base64', which this server cannot honour"),
    # An item of a batch is named as this protocol names it, not as attention.v1 does (texts[1], image).
    (TRANSLATOR, lambda: [text_input(["Guten Morgen.", " "])], None, "INVALID_ARGUMENT", "TEXT[1] is empty"),
    (TRANSLATOR, lambda: [text_input(["x" * 2001])], None, "INVALID_ARGUMENT", "TEXT[0] has 2001 characters"),
    (TRANSLATOR, lambda: [text_input(["Guten Morgen.", "\u200b"])], None, "INVALID_ARGUMENT",
     "TEXT[1] has no character the model reads"),
    (CAPTIONER, lambda: [tc.InferInput("IMAGE", [2], "BYTES").set_data_from_numpy(
        np.array([scene_png(), b"not an image"], dtype=object))], None, "INVALID_ARGUMENT", "IMAGE[1] is not a PNG"),
    (CAPTIONER, lambda: [tc.InferInput("IMAGE", [2], "BYTES").set_data_from_numpy(
        np.array([scene_png(), b""], dtype=object))], None, "INVALID_ARGUMENT", "IMAGE[1] is empty"),
])
def test_errors_carry_their_status(client: Any, model: str, make_inputs: Any, parameters: dict[str, Any] | None,
                                   code: str, words: str) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, make_inputs(), parameters=parameters)
    assert status(error.value) == f"StatusCode.{code}"
    assert words in error.value.message()


def test_unknown_output_and_unimplemented_rpcs(client: Any) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer(TRANSLATOR, [text_input(TEXTS)], outputs=outputs("LOGITS"))
    assert status(error.value) == "StatusCode.INVALID_ARGUMENT" and "LOGITS" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer(TRANSLATOR, [text_input(TEXTS)], outputs=[tc.InferRequestedOutput("TRANSLATION", class_count=2)])
    assert status(error.value) == "StatusCode.INVALID_ARGUMENT" and "classification" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.get_inference_statistics(TRANSLATOR)
    assert status(error.value) == "StatusCode.UNIMPLEMENTED"


# -- streaming ---------------------------------------------------------------------------------------------------


def test_stream_infer_answers_each_message_and_survives_errors(client: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=120)
    try:
        client.async_stream_infer(TRANSLATOR, [text_input(TEXTS[:1])], request_id="first",
                                  outputs=outputs("TRANSLATION", "ATTENTION"))
        client.async_stream_infer("no-such-model", [text_input(TEXTS[:1])], request_id="second")
        client.async_stream_infer(TRANSLATOR, [text_input(TEXTS[1:])], request_id="third",
                                  parameters={"beam_size": 1})
        received = [answers.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, first_error), (_, second_error), (third, third_error) = received
    assert first_error is None and third_error is None
    assert first.get_response().id == "first" and third.get_response().id == "third"
    assert first.as_numpy("ATTENTION").shape[0] == 1 and first.as_numpy("TRANSLATION").shape == (1, 1)
    assert third.as_numpy("TRANSLATION").shape == (len(TEXTS) - 1, 1)
    assert second_error is not None and "NOT_FOUND" in second_error.message()


def test_every_stream_answer_is_marked_final(client: Any) -> None:
    """One answer per message, so each is its request's last: Triton marks it so (``triton_final_response``), and
    clients that also serve decoupled models read the mark to know a request is done. Asking for an empty final
    response adds none: the answer itself is final."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=120)
    try:
        client.async_stream_infer(TRANSLATOR, [text_input(TEXTS[:1])], request_id="plain")
        client.async_stream_infer(TRANSLATOR, [text_input(TEXTS[1:2])], request_id="asks-for-empty-final",
                                  enable_empty_final_response=True)
        received = [answers.get(timeout=60) for _ in range(2)]
        with pytest.raises(queue.Empty):  # and nothing after them
            answers.get(timeout=1)
    finally:
        client.stop_stream()
    assert [error for _, error in received] == [None, None]
    responses = [result.get_response() for result, _ in received]
    assert [r.id for r in responses] == ["plain", "asks-for-empty-final"]
    assert all(r.parameters["triton_final_response"].bool_param for r in responses)
    assert all(r.outputs for r in responses)


# -- observability -------------------------------------------------------------------------------------------------


def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_v2_calls_are_logged_and_counted(served: Served, client: Any) -> None:
    ok = ("attn_requests_total", (("code", "OK"), ("model", TRANSLATOR), ("rpc", "ModelInfer"), ("version", "1")))
    missing = ("attn_requests_total", (("code", "NOT_FOUND"), ("model", ""), ("rpc", "ModelInfer"), ("version", "")))
    before = scrape(served)
    client.infer(TRANSLATOR, [text_input(TEXTS[:1])], request_id="counted", headers={"x-request-id": "v2-counted"})
    with pytest.raises(InferenceServerException):
        client.infer("no-such-model", [text_input(TEXTS[:1])])
    # The status reaches the client before the server's handler has counted it: poll briefly.
    stop = time.monotonic() + 30
    while True:
        after = scrape(served)
        counted = after.get(ok) == before.get(ok, 0) + 1 and after.get(missing) == before.get(missing, 0) + 1
        if counted or time.monotonic() > stop:
            break
        time.sleep(0.05)
    assert after[ok] == before.get(ok, 0) + 1 and after[missing] == before.get(missing, 0) + 1
    assert after[("attn_inflight_requests", (("rpc", "ModelInfer"),))] == 0
    deadline = time.monotonic() + 30  # the reader thread may not have reached the line yet
    while True:
        lines = [r for r in list(served.log) if r.get("event") == "rpc" and r.get("request_id") == "v2-counted"]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(r["rpc"], r["model"], r["code"]) for r in lines] == [("ModelInfer", TRANSLATOR, "OK")]


def _logged(served: Served, found: Any, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30  # the reader thread may not have reached the line yet
    while True:
        lines = [r for r in list(served.log) if found(r)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_malformed_request_bytes_are_invalid_argument_and_logged(served: Served) -> None:
    with grpc.insecure_channel(served.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # the bytes as they are
        with pytest.raises(grpc.RpcError) as error:
            infer(b"\x0a\x05ab", timeout=30, metadata=[("x-request-id", "v2-malformed")])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in error.value.details()
    lines = _logged(served, lambda r: r.get("event") == "rpc" and r.get("request_id") == "v2-malformed", "rpc")
    assert [(r["rpc"], r["code"]) for r in lines] == [("ModelInfer", "INVALID_ARGUMENT")]


def test_every_log_line_is_json(served: Served, client: Any) -> None:
    """Also Pillow's warning about an image's broken EXIF block, which Python prints as a plain line by default."""
    import io
    import struct

    from PIL import Image

    # One EXIF entry that claims 400 bytes at an offset past the block's end.
    exif = (b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 400, 26)
            + struct.pack("<I", 0))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "JPEG", exif=exif)
    tensor = tc.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[buffer.getvalue()]], dtype=object))
    assert client.infer(CAPTIONER, [tensor], outputs=outputs("CAPTION")).as_numpy("CAPTION").shape == (1, 1)
    # Pillow's words differ between versions ("Tag data larger than file", "Truncated File Read"); its file does not.
    assert _logged(served, lambda r: "TiffImagePlugin" in json.dumps(r), "the EXIF warning")
    assert [r["unparsed"] for r in served.log if "unparsed" in r] == []
