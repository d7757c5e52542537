"""TLS, mutual TLS and bearer tokens against real servers, with a throw-away CA made in the session (tests/pki.py)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client import connection
from client.cli import main
from server.app import AttentionServer
from server.errors import StartupError
from server.metrics import Metrics
from server.security import TokenAuthInterceptor, server_credentials
from server.settings import Settings
from tests.integration.serving import RunningServer, peer_certificate, settings
from tests.pki import Pki, issue, make_ca, make_pki, server_pair, write_cert, write_key

TOKEN = "s3cret-token-Zq8vXk2"
OTHER_TOKEN = "second-token-Yp4"
WRONG_TOKEN = "not-the-token"
TEXT = "Ich hoffe, es geht dir gut."


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# accepted tokens\n{TOKEN}\n\n{OTHER_TOKEN}\n", encoding="ascii")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_token_server(models_dir: Path, pki: Pki, token_file: Path) -> Iterator[RunningServer]:
    """TLS and tokens, models loaded: what a production deployment looks like."""
    server = RunningServer(settings(models_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                    auth_token_file=str(token_file)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_server(models_dir: Path, pki: Pki) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                    tls_client_ca=str(pki.ca)), load=False)
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_server(models_dir: Path, token_file: Path) -> Iterator[RunningServer]:
    """Plaintext with tokens (behind a TLS-terminating proxy, say)."""
    server = RunningServer(settings(models_dir, auth_token_file=str(token_file)))
    yield server
    server.close()


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined, no-any-return]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- TLS ---------------------------------------------------------------------------------------------------------------


def test_tls_call_with_the_ca_works(tls_token_server: RunningServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca))
    for host in ("127.0.0.1", "localhost"):  # both are in the certificate's subject alternative names
        with grpc.secure_channel(f"{host}:{tls_token_server.port}", credentials) as channel:
            response = pb_grpc.AttentionServiceStub(channel).Translate(
                pb.TranslateRequest(texts=[TEXT]), timeout=60, metadata=_bearer(TOKEN))
            assert response.model == "tiny-de-en" and response.translations[0].hypotheses[0].text


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_token_server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_token_server.port}") as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        assert _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10,
                                             metadata=_bearer(TOKEN))) == grpc.StatusCode.UNAVAILABLE


def test_the_cli_says_to_use_tls_when_a_tls_server_closes_its_plaintext_connection(
        tls_token_server: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    """gRPC reports the closed connection only as 'Socket closed'."""
    assert main(["health", "--target", f"127.0.0.1:{tls_token_server.port}", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attn: UNAVAILABLE") and "attn: if the server speaks TLS, add --tls-ca PEM" in err
    # a client that does speak TLS but does not trust the server hears what failed, and no hint
    assert main(["health", "--target", f"localhost:{tls_token_server.port}", "--tls-ca", str(pki.rogue_cert),
                 "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "attn: if" not in err


def test_the_batch_job_says_to_use_tls_when_a_tls_server_closes_its_plaintext_connection(
        tls_token_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``attn batch`` stopped with 'Socket closed' and 'run the same command again to resume', which fails again."""
    source = tmp_path / "in.txt"
    source.write_text(f"{TEXT}\n", encoding="utf-8")
    assert main(["batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--target",
                 f"127.0.0.1:{tls_token_server.port}", "--max-retries", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "attn batch: stopped: UNAVAILABLE" in err
    assert "attn batch: if the server speaks TLS, add --tls-ca PEM" in err


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(tls_token_server: RunningServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.read(pki.rogue_cert))
    with grpc.secure_channel(f"127.0.0.1:{tls_token_server.port}", credentials) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        assert _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10,
                                             metadata=_bearer(TOKEN))) == grpc.StatusCode.UNAVAILABLE


# -- certificates replaced while the server runs ----------------------------------------------------------------------


def _check(target: str, ca: bytes) -> health_pb2.HealthCheckResponse:
    """Health over a new connection that trusts only ``ca``."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not one another channel made
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options=options) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_replaced_certificate_files_are_served_to_new_connections(models_dir: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """cert-manager and certbot replace the files in place: new handshakes get the new certificate, connections
    made before keep going, and files that do not load leave the working certificate in use, logged once."""
    first, renewed = server_pair("attn-server-a"), server_pair("attn-server-b")  # each from a CA of its own
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first.install(cert, key)
    server = RunningServer(settings(models_dir, tls_cert=str(cert), tls_key=str(key)), load=False)
    target = f"localhost:{server.port}"
    before = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=first.ca))
    try:
        assert peer_certificate(server.port) == first.der
        health: Any = health_pb2_grpc.HealthStub(before)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)

        renewed.install(cert, key)
        assert peer_certificate(server.port) == renewed.der
        _check(target, renewed.ca)  # a client that trusts only the new CA connects ...
        with pytest.raises(grpc.RpcError) as refused:  # ... and one that trusts only the old CA no longer can
            _check(target, first.ca)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # the connection made before goes on

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="attn.security"):
            cert.write_bytes(first.cert)  # a certificate without its key: does not match the key in place
            for _ in range(3):
                assert peer_certificate(server.port) == renewed.der
            failed = [r for r in caplog.records if r.getMessage() == "tls_reload_failed"]
            assert len(failed) == 1 and "are not a usable pair" in failed[0].fields["error"]  # type: ignore[attr-defined]
            key.write_bytes(first.key)  # the write that completes it
            assert peer_certificate(server.port) == first.der
        assert [r.getMessage() for r in caplog.records].count("tls_reloaded") == 1
    finally:
        before.close()
        server.close()


# -- mutual TLS --------------------------------------------------------------------------------------------------------


def _mtls_list(server: RunningServer, pki: Pki, cert: Path | None, key: Path | None) -> pb.ListModelsResponse:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca),
                                               private_key=key.read_bytes() if key else None,
                                               certificate_chain=cert.read_bytes() if cert else None)
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        return pb_grpc.AttentionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)


def test_mtls_client_with_a_certificate_from_the_ca_works(mtls_server: RunningServer, pki: Pki) -> None:
    assert isinstance(_mtls_list(mtls_server, pki, pki.client_cert, pki.client_key), pb.ListModelsResponse)


def test_mtls_client_without_a_certificate_is_rejected(mtls_server: RunningServer, pki: Pki) -> None:
    assert _code(lambda: _mtls_list(mtls_server, pki, None, None)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_a_certificate_from_another_ca_is_rejected(mtls_server: RunningServer, pki: Pki) -> None:
    assert _code(lambda: _mtls_list(mtls_server, pki, pki.rogue_cert, pki.rogue_key)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_health_needs_the_certificate_too(mtls_server: RunningServer, pki: Pki) -> None:
    """Health is open to callers without a token, not to callers without a certificate: TLS is below gRPC."""
    with grpc.secure_channel(f"localhost:{mtls_server.port}",
                             grpc.ssl_channel_credentials(root_certificates=pki.read(pki.ca))) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        assert _code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE


# -- bearer tokens -----------------------------------------------------------------------------------------------------


def _refused(server: RunningServer, rpc: str) -> float:
    value = server.server.metrics.registry.get_sample_value("attn_refused_requests_total",
                                                           {"rpc": rpc, "reason": "unauthenticated"})
    return value or 0.0


def test_no_token_is_unauthenticated_and_counted(token_server: RunningServer) -> None:
    before = _refused(token_server, "ListModels")
    with pytest.raises(grpc.RpcError) as info:
        token_server.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "authorization: Bearer" in info.value.details()  # type: ignore[attr-defined]
    assert _refused(token_server, "ListModels") == before + 1


def _answered(server: RunningServer, rpc: str, code: str) -> float:
    """RPCs answered with ``code``, the refused ones included."""
    return sum(sample.value for metric in server.server.metrics.registry.collect() if metric.name == "attn_requests"
               for sample in metric.samples if sample.name.endswith("_total") and sample.labels["rpc"] == rpc
               and sample.labels["code"] == code)


def test_wrong_token_is_unauthenticated_without_echoing_it(token_server: RunningServer) -> None:
    before, answered = _refused(token_server, "Translate"), _answered(token_server, "Translate", "UNAUTHENTICATED")
    translated = _answered(token_server, "Translate", "OK")
    for metadata in (_bearer(WRONG_TOKEN), (("authorization", WRONG_TOKEN),), _bearer(TOKEN[:-1])):
        with pytest.raises(grpc.RpcError) as info:
            token_server.stub.Translate(pb.TranslateRequest(texts=[TEXT]), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        details = info.value.details()  # type: ignore[attr-defined]
        assert WRONG_TOKEN not in details and TOKEN[:-1] not in details
    assert _refused(token_server, "Translate") == before + 3
    assert _answered(token_server, "Translate", "UNAUTHENTICATED") == answered + 3  # in the requests by code too
    assert _answered(token_server, "Translate", "OK") == translated


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_right_token_works(token_server: RunningServer, token: str) -> None:
    response = token_server.stub.Translate(pb.TranslateRequest(texts=[TEXT], options=pb.DecodingOptions(beam_size=1)),
                                           timeout=60, metadata=(("authorization", f"bearer {token}"),))
    assert response.translations[0].hypotheses[0].text


def test_a_token_revoked_in_the_file_is_refused_without_a_restart(models_dir: Path, tmp_path: Path) -> None:
    """Before, the token file was read at start only: a leaked token stayed good until every replica restarted."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n", encoding="ascii")
    server = RunningServer(settings(models_dir, auth_token_file=str(path)), load=False)
    try:
        listing = pb.ListModelsRequest()
        server.stub.ListModels(listing, timeout=10, metadata=_bearer(OTHER_TOKEN))
        aside = tmp_path / ".tokens.new"
        aside.write_text(f"{TOKEN}\n{WRONG_TOKEN}\n", encoding="ascii")
        aside.replace(path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the file is looked at once a second
            try:
                server.stub.ListModels(listing, timeout=10, metadata=_bearer(OTHER_TOKEN))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the revoked token was still accepted after 30 s")
        for token in (TOKEN, WRONG_TOKEN):  # the token kept, and the one added
            server.stub.ListModels(listing, timeout=10, metadata=_bearer(token))
    finally:
        server.close()


def test_health_and_reflection_need_no_token(token_server: RunningServer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    health: Any = health_pb2_grpc.HealthStub(token_server.channel)
    response = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert "attention.v1.AttentionService" in ProtoReflectionDescriptorDatabase(token_server.channel).get_services()


def test_other_services_on_the_port_need_the_token(token_server: RunningServer) -> None:
    """Deny by default: a method of no known service is refused without a token, not left open; the V2 (Triton)
    inference service on the same port needs the token as well."""
    missing = token_server.channel.unary_unary("/test.Nowhere/Method")
    before = _refused(token_server, "unknown")
    assert _code(lambda: missing(b"", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert _refused(token_server, "unknown") == before + 1
    assert _code(lambda: missing(b"", timeout=10, metadata=_bearer(TOKEN))) == grpc.StatusCode.UNIMPLEMENTED
    live = token_server.channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
    assert _code(lambda: live(b"", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_call_without_a_token_is_refused_before_its_request_arrives(token_server: RunningServer) -> None:
    """gRPC runs a unary method's handler once the whole request message is in: a denial of that shape left a caller
    without a token that sent the headers and never the message holding the call open, and every drain with it."""
    released = threading.Event()

    def no_request() -> Iterator[bytes]:
        released.wait(60)
        yield from ()

    translate = token_server.channel.stream_stream("/attention.v1.AttentionService/Translate")
    try:
        assert _code(lambda: list(translate(no_request(), timeout=20))) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        released.set()


def _denied_codes(port: int) -> list[grpc.StatusCode]:
    """The status codes of a bidirectional and a server-streaming call made without a token."""
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for call in (lambda: channel.stream_stream("/test.Echo/Chat")(iter([b"a", b"b"]), timeout=10),
                     lambda: channel.unary_stream("/test.Echo/Count")(b"", timeout=10)):
            with pytest.raises(grpc.RpcError) as info:
                list(call())
            codes.append(info.value.code())
    return codes


def test_streaming_methods_of_other_services_are_guarded() -> None:
    """Server and bidirectional streaming methods are refused too, and answer with a token."""

    async def chat(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield request

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        for i in range(3):
            yield bytes([i])

    async def scenario() -> None:
        metrics = Metrics(CollectorRegistry())
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor([TOKEN], metrics)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            # The denials are read with the blocking client, off the loop: the asyncio client reports INTERNAL
            # instead of the server's status when one of its writes races the server ending the call
            # (grpc/grpc#36066), which is a client bug, not the shape of our denial.
            assert await asyncio.to_thread(_denied_codes, port) == [grpc.StatusCode.UNAUTHENTICATED] * 2
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                chat_call = channel.stream_stream("/test.Echo/Chat")
                count_call = channel.unary_stream("/test.Echo/Count")
                auth = _bearer(TOKEN)
                assert [m async for m in chat_call(iter([b"a", b"b"]), metadata=auth, timeout=10)] == [b"a", b"b"]
                assert [m async for m in count_call(b"", metadata=auth, timeout=10)] == [b"\x00", b"\x01", b"\x02"]
        finally:
            await server.stop(None)
        for rpc in ("Chat", "Count"):
            assert metrics.registry.get_sample_value("attn_refused_requests_total",
                                                     {"rpc": rpc, "reason": "unauthenticated"}) == 1

    asyncio.run(scenario())


# -- the client: connection options and the attn CLI -------------------------------------------------------------------


def test_cli_against_a_tls_and_token_server(tls_token_server: RunningServer, pki: Pki, token_file: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(connection.TOKEN_ENV, raising=False)
    target = ["--target", f"localhost:{tls_token_server.port}", "--tls-ca", str(pki.ca)]
    assert main(["models", *target, "--token-file", str(token_file)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["MODEL", "VERSION"] and rows[1].split()[0] == "tiny-de-en"

    assert main(["models", *target]) == 1
    assert capsys.readouterr().err.startswith("attn: UNAUTHENTICATED: missing credentials")

    monkeypatch.setenv(connection.TOKEN_ENV, OTHER_TOKEN)
    assert main(["translate", TEXT, "--beam", "1", "--json", *target]) == 0
    assert '"tiny-de-en"' in capsys.readouterr().out

    # health needs no token; --tls-server-name checks the certificate for a name other than the target's host
    monkeypatch.delenv(connection.TOKEN_ENV)
    assert main(["health", "--target", f"127.0.0.1:{tls_token_server.port}", "--tls-ca", str(pki.ca),
                 "--tls-server-name", "localhost"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_mtls(mtls_server: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"localhost:{mtls_server.port}", "--tls-ca", str(pki.ca)]
    assert main(["models", *target, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]) == 0
    assert capsys.readouterr().out.startswith("MODEL")
    assert main(["models", *target, "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "add --tls-cert PEM --tls-key PEM" in err
    with pytest.raises(SystemExit) as stopped:  # a usage error (test_client_cli.py has the cases)
        main(["models", *target, "--tls-cert", str(pki.client_cert)])
    assert stopped.value.code == 2 and "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_aio_channel_with_token(token_server: RunningServer, tls_token_server: RunningServer, pki: Pki) -> None:
    """The asyncio channel carries the token too, over plaintext (interceptor) and TLS (call credentials)."""

    async def models(config: connection.ChannelConfig) -> int:
        async with config.aio_channel() as channel:
            response = await pb_grpc.AttentionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            return len(response.models)

    assert asyncio.run(models(connection.ChannelConfig(f"127.0.0.1:{token_server.port}", token=TOKEN))) == 1
    assert asyncio.run(models(connection.ChannelConfig(f"localhost:{tls_token_server.port}", tls_ca=str(pki.ca),
                                                       token=TOKEN))) == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(models(connection.ChannelConfig(f"127.0.0.1:{token_server.port}", token=WRONG_TOKEN)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- start-up errors ---------------------------------------------------------------------------------------------------


def _start_fails(models_dir: Path, **overrides: Any) -> str:
    server = AttentionServer(settings(models_dir, **overrides), CollectorRegistry())

    async def start() -> None:
        try:
            await server.start()
        finally:
            await server.stop(0)

    with pytest.raises(StartupError) as info:
        asyncio.run(start())
    return str(info.value)


def test_unusable_tls_files_stop_the_start(models_dir: Path, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert f"cannot read tls_cert {missing}" in _start_fails(models_dir, tls_cert=str(missing),
                                                             tls_key=str(pki.server_key))
    message = _start_fails(models_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.client_key))
    assert "are not a usable pair" in message and "KEY_VALUES_MISMATCH" in message.upper()
    message = _start_fails(models_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                           tls_client_ca=str(pki.server_key))
    assert f"tls_client_ca {pki.server_key} holds no usable PEM CA certificate" in message
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    assert "are not a usable pair" in _start_fails(models_dir, tls_cert=str(pki.server_cert), tls_key=str(encrypted))


def test_an_expired_certificate_stops_the_start(tmp_path: Path) -> None:
    """OpenSSL loads it and gRPC would serve it; every client would then fail its handshake."""
    ca_key, ca_cert = make_ca("attn test CA")
    key, cert = issue(ca_key, ca_cert, "attn-server", server=True, valid_for=-datetime.timedelta(days=1))
    expired, key_file = write_cert(cert, tmp_path / "expired.pem"), write_key(key, tmp_path / "server.key")
    with pytest.raises(StartupError, match=f"tls_cert {expired} expired on .*renew it"):
        server_credentials(Settings(tls_cert=str(expired), tls_key=str(key_file)))
    key, cert = issue(ca_key, ca_cert, "attn-server", server=True, valid_for=datetime.timedelta(minutes=5))
    assert server_credentials(Settings(tls_cert=str(write_cert(cert, tmp_path / "fresh.pem")),
                                       tls_key=str(write_key(key, tmp_path / "fresh.key")))) is not None


def test_unusable_token_file_stops_the_start(models_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n\n", encoding="ascii")
    assert "holds no tokens" in _start_fails(models_dir, auth_token_file=str(empty))
    assert "cannot read auth_token_file" in _start_fails(models_dir, auth_token_file=str(tmp_path / "missing"))
