"""Health (Check and Watch) through the lifecycle, metrics over HTTP, reflection, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from kserve_v2_pb import grpc_service_pb2 as v2
from kserve_v2_pb import grpc_service_pb2_grpc as v2_grpc
from server.app import AttentionServer
from server.errors import StartupError
from tests.integration.serving import RunningServer, settings
from tests.unit.engine_fakes import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "attention.v1.AttentionService"
V2_SERVICE = "inference.GRPCInferenceService"  # served on the same port: a probe may name it


def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_stop(models_dir: Path) -> None:
    running = RunningServer(settings(models_dir), load=False)
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ("", SERVICE, V2_SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
        v2_watch = health.Watch(health_pb2.HealthCheckRequest(service=V2_SERVICE), timeout=60)
        assert next(watch).status == NOT_SERVING and next(v2_watch).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Translate(pb.TranslateRequest(texts=["Hallo"]), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
        running.load()
        assert next(watch).status == SERVING and next(v2_watch).status == SERVING
        for service in ("", SERVICE, V2_SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        stopping = running.submit(running.server.stop(30.0))
        assert next(watch).status == NOT_SERVING and next(v2_watch).status == NOT_SERVING
        assert next(watch, None) is None  # the stream ends: open watches do not hold the drain for the grace period
        assert next(v2_watch, None) is None
        stopping.result(10)
    finally:
        running.close()


def test_a_port_in_use_fails_the_start_naming_the_reason(tmp_path: Path) -> None:
    """One process (ATTN_FRONTENDS=0), as the parent of front-ends does: the system's reason, not gRPC's 'Failed to
    bind ... set GRPC_VERBOSITY=debug'."""
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    server = AttentionServer(settings(tmp_path, port=other.getsockname()[1], metrics_port=-1), CollectorRegistry())
    try:
        with pytest.raises(StartupError, match=r"cannot listen on 127\.0\.0\.1:\d+: .*Address already in use"):
            asyncio.run(server.start())
    finally:
        other.close()


def test_an_open_v2_stream_holds_the_drain_no_longer_than_its_message_in_progress(models_dir: Path) -> None:
    """A V2 client keeps its ModelStreamInfer stream open between messages (tritonclient's start_stream): the drain
    answers the message it holds, then ends the stream with UNAVAILABLE, instead of waiting for the client to close
    it until the grace runs out."""
    running = RunningServer(settings(models_dir))
    try:
        stub = v2_grpc.GRPCInferenceServiceStub(running.channel)
        outgoing: queue.Queue[v2.ModelInferRequest | None] = queue.Queue()
        text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1],
                                                     contents=v2.InferTensorContents(bytes_contents=[b"Hallo"]))
        outgoing.put(v2.ModelInferRequest(model_name="tiny-de-en", id="first", inputs=[text]))
        stream = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=120)
        first = next(stream)
        assert first.infer_response.id == "first" and not first.error_message
        stopping = running.submit(running.server.stop(60.0))
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
        stopping.result(30)  # well inside the grace: nothing else was in flight
        outgoing.put(None)
    finally:
        running.close()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_move_after_calls(running: RunningServer) -> None:
    ok = ("attn_requests_total", (("code", "OK"), ("model", "tiny-de-en"), ("rpc", "Translate"), ("version", "1")))
    bad = ("attn_requests_total", (("code", "INVALID_ARGUMENT"), ("model", "tiny-de-en"), ("rpc", "Translate"),
                                   ("version", "1")))
    latency = ("attn_request_duration_seconds_count", (("model", "tiny-de-en"), ("rpc", "Translate"),
                                                       ("version", "1")))
    tokens = [(name, (("model", "tiny-de-en"), ("version", "1")))
              for name in ("attn_source_tokens_total", "attn_target_tokens_total")]
    before = _scrape(running.metrics_url)
    response = running.stub.Translate(pb.TranslateRequest(texts=["Guten Morgen.", "Danke."]), timeout=30)
    with pytest.raises(grpc.RpcError):
        running.stub.Translate(pb.TranslateRequest(texts=[""]), timeout=30)
    after = _scrape(running.metrics_url)
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after[latency] == before.get(latency, 0) + 2
    source = sum(len(t.source_tokens) for t in response.translations)
    target = sum(len(h.tokens) for t in response.translations for h in t.hypotheses)
    assert after[tokens[0]] - before.get(tokens[0], 0) == source
    assert after[tokens[1]] - before.get(tokens[1], 0) == target
    assert after[("attn_models_loaded", ())] == 1
    assert after[("attn_inflight_requests", (("rpc", "Translate"),))] == 0


def test_reflection_lets_a_generic_client_call_translate(running: RunningServer) -> None:
    """No generated stubs: the service, its methods and messages all come from the server's reflection."""
    database = ProtoReflectionDescriptorDatabase(running.channel)
    assert SERVICE in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName(SERVICE).FindMethodByName("Translate")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict({"texts": ["Guten Morgen."], "options": {"beam_size": 2}}, request_class())
    call = running.channel.unary_unary(f"/{SERVICE}/Translate", request_serializer=request_class.SerializeToString,
                                       response_deserializer=response_class.FromString)
    response = json_format.MessageToDict(call(request, timeout=30), preserving_proto_field_name=True)
    assert response["model"] == "tiny-de-en"
    [translation] = response["translations"]
    assert translation["source_tokens"][-1]["piece"] == "</s>" and translation["hypotheses"][0]["attention"]["rows"]


def _attn_serve() -> list[str]:
    """The installed console script (``pip install -e .``), or the same entry point through ``python -m``."""
    script = Path(sys.executable).parent / "attn-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server"]


@pytest.fixture()
def served(slow_models_dir: Path) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "ATTN_MODELS_DIR": str(slow_models_dir), "ATTN_PORT": "0", "ATTN_METRICS_PORT": "-1"}
    process = subprocess.Popen(
        [*_attn_serve(), "--host", "127.0.0.1", "--device", "cpu", "--workers", "1", "--ort-threads", "1",
         "--grace-seconds", "60", "--log-level", "DEBUG", "--frontends", "0"],  # several: test_multiprocess.py
        env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(30)
    assert process.stderr is not None
    process.stderr.close()


def _wait_for_event(process: subprocess.Popen[str], name: str, count: int = 1) -> list[dict[str, object]]:
    """Reads the server's JSON log lines until ``count`` lines of event ``name`` (no sleeping, no polling)."""
    assert process.stderr is not None
    seen: list[dict[str, object]] = []
    for line in process.stderr:
        record = json.loads(line)
        if record["event"] == name:
            seen.append(record)
            if len(seen) == count:
                return seen
    raise AssertionError(f"the server exited (code {process.wait()}) before logging {count} {name!r}")


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(served: subprocess.Popen[str]) -> None:
    [listening] = _wait_for_event(served, "listening")
    channel = grpc.insecure_channel(f"127.0.0.1:{listening['port']}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
    assert next(status for status in (m.status for m in watch) if status == SERVING) == SERVING
    stub = pb_grpc.AttentionServiceStub(channel)
    texts = ["Ich hoffe, es geht dir gut.", "Das Haus ist groß und schön.", "Wo ist der Bahnhof?"]
    request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(beam_size=4, nbest=2))
    calls: list[Future[pb.TranslateResponse]] = [stub.Translate.future(request, timeout=120) for _ in range(6)]
    _wait_for_event(served, "rpc_received", count=6)  # all six are inside the server (one computing, five queued)
    served.send_signal(signal.SIGTERM)
    [shutting_down] = _wait_for_event(served, "shutting_down")
    assert shutting_down["inflight"] > 0  # type: ignore[operator]
    for call in calls:
        response = call.result(timeout=120)
        assert len(response.translations) == len(texts)
        assert all(h.truncated for t in response.translations for h in t.hypotheses)
    assert served.wait(timeout=120) == 0
    channel.close()


def test_a_connection_that_never_handshakes_holds_the_drain_no_longer_than_the_handshake_limit(
        models_dir: Path) -> None:
    """gRPC's stop waits for connections still in their handshake: an idle TCP connection (a port scanner, a stuck
    client) held a drain for gRPC's default of 20 s, whatever the grace."""
    import socket

    from server.app import HANDSHAKE_SECONDS

    server = RunningServer(settings(models_dir, grace_seconds=60.0))
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        started = time.monotonic()
        server.call(server.server.stop(60.0), timeout=90)
        assert time.monotonic() - started < HANDSHAKE_SECONDS + 5 < 20
    finally:
        idle.close()
        server.channel.close()


def test_clients_are_moved_to_new_connections_after_the_connection_age_and_no_call_fails(models_dir: Path) -> None:
    # A front-end (or replica) keeps a connection, and a client all its calls: GOAWAY after max_connection_age makes
    # clients connect anew, and so spread again; calls in flight meanwhile finish on the old connection.
    running = RunningServer(settings(models_dir, max_connection_age=0.5))
    states: list[grpc.ChannelConnectivity] = []
    try:
        running.channel.subscribe(states.append)
        request = pb.TranslateRequest(texts=["Hallo Welt", "Guten Morgen"])
        calls = [running.stub.Translate.future(request, timeout=30) for _ in range(4)]
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            calls.append(running.stub.Translate.future(request, timeout=30))
            time.sleep(0.02)
        answers = [call.result() for call in calls]
        assert all(len(answer.translations) == 2 for answer in answers)
        assert states.count(grpc.ChannelConnectivity.READY) >= 3  # connected, then anew at least twice
    finally:
        running.channel.unsubscribe(states.append)
        running.close()


def test_every_call_leaves_the_drains_count_of_unanswered_calls_however_it_ends(slow_models_dir: Path) -> None:
    # A drain waits for this count to reach 0 (server/drain.py): a call that never left it would hold every drain
    # for its whole grace.
    running = RunningServer(settings(slow_models_dir))
    unanswered = running.server.servicer.unanswered  # type: ignore[union-attr]
    long = pb.TranslateRequest(texts=["Hallo Welt " * 10] * 32, options=pb.DecodingOptions(beam_size=16))
    try:
        running.stub.Translate(pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(max_output_tokens=3)))
        codes = []
        for request, timeout in ((pb.TranslateRequest(texts=["Hallo"], model="nope"), 10.0), (long, 0.3)):
            with pytest.raises(grpc.RpcError) as failed:
                running.stub.Translate(request, timeout=timeout)
            codes.append(failed.value.code())
        assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED]
        cancelled = running.stub.Translate.future(long, timeout=60)
        wait_until(lambda: unanswered.count, "the call to reach the server", 10)
        assert unanswered.count == 1  # inside the server
        cancelled.cancel()
        wait_until(lambda: unanswered.count == 0, "the cancelled call to leave the count", 10)
    finally:
        running.close()
