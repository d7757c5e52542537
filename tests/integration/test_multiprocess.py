"""The server as several processes (front-ends sharing the port, one engine process or several): the same answers
as the server in one process, and everything it promises still holds — refusals, deadlines, cancellation, drain,
crashes of either kind of process, metrics summed over the processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from bench.slow_reader import SlowReader
from client.cli import main
from client.connection import OWN_CONNECTION
from server import device
from tests.integration.serving import RunningServer, ServerProcess, matrix, peer_certificate
from tests.integration.test_batching_equivalence import sources
from tests.pki import server_pair

TEXTS = ["Ich hoffe, es geht dir gut.", "Das Haus ist groß und schön.", "Wo ist der Bahnhof?"]
# The most one call may ask of the slow model (32 texts, beam 16, each to its full length budget): over a second of
# decoding on a 2-core machine, so the call is surely in the engine when the test acts.
LONG = pb.TranslateRequest(texts=["Hallo Welt " * 10] * 32, options=pb.DecodingOptions(beam_size=16))


@pytest.fixture(scope="module")
def served(models_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(models_dir)
    server.wait_for("ready")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def two_engines(models_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(models_dir, "--engines", "2")
    server.wait_for("ready")
    server.wait_for("engine_ready", count=4)  # both front-ends send to both engines
    yield server
    assert server.stop() == 0


@pytest.fixture()
def slow_server(slow_models_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Every search runs to its full length budget (EOS made impossible), so calls stay in flight; a test's
    ``flags`` marker adds settings."""
    marker = request.node.get_closest_marker("flags")
    server = ServerProcess(slow_models_dir, "--grace-seconds", "60", *(marker.args if marker else ()))
    server.wait_for("ready")
    yield server
    server.kill()


def _requests_total(server: ServerProcess, code: str = "OK") -> float:
    key = ("attn_requests_total", (("code", code), ("model", "tiny-de-en"), ("rpc", "Translate"), ("version", "1")))
    return server.metrics().get(key, 0.0)


@pytest.mark.parametrize("engines", [1, 2])
@pytest.mark.parametrize("beam", [1, 4])
def test_answers_equal_the_single_process_server(running: RunningServer, beam: int, engines: int,
                                                 request: pytest.FixtureRequest) -> None:
    """200 sentences sent concurrently to both: tokens equal, attention within 1e-5."""
    served: ServerProcess = request.getfixturevalue("served" if engines == 1 else "two_engines")
    texts = sources()
    options = pb.DecodingOptions(beam_size=beam, nbest=beam, attention=pb.ATTENTION_DETAIL_FULL)
    requests = [pb.TranslateRequest(texts=[t], options=options) for t in texts]
    multi = [f.result() for f in [served.stub.Translate.future(r, timeout=300) for r in requests]]
    single = [f.result() for f in [running.stub.Translate.future(r, timeout=300) for r in requests]]
    for text, a, b in zip(texts, multi, single):
        [ta], [tb] = a.translations, b.translations
        assert [t.id for t in ta.source_tokens] == [t.id for t in tb.source_tokens]
        assert len(ta.hypotheses) == len(tb.hypotheses) == beam
        for ha, hb in zip(ta.hypotheses, tb.hypotheses):
            assert [t.id for t in ha.tokens] == [t.id for t in hb.tokens], text
            assert ha.text == hb.text and ha.score == pytest.approx(hb.score, abs=1e-5)
            np.testing.assert_allclose(matrix(ha.attention), matrix(hb.attention), atol=1e-5, err_msg=text)
            assert [(x.source_word, x.target_word) for x in ha.alignments] == [
                (x.source_word, x.target_word) for x in hb.alignments]


def test_metrics_are_summed_over_the_front_ends(served: ServerProcess) -> None:
    """Calls land on both front-ends (one connection each); the one /metrics endpoint counts all of them."""
    before = _requests_total(served)
    channels = [grpc.insecure_channel(f"127.0.0.1:{served.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(8)]
    try:
        from attention_pb.v1 import attention_pb2_grpc as pb_grpc

        for channel in channels:
            pb_grpc.AttentionServiceStub(channel).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60)
    finally:
        for channel in channels:
            channel.close()
    deadline = time.monotonic() + 30
    while _requests_total(served) < before + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _requests_total(served) == before + 8
    metrics = served.metrics()
    assert metrics[("attn_inflight_requests", (("rpc", "Translate"),))] == 0
    assert metrics[("attn_process_cpu_seconds_total", ())] > 0
    assert metrics[("attn_process_restarts_total", (("role", "engine"),))] == 0


def _gauge(server: ServerProcess, name: str) -> float:
    return server.metrics().get((name, (("model", "tiny-de-en"), ("version", "1"))), 0.0)


def _until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _answers(calls: list[grpc.Future], answer: Callable[[pb.TranslateResponse], object]) -> list[object]:
    """Each call's answer through ``answer``, or its error as "CODE: details". Every call is waited for, rather than
    failing at the first error, so that a failed test's report holds the server's whole drain."""
    out: list[object] = []
    for call in calls:
        try:
            out.append(answer(call.result(timeout=120)))
        except grpc.RpcError as exc:
            out.append(f"{exc.code().name}: {exc.details()}")
    return out


@pytest.mark.flags("--max-batch-rows", "16", "--max-queue-requests", "1")
def test_full_queue_deadline_and_cancellation(slow_server: ServerProcess) -> None:
    server = slow_server
    long = LONG
    first = server.stub.Translate.future(long, timeout=120)
    _until(lambda: _gauge(server, "attn_active_requests") == 1, "the first call decoding")
    second = server.stub.Translate.future(long, timeout=120)  # over the row budget while the first decodes: waits
    _until(lambda: _gauge(server, "attn_queue_requests") == 1, "the second call queued")
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Translate(long, timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_requests" in refused.value.details()
    # Cancelled calls leave the engine: mid-decode and in the queue.
    second.cancel()
    first.cancel()
    _until(lambda: _gauge(server, "attn_active_requests") == 0 and _gauge(server, "attn_queue_requests") == 0,
           "the cancelled calls to leave the engine")
    # A deadline that passes mid-decode: DEADLINE_EXCEEDED, and counted as such. Half of what the whole call takes
    # on this machine now: past the engine's door (milliseconds), well before the end, however loaded the machine.
    started = time.monotonic()
    server.stub.Translate(long, timeout=120)
    took = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as late:
        server.stub.Translate(long, timeout=took / 2)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reason = ("attn_refused_requests_total", (("reason", "deadline"), ("rpc", "Translate")))
    _until(lambda: server.metrics().get(reason) == 1, "the deadline to be counted")
    assert server.metrics()[("attn_refused_requests_total", (("reason", "queue_full"), ("rpc", "Translate")))] == 1
    _until(lambda: _gauge(server, "attn_active_requests") == 0, "the expired call to leave the engine")


@pytest.mark.flags("--max-inflight", "1")
def test_max_inflight_bounds_the_calls_of_every_front_end_together(slow_server: ServerProcess) -> None:
    """One call decoding on one front-end: every other front-end refuses too (each counted only its own calls, so
    N front-ends held N times the bound), and once it ends the next call is served."""
    server = slow_server
    first = server.stub.Translate.future(LONG, timeout=120)
    _until(lambda: _gauge(server, "attn_active_requests") == 1, "the first call decoding")
    # 16 connections of their own: the kernel spreads them over both front-ends (all on one: odds 2 in 65,536).
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[OWN_CONNECTION]) for _ in range(16)]
    try:
        for channel in channels:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.AttentionServiceStub(channel).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 calls are being handled, the server's limit (max_inflight)" in refused.value.details()
        refusers = {r["process"] for r in server.events("rpc", code="RESOURCE_EXHAUSTED")}
        assert refusers == {"frontend-0", "frontend-1"}
        reason = ("attn_refused_requests_total", (("reason", "inflight_full"), ("rpc", "Translate")))
        assert server.metrics()[reason] == len(channels)
        first.cancel()
        _until(lambda: _gauge(server, "attn_active_requests") == 0, "the first call to leave the engine")
        reply = pb_grpc.AttentionServiceStub(channels[0]).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60)
        assert reply.translations
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.flags("--log-level", "DEBUG")
def test_sigterm_drains_every_process_and_loses_nothing(slow_server: ServerProcess) -> None:
    server = slow_server
    calls = [server.stub.Translate.future(LONG, timeout=120) for _ in range(4)]
    server.wait_for("rpc_received", count=4)  # all four accepted, on one front-end or both
    server.process.send_signal(signal.SIGTERM)
    server.wait_for("shutting_down")
    answers = _answers(calls, lambda response: len(response.translations))
    code = server.process.wait(120)
    assert answers == [len(LONG.texts)] * len(calls)  # accepted before the signal: every one is answered
    assert code == 0
    server.wait_for("stopped", exit_code=0)
    assert len(server.events("frontend_stopped", exit_code=0)) == 2
    # The parent's account of each child's exit: both front-ends first, then the engine, every one 0.
    assert [(e["role"], e["exit_code"]) for e in server.events("process_stopped")] == [
        ("frontend", 0), ("frontend", 0), ("engine", 0)]


@pytest.mark.flags("--log-level", "DEBUG")
def test_sigterm_loses_no_answer_to_a_client_that_reads_slowly(slow_server: ServerProcess) -> None:
    # gRPC's own stop closes a connection once its answers are written, not delivered: the slow client's next frame
    # then met a closed socket, the kernel reset the connection and dropped the rest of the answers (server/drain.py).
    server = slow_server
    relay = SlowReader(server.port)
    channel = grpc.insecure_channel(relay.target)
    stub = pb_grpc.AttentionServiceStub(channel)
    calls = [stub.Translate.future(LONG, timeout=120) for _ in range(4)]
    server.wait_for("rpc_received", count=4)
    server.process.send_signal(signal.SIGTERM)
    # Each answer large enough to wait in the server's send queue.
    answers = _answers(calls, lambda response: (len(response.translations), response.ByteSize() > 100_000))
    channel.close()
    assert answers == [(len(LONG.texts), True)] * len(calls)
    assert relay.resets == 0
    assert server.process.wait(120) == 0


@pytest.mark.flags("--max-connection-age", "0.5")
def test_a_batch_job_read_slowly_loses_no_line_while_its_connection_moves(slow_server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    # Once a connection has been asked to move, gRPC closes it as soon as its last answer is written; a frame the
    # client sends while still reading meets a closed socket, and the reset takes the rest of the answer:
    # UNAVAILABLE. The server's probe is off and client.connection's channels keep quiet while they read, which
    # makes such losses fewer, not none (docs/serving-processes.md, "What the age costs"); attn batch retries
    # them. Large answers (full attention at beam 16), read at 1.6 MB/s, over one connection that moves every 0.5 s.
    server = slow_server
    relay = SlowReader(server.port)
    lines = 160
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("".join(f"Hallo Welt {i} " * 10 + "\n" for i in range(lines)), encoding="utf-8")
    assert main(["batch", str(source), "-o", str(out), "--target", relay.target, "--beam", "16",
                 "--attention", "full", "--batch-size", "8", "--concurrency", "3", "--connections", "1",
                 "--summary", str(summary), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == list(range(1, lines + 1))
    assert all("error" not in r and r["hypotheses"][0]["attention"] for r in records)
    report = json.loads(summary.read_text())
    assert report["complete"] and report["ok"] == lines
    assert relay.connections >= 4  # moved to a new connection again and again while answers were on their way


def test_a_crashed_engine_fails_its_calls_promptly_and_is_restarted(slow_server: ServerProcess) -> None:
    server = slow_server
    [engine] = server.pids("engine")
    calls = [server.stub.Translate.future(LONG, timeout=120) for _ in range(4)]
    _until(lambda: _gauge(server, "attn_active_requests") >= 1, "calls inside the engine")
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    killed = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    _until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
           == health_pb2.HealthCheckResponse.NOT_SERVING, "health to say NOT_SERVING while the engine is gone", 10)
    for call in calls:
        with pytest.raises(grpc.RpcError) as failed:
            call.result(timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed < 10  # promptly, never hanging until the deadline
    server.wait_for("process_exited", role="engine")
    server.wait_for("engine_ready", count=4)  # both front-ends saw the first engine, then the new one
    short = pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(max_output_tokens=3))
    _until(lambda: _serves(server, short), "the restarted engine to serve")
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert server.metrics()[("attn_process_restarts_total", (("role", "engine"),))] == 1
    assert [pid for pid in server.pids("engine") if pid != engine]


def test_an_engine_that_cannot_come_back_says_so_without_saying_the_server_failed(models_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """The models folder gone (a volume unmounted), then the engine crashes: each restarted engine fails on the
    folder and says why in a restart_failed line; the server, which did start and keeps answering, logs no
    startup_failed, and the engine comes back once the folder does."""
    from tests.integration.test_hot_reload import NAME

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME, root / NAME)
    server = ServerProcess(root)
    try:
        server.wait_for("ready")
        root.rename(tmp_path / "away")
        [engine] = server.pids("engine")
        os.kill(engine, signal.SIGKILL)
        [failed] = server.wait_for("restart_failed", process="engine-0")
        assert failed["error"] == f"models directory {root} does not exist"
        assert not server.events("startup_failed")
        (tmp_path / "away").rename(root)
        _until(lambda: _serves(server, pb.TranslateRequest(texts=TEXTS[:1])), "the engine to come back", 60)
        assert not server.events("startup_failed")
    finally:
        assert server.stop() == 0


@pytest.mark.flags("--engines", "2", "--no-batching")
def test_two_engines_share_the_calls_and_a_crashed_one_fails_only_its_own(slow_server: ServerProcess) -> None:
    """One front-end's calls alternate between the engines; killing one fails the calls it held with UNAVAILABLE,
    promptly, while the other engine's calls are answered and health stays SERVING; the killed one is restarted."""
    server = slow_server
    engines = server.pids("engine")
    assert len(engines) == 2
    server.wait_for("engine_ready", count=4)  # each front-end has both engines' models record (its first may precede)
    calls = [server.stub.Translate.future(LONG, timeout=120) for _ in range(4)]  # one connection: one front-end
    # With batching off each engine decodes one call (a part of a LONG one) at a time and queues the next, so two
    # active calls mean both engines are decoding.
    _until(lambda: _gauge(server, "attn_active_requests") == 2 and _gauge(server, "attn_queue_requests") == 2,
           "two calls decoding and two queued, on two engines")
    health = health_pb2_grpc.HealthStub(server.channel)
    killed = time.monotonic()
    os.kill(engines[0], signal.SIGKILL)
    failed, answered = [], []
    for call in calls:
        try:
            answered.append(call.result(timeout=120))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            failed.append(time.monotonic() - killed)
    assert len(failed) == 2 and max(failed) < 10  # the killed engine's two, promptly
    assert len(answered) == 2 and all(len(a.translations) == len(LONG.texts) for a in answered)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    server.wait_for("process_exited", role="engine", pid=engines[0])
    server.wait_for("engine_ready", count=6)  # and then the restarted one
    assert server.metrics()[("attn_process_restarts_total", (("role", "engine"),))] == 1
    short = pb.TranslateRequest(texts=["Hallo"], options=pb.DecodingOptions(max_output_tokens=3))
    assert all(server.stub.Translate(short, timeout=60).translations for _ in range(4))


def test_children_write_their_log_lines_straight_to_the_servers_stderr(served: ServerProcess) -> None:
    """Not through the parent's stderr pipe, whose reader would parse and rewrite every access-log line: each child
    holds the server's own stderr (the pipe this test reads), and its lines arrive there as JSON."""
    assert served.process.stderr is not None
    ours = f"pipe:[{os.fstat(served.process.stderr.fileno()).st_ino}]"
    for pid in [*served.pids("engine"), *served.pids("frontend")]:
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                if os.path.islink(f"/proc/{pid}/fd/{fd}")}
        assert ours in held, f"process {pid} does not hold the server's stderr {ours}: {sorted(held)}"
    before = len(served.events("rpc"))
    served.stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60)
    _until(lambda: len(served.events("rpc")) > before, "the call's access-log line")
    # Each line names the child that wrote it; the parent's lines name none.
    assert served.events("rpc")[-1]["process"] in {"frontend-0", "frontend-1"}
    assert {r.get("process") for r in served.events("model_loaded")} == {"engine-0"}
    assert {r.get("process") for r in served.events("frontend_ready")} == {"frontend-0", "frontend-1"}
    assert "process" not in served.events("ready")[0]


def test_a_crashed_front_end_is_restarted(served: ServerProcess) -> None:
    victim = served.pids("frontend")[0]
    os.kill(victim, signal.SIGKILL)
    served.wait_for("process_exited", role="frontend", pid=victim)
    _until(lambda: len(served.pids("frontend")) == 2 and len(served.events("frontend_ready")) >= 3,
           "a new front-end")
    assert served.stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60).translations
    assert served.metrics()[("attn_process_restarts_total", (("role", "frontend"),))] == 1


def test_a_front_end_restarted_after_a_served_versions_files_changed_serves_what_the_engine_loaded(
        models_dir: Path, tmp_path: Path) -> None:
    """A version is read once: the engine serves what it loaded though its files change on disk. A front-end
    restarted meanwhile builds its view from the manifest and tokenizer the engine sends, so it serves that version
    and tokenizes as the engine's graphs were trained (read from the folder, it would fail on the broken manifest,
    or tokenize with another model's pieces)."""
    from tests.integration.test_hot_reload import NAME

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME / "1", root / NAME / "1")
    server = ServerProcess(root, frontends=1)
    try:
        server.wait_for("ready")
        request = pb.TranslateRequest(texts=TEXTS[:2])
        before = server.stub.Translate(request, timeout=60)
        folder = root / NAME / "1"
        (folder / "manifest.json").write_text("broken")
        for tokenizer in folder.glob("*.model"):
            tokenizer.write_bytes(b"not a SentencePiece model")
        [victim] = server.pids("frontend")
        os.kill(victim, signal.SIGKILL)
        server.wait_for("process_exited", role="frontend", pid=victim)
        server.wait_for("frontend_ready", count=2, timeout=30)
        _until(lambda: _serves(server, request), "the restarted front-end to serve")
        after = server.stub.Translate(request, timeout=60)
        assert list(after.translations) == list(before.translations)
        assert not server.events("model_view_failed")
    finally:
        assert server.stop() == 0


def _serves(server: ServerProcess, request: pb.TranslateRequest) -> bool:
    try:
        return bool(server.stub.Translate(request, timeout=30).translations)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return False


@pytest.mark.parametrize("engines", [1, 2])
def test_hot_reload_reaches_every_front_end(models_dir: Path, tmp_path: Path, engines: int) -> None:
    from tests.integration.test_hot_reload import NAME, add_version

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME, root / NAME)
    server = ServerProcess(root, "--engines", str(engines))
    try:
        server.wait_for("ready")
        add_version(root, root / NAME / "1", "2")
        server.process.send_signal(signal.SIGHUP)  # the parent passes it to every engine process
        synced = server.wait_for("models_synced", count=engines, loaded=[f"{NAME}/2"])
        assert all(s["retired"] == [f"{NAME}/1"] for s in synced)
        # prometheus_client cannot remove a series in multiprocess mode, and warns when asked to
        assert not [r for r in server.log if "Removal of labels" in json.dumps(r)]
        # /metrics shows version 2's gauges alone: version 1's stay in the engines' files, left out by the parent
        gauges = {"attn_model_info", "attn_model_load_duration_seconds", "attn_queue_requests", "attn_queue_tokens",
                  "attn_queue_capacity_requests", "attn_active_requests"}
        _until(lambda: {dict(labels)["version"] for (name, labels) in server.metrics() if name in gauges} == {"2"},
               "version 1's gauges to leave /metrics")
        capacity = ("attn_queue_capacity_requests", (("model", NAME), ("version", "2")))
        assert server.metrics()[capacity] == 256 * engines  # ATTN_MAX_QUEUE_REQUESTS's default, each engine's
        server.wait_for("engine_ready", count=2 * engines)  # each front-end's first view; then the new set
        channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(6)]
        try:
            from attention_pb.v1 import attention_pb2_grpc as pb_grpc

            for channel in channels:  # spread over both front-ends
                stub = pb_grpc.AttentionServiceStub(channel)
                _until(lambda stub=stub: [m.version for m in stub.ListModels(pb.ListModelsRequest(),
                                                                              timeout=30).models] == ["2"],
                       "every front-end to serve version 2", timeout=30)
                for _ in range(engines):  # one call after another: each goes to the next engine
                    assert stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60).version == "2"
        finally:
            for channel in channels:
                channel.close()
    finally:
        assert server.stop() == 0


def test_tokens_are_checked_on_every_front_end(models_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    server = ServerProcess(models_dir, "--auth-token-file", str(tokens))
    try:
        server.wait_for("ready")
        from attention_pb.v1 import attention_pb2_grpc as pb_grpc

        for _ in range(6):  # new connections land on either front-end
            with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.AttentionServiceStub(channel)
                with pytest.raises(grpc.RpcError) as denied:
                    stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                response = stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30,
                                          metadata=[("authorization", "Bearer s3cret")])
                assert response.translations
    finally:
        assert server.stop() == 0


def test_a_killed_parent_leaves_no_process_and_no_folder(models_dir: Path, tmp_path: Path) -> None:
    """SIGKILL gives the parent no chance to drain: its children notice, stop, and the engine removes the private
    folder (socket, metrics files) the parent made."""
    runtime = tmp_path / "tmp"
    runtime.mkdir()
    server = ServerProcess(models_dir, env={"TMPDIR": str(runtime)})
    server.wait_for("ready")
    children = [int(c) for task in Path(f"/proc/{server.process.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    assert children and len(list(runtime.glob("attn-serve-*"))) == 1
    names = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in children)
    assert [n for n in names if n.startswith("attn-")] == ["attn-engine-0", "attn-frontend-0", "attn-frontend-1"]
    server.kill()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped
        except FileNotFoundError:
            return True

    _until(lambda: all(gone(pid) for pid in children), "the children to stop")
    _until(lambda: not list(runtime.glob("attn-serve-*")), "the private folder to be removed", timeout=10)


def test_tls_on_every_front_end(models_dir: Path, tmp_path: Path) -> None:
    from attention_pb.v1 import attention_pb2_grpc as pb_grpc
    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    server = ServerProcess(models_dir, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    try:
        server.wait_for("ready")
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca))
        for _ in range(6):  # new connections land on either front-end
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as plain:
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.AttentionServiceStub(plain).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials, options=options) as channel:
                response = pb_grpc.AttentionServiceStub(channel).Translate(pb.TranslateRequest(texts=TEXTS[:1]),
                                                                           timeout=30)
                assert response.translations
    finally:
        assert server.stop() == 0


def test_replaced_certificate_files_reach_every_front_end(models_dir: Path, tmp_path: Path) -> None:
    """Each front-end watches the files: whichever one a new connection lands on presents the new certificate."""
    first, renewed = server_pair("attn-server-a"), server_pair("attn-server-b")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first.install(cert, key)
    server = ServerProcess(models_dir, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        server.wait_for("ready")
        assert peer_certificate(server.port) == first.der
        renewed.install(cert, key)

        def reloaded() -> set[str]:
            return {r["process"] for r in server.events("tls_reloaded")}

        for _ in range(40):  # the kernel spreads new connections over the front-ends sharing the port
            assert peer_certificate(server.port) == renewed.der
            if len(reloaded()) == 2:
                break
        # (the last front-end's line may still be on its way from the process)
        assert {r["process"] for r in server.wait_for("tls_reloaded", count=2, timeout=30)} == {"frontend-0",
                                                                                              "frontend-1"}
    finally:
        assert server.stop() == 0


def test_a_restarted_engine_skips_a_version_that_reload_refused(models_dir: Path, tmp_path: Path) -> None:
    """A broken version on disk, refused by the reload that found it, does not keep a crashed engine from coming back:
    the restarted engine refuses it too and serves the version that was served."""
    from tests.integration.test_hot_reload import NAME

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME, root / NAME)
    server = ServerProcess(root)
    try:
        server.wait_for("ready")
        _publish_a_broken_version(root / NAME, "2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("model_refused", version="2")
        [engine] = server.pids("engine")
        os.kill(engine, signal.SIGKILL)
        server.wait_for("process_exited", role="engine")
        server.wait_for("model_refused", count=2, version="2")  # by the restarted engine, which goes on
        _until(lambda: _serves(server, pb.TranslateRequest(texts=TEXTS[:1])), "the restarted engine to serve")
        assert server.stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60).version == "1"
        assert server.metrics()[("attn_process_restarts_total", (("role", "engine"),))] == 1
    finally:
        assert server.stop() == 0


def test_a_child_that_keeps_dying_young_is_restarted_later_each_time() -> None:
    from server.processes import RESTART_DELAY_MAX_SECONDS, restart_delay

    assert [restart_delay(quick) for quick in range(5)] == [0.0, 0.0, 0.5, 1.0, 2.0]  # the first two at once
    assert restart_delay(40) == RESTART_DELAY_MAX_SECONDS


@pytest.mark.parametrize("signal_name", ["SIGHUP", "SIGTERM"])
def test_a_signal_while_the_processes_start_is_handled_not_fatal(models_dir: Path, signal_name: str) -> None:
    """Sent as soon as the children exist, before they have handlers: SIGHUP (passed on to the engine) is a
    reload once it is up, SIGTERM a clean stop (exit 0), never a child killed by the signal."""
    server = ServerProcess(models_dir)
    try:
        server.wait_for("process_started", count=3)
        server.process.send_signal(getattr(signal, signal_name))
        if signal_name == "SIGHUP":
            server.wait_for("ready")
            assert server.stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=60).translations
            assert server.stop() == 0
        else:
            assert server.process.wait(120) == 0
        assert not server.events("process_exited") and not server.events("startup_failed")
    finally:
        server.kill()


def test_a_start_up_failure_of_the_engine_stops_the_server(models_dir: Path, tmp_path: Path) -> None:
    """Nothing to serve: the server stops with exit 1 instead of restarting the engine forever."""
    empty = tmp_path / "empty"
    empty.mkdir()
    server = ServerProcess(empty)
    try:
        assert server.process.wait(120) == 1
        server.wait_for("startup_failed")
        assert any("the engine process exited" in e.get("error", "") for e in server.events("startup_failed"))
        assert not server.events("process_exited")  # not restarted
    finally:
        server.kill()


def test_a_certificate_that_does_not_parse_stops_the_server_before_any_process_starts(models_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """Every front-end would fail on it: the parent says so once, naming the setting, and starts nothing."""
    import subprocess
    import sys

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    done = subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--frontends", "2", "--tls-cert", str(junk), "--tls-key", str(junk)],
        env={**os.environ, "ATTN_MODELS_DIR": str(models_dir)}, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [e for e in events if e["level"] == "error"]
    assert [e["event"] for e in errors] == ["startup_failed"], errors
    assert f"tls_cert {junk}" in errors[0]["error"]
    assert not [e for e in events if e["event"] == "process_started"]


def test_a_device_that_is_not_usable_stops_the_start_with_one_line_naming_why(models_dir: Path) -> None:
    """ATTN_DEVICE=tensorrt where TensorRT is missing (the Dockerfile does not install it): the engine process says why
    in its startup_failed line, as the one-process server does, instead of dying in a traceback."""
    if device.tensorrt_problem() is None:
        pytest.skip("TensorRT is usable here")
    server = ServerProcess(models_dir, "--device", "tensorrt")
    try:
        assert server.process.wait(120) == 1
        server.wait_for("startup_failed", process="engine-0")
        [failed] = server.events("startup_failed", process="engine-0")
        assert failed["error"].startswith("device=tensorrt was asked for, but ")
        assert not server.events("stderr", process="engine-0")  # no traceback
    finally:
        server.kill()


def test_a_version_first_refused_by_a_restarted_engine_is_counted(models_dir: Path, tmp_path: Path) -> None:
    """A broken version published while the engine is down (or before a look at the folder) is refused first by the
    restarted engine: counted once, and not again by the engine restarted after that."""
    from tests.integration.test_hot_reload import NAME

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME, root / NAME)
    server = ServerProcess(root)  # no reload interval: only a restart looks at the folder
    failures = ("attn_model_load_failures_total", (("model", NAME),))
    try:
        server.wait_for("ready")
        _publish_a_broken_version(root / NAME, "2")
        for restart in (1, 2):
            [engine] = server.pids("engine")
            os.kill(engine, signal.SIGKILL)
            server.wait_for("model_refused", count=restart, version="2")
            _until(lambda: _serves(server, pb.TranslateRequest(texts=TEXTS[:1])), "the restarted engine to serve")
            assert server.metrics().get(failures) == 1
    finally:
        assert server.stop() == 0


def _publish_a_broken_version(model: Path, version: str) -> None:
    """Publishes ``version`` of ``model`` as the exporter does (staged, then renamed), with a decoder step that is
    not a graph: every engine refuses it."""
    staging = model / f".{version}.staging"
    shutil.copytree(model / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    (staging / "decoder_step.onnx").write_bytes(b"not a graph")
    os.rename(staging, model / version)


def test_a_refused_version_is_counted_once_whatever_the_engines(models_dir: Path, tmp_path: Path) -> None:
    """attn_model_load_failures_total counts model versions refused, not engine processes that refused one: two
    engines refusing the same broken version count it once, and an engine restarted after a crash, which refuses it
    again as it comes back, does not count it a second time."""
    from tests.integration.test_hot_reload import NAME

    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME, root / NAME)
    server = ServerProcess(root, "--engines", "2")
    failures = ("attn_model_load_failures_total", (("model", NAME),))
    try:
        server.wait_for("ready")
        _publish_a_broken_version(root / NAME, "2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("model_refused", count=2, version="2")  # by each engine
        assert server.metrics().get(failures) == 1
        for engine in server.pids("engine"):
            os.kill(engine, signal.SIGKILL)
            server.wait_for("process_exited", role="engine", pid=engine)
        server.wait_for("model_refused", count=4, version="2")  # by both restarted engines
        _until(lambda: _serves(server, pb.TranslateRequest(texts=TEXTS[:1])), "the restarted engines to serve")
        assert server.metrics().get(failures) == 1
        assert server.metrics()[("attn_process_restarts_total", (("role", "engine"),))] == 2
    finally:
        assert server.stop() == 0
