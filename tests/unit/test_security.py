"""Token files, the token check, the security settings, certificates replaced while the server runs, and the client's
connection options (no sockets)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from client import connection
from server import security
from server.errors import StartupError
from server.metrics import Metrics
from server.security import (
    OPEN_SERVICES,
    CertificateWatch,
    TokenAuthInterceptor,
    TokenFile,
    load_tokens,
    parse_tokens,
    server_credentials,
)
from server.settings import Settings
from tests.pki import ServerPair, server_pair

TOKEN = "tok-3f9a1c"


# -- token files -------------------------------------------------------------------------------------------------------


def test_tokens_one_per_line_with_comments_and_blanks() -> None:
    text = f"# production clients\n  {TOKEN}  \n\n# batch job\r\nother+/token==\n"
    assert parse_tokens(text) == [TOKEN, "other+/token=="]


@pytest.mark.parametrize(("text", "message"), [
    ("", "holds no tokens"),
    ("# only a comment\n\n   \n", "holds no tokens"),
    (f"{TOKEN}\nBearer {TOKEN}\n", "line 2: a token is one word"),
    ("two words\n", "line 1: a token is one word"),
    ("caf\u00e9\n", "line 1: a token is one word"),
])
def test_bad_token_files_name_the_line_not_the_token(text: str, message: str) -> None:
    with pytest.raises(StartupError, match=message) as info:
        parse_tokens(text)
    assert not any(secret in str(info.value) for secret in (TOKEN, "two words", "caf\u00e9"))


def test_load_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n", encoding="ascii")
    assert load_tokens(str(path)) == [TOKEN]
    with pytest.raises(StartupError, match=f"cannot read auth_token_file {tmp_path / 'missing'}"):
        load_tokens(str(tmp_path / "missing"))
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(StartupError, match="is not ASCII text"):
        load_tokens(str(path))


# -- the token check ---------------------------------------------------------------------------------------------------


@pytest.fixture
def interceptor() -> TokenAuthInterceptor:
    return TokenAuthInterceptor([TOKEN, "second"], Metrics(CollectorRegistry()))


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", "Bearer second"])
def test_known_tokens_pass(interceptor: TokenAuthInterceptor, value: str) -> None:
    assert interceptor.check([("x-request-id", "r1"), ("authorization", value)]) is None


@pytest.mark.parametrize(("metadata", "reason"), [
    ([], "missing credentials"),
    ([("x-request-id", "r1")], "missing credentials"),
    ([("authorization", TOKEN)], "malformed"),
    ([("authorization", f"Basic {TOKEN}")], "malformed"),
    ([("authorization", "Bearer ")], "malformed"),
    ([("authorization", f"Bearer {TOKEN}x")], "invalid bearer token"),
    ([("authorization", f"Bearer {TOKEN[:-1]}")], "invalid bearer token"),
    ([("authorization", "Bearer secondsecond")], "invalid bearer token"),
    ([("authorization", b"Bearer " + TOKEN.encode())], "malformed"),
])
def test_missing_or_wrong_tokens_are_refused(interceptor: TokenAuthInterceptor, metadata: list[tuple[str, object]],
                                             reason: str) -> None:
    problem = interceptor.check(metadata)
    assert problem is not None and reason in problem
    assert TOKEN[:-1] not in problem  # the message never echoes what was sent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replace_file(path: Path, text: str) -> None:
    """As a Secret's update or an editor's save does: written aside, then renamed over the file."""
    aside = path.with_name(f".{path.name}.new")
    aside.write_text(text, encoding="ascii")
    os.replace(aside, path)


def test_a_replaced_token_file_counts_from_the_next_look(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, the tokens were read at start only: revoking a leaked one needed a restart of every replica."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\nsecond\n", encoding="ascii")
    clock = Clock()
    interceptor = TokenAuthInterceptor(TokenFile(str(path), clock), Metrics(CollectorRegistry()))
    bearer = lambda token: [("authorization", f"Bearer {token}")]  # noqa: E731
    assert interceptor.check(bearer("second")) is None
    replace_file(path, f"{TOKEN}\nthird\n")  # "second" revoked, "third" added
    assert interceptor.check(bearer("second")) is None  # within the second after the last look: not looked at yet
    clock.now += security.TOKEN_FILE_LOOK_SECONDS
    with caplog.at_level(logging.INFO, logger="attn.security"):
        assert interceptor.check(bearer("second")) == "invalid bearer token"
        assert interceptor.check(bearer("third")) is None and interceptor.check(bearer(TOKEN)) is None
    assert [r.getMessage() for r in caplog.records].count("auth_tokens_reloaded") == 1
    assert not any("third" in r.getMessage() or "third" in str(r.__dict__) for r in caplog.records)


@pytest.mark.parametrize(("text", "reason"), [("", "holds no tokens"), ("two words\n", "line 1"),
                                              (None, "cannot read auth_token_file")])
def test_a_token_file_that_does_not_load_leaves_the_tokens_before_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                     text: str | None, reason: str) -> None:
    """An emptied file must not lock every client out (nor a typo let anyone in); it is logged once, and the file
    written right later is taken."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n", encoding="ascii")
    clock = Clock()
    tokens = TokenFile(str(path), clock)
    if text is None:
        path.unlink()
    else:
        replace_file(path, text)
    with caplog.at_level(logging.INFO, logger="attn.security"):
        for _ in range(3):
            clock.now += security.TOKEN_FILE_LOOK_SECONDS
            assert tokens.digests() == (security._digest(TOKEN),)
        failures = [r for r in caplog.records if r.getMessage() == "auth_tokens_reload_failed"]
        assert len(failures) == 1 and reason in str(failures[0].__dict__)
        replace_file(path, "fixed\n")
        clock.now += security.TOKEN_FILE_LOOK_SECONDS
        assert tokens.digests() == (security._digest("fixed"),)
    assert [r.getMessage() for r in caplog.records].count("auth_tokens_reloaded") == 1


def test_the_token_file_is_read_only_when_its_stat_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n", encoding="ascii")
    clock = Clock()
    tokens = TokenFile(str(path), clock)
    reads: list[str] = []
    load = security.load_tokens
    monkeypatch.setattr(security, "load_tokens", lambda p: reads.append(p) or load(p))
    for _ in range(50):
        clock.now += security.TOKEN_FILE_LOOK_SECONDS
        tokens.digests()
    assert reads == []


def test_interceptor_needs_a_token() -> None:
    with pytest.raises(ValueError):
        TokenAuthInterceptor([], Metrics(CollectorRegistry()))


def test_only_health_and_reflection_are_open() -> None:
    assert OPEN_SERVICES == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"}


# -- settings ----------------------------------------------------------------------------------------------------------


def test_security_is_off_by_default() -> None:
    s = Settings.from_sources([], environ={})
    assert (s.tls_cert, s.tls_key, s.tls_client_ca, s.auth_token_file) == ("", "", "", "")
    assert server_credentials(s) is None


def test_security_settings_from_flags_and_environment() -> None:
    env = {"ATTN_TLS_CERT": "/tls/server.pem", "ATTN_TLS_KEY": "/tls/server.key", "ATTN_AUTH_TOKEN_FILE": "/t"}
    s = Settings.from_sources(["--tls-client-ca", "/tls/ca.pem"], environ=env)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca, s.auth_token_file) == (
        "/tls/server.pem", "/tls/server.key", "/tls/ca.pem", "/t")


@pytest.mark.parametrize(("argv", "message"), [
    (["--tls-cert", "c.pem"], "tls_cert and tls_key go together"),
    (["--tls-key", "k.pem"], "tls_cert and tls_key go together"),
    (["--tls-client-ca", "ca.pem"], "tls_client_ca (mutual TLS) needs tls_cert and tls_key"),
])
def test_incomplete_tls_settings_exit_with_a_message(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Settings.from_sources(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="tls_"):
        replace(Settings(), **{a.lstrip("-").replace("-", "_"): v for a, v in zip(argv[::2], argv[1::2])})


def test_unreadable_or_non_pem_tls_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(StartupError, match=f"cannot read tls_cert {tmp_path / 'missing.pem'}"):
        server_credentials(Settings(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(junk)))
    with pytest.raises(StartupError, match="are not a usable pair"):
        server_credentials(Settings(tls_cert=str(junk), tls_key=str(junk)))


# -- certificates replaced while the server runs ----------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "server.pem", tmp_path / "server.key"


def _watch(files: tuple[Path, Path], pair: ServerPair) -> CertificateWatch:
    pair.install(*files)
    return CertificateWatch(Settings(tls_cert=str(files[0]), tls_key=str(files[1])))


def _said(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == name]  # type: ignore[attr-defined]


def _serial(pair: ServerPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert).serial_number


def test_replaced_files_are_taken_at_the_next_handshake(files: tuple[Path, Path],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """gRPC calls the watch at every new handshake: a configuration when the files changed, ``None`` otherwise."""
    first, renewed = server_pair("server-a"), server_pair("server-b")
    watch = _watch(files, first)
    with caplog.at_level(logging.INFO, logger="attn.security"):
        assert watch() is None  # gRPC's first call, at the first handshake
        renewed.install(*files)
        assert isinstance(watch(), grpc.ServerCertificateConfiguration)
        assert watch() is None
    [reloaded] = _said(caplog, "tls_reloaded")
    assert int(reloaded["serial"], 16) == _serial(renewed) and reloaded["cert"] == str(files[0])


def test_the_files_are_read_only_when_their_stat_changes(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    watch = _watch(files, server_pair("server-a"))
    loads: list[Settings] = []
    real_load = security.load_tls_files

    def counted(settings: Settings) -> security.TlsFiles:
        loads.append(settings)
        return real_load(settings)

    monkeypatch.setattr(security, "load_tls_files", counted)
    with caplog.at_level(logging.INFO, logger="attn.security"):
        for _ in range(100):
            assert watch() is None
        assert loads == []
        later = time.time() + 5
        os.utime(files[0], (later, later))  # touched, same contents: read once, nothing new to serve
        assert watch() is None and watch() is None
    assert len(loads) == 1 and not _said(caplog, "tls_reloaded")


def _half_written(files: tuple[Path, Path], pair: ServerPair) -> None:
    files[0].write_bytes(pair.cert[: len(pair.cert) // 2])


def _certificate_only(files: tuple[Path, Path], pair: ServerPair) -> None:
    files[0].write_bytes(pair.cert)  # its key not written yet: the old key does not match it


def _expired(files: tuple[Path, Path], pair: ServerPair) -> None:
    server_pair("server-old", valid_for=-datetime.timedelta(days=1)).install(*files)


def _removed(files: tuple[Path, Path], pair: ServerPair) -> None:
    files[0].unlink()


@pytest.mark.parametrize(("breakage", "reason"), [
    (_half_written, "are not a usable pair"),
    (_certificate_only, "are not a usable pair"),
    (_expired, "expired on"),
    (_removed, "cannot read tls_cert"),
])
def test_a_broken_replacement_keeps_the_working_pair_and_is_logged_once(
        files: tuple[Path, Path], caplog: pytest.LogCaptureFixture,
        breakage: Callable[[tuple[Path, Path], ServerPair], None], reason: str) -> None:
    first, renewed = server_pair("server-a"), server_pair("server-b")
    watch = _watch(files, first)
    with caplog.at_level(logging.INFO, logger="attn.security"):
        breakage(files, renewed)
        for _ in range(5):  # handshakes go on with the working pair; the broken files are judged once
            assert watch() is None
        [failed] = _said(caplog, "tls_reload_failed")
        assert reason in failed["error"] and int(failed["serving_serial"], 16) == _serial(first)
        assert not _said(caplog, "tls_reloaded")
        renewed.install(*files)  # a later write fixes them
        assert watch() is not None and watch() is None
    [reloaded] = _said(caplog, "tls_reloaded")
    assert int(reloaded["serial"], 16) == _serial(renewed) and len(_said(caplog, "tls_reload_failed")) == 1


def test_the_watch_never_raises_into_grpc(files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    watch = _watch(files, server_pair("server-a"))

    def surprise(settings: Settings) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(security, "load_tls_files", surprise)
    server_pair("server-b").install(*files)
    with caplog.at_level(logging.INFO, logger="attn.security"):
        assert [watch() for _ in range(3)] == [None] * 3
    [failed] = _said(caplog, "tls_reload_failed")
    assert failed["error"] == "surprise"


def test_the_client_ca_is_watched_too(files: tuple[Path, Path], tmp_path: Path) -> None:
    pair = server_pair("server-a")
    pair.install(*files)
    ca = tmp_path / "clients.pem"
    ca.write_bytes(server_pair("client-ca-1").ca)
    watch = CertificateWatch(Settings(tls_cert=str(files[0]), tls_key=str(files[1]), tls_client_ca=str(ca)))
    assert watch() is None
    ca.write_bytes(server_pair("client-ca-2").ca)
    assert watch() is not None


# -- the client's connection options -----------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="localhost:50051")
    connection.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_client_token_from_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"# for the batch job\n\n  {TOKEN}\nignored-second-token\n")
    config = connection.ChannelConfig.from_args(_args("--token-file", str(path)), environ={"ATTN_TOKEN": "env"})
    assert config.token == TOKEN and not config.uses_tls
    assert connection.ChannelConfig.from_args(_args(), environ={"ATTN_TOKEN": " env-token\n"}).token == "env-token"
    assert connection.ChannelConfig.from_args(_args(), environ={}).token is None
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        connection.read_token(str(path))


def test_client_tls_options() -> None:
    assert connection.ChannelConfig.from_args(_args("--tls"), environ={}).uses_tls
    config = connection.ChannelConfig.from_args(_args("--tls-ca", "ca.pem", "--tls-server-name", "attn"), environ={})
    assert config.uses_tls and (config.tls_ca, config.tls_server_name) == ("ca.pem", "attn")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        connection.ChannelConfig("localhost:1", tls_cert="me.pem")
    with pytest.raises(ValueError, match="visible ASCII"):
        connection.ChannelConfig("localhost:1", token="Bearer abc")


def test_client_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="attn: cannot read --tls-ca"):
        connection.from_args(_args("--tls-ca", str(tmp_path / "missing.pem")))
    with pytest.raises(SystemExit, match="attn: cannot read --token-file"):
        connection.from_args(_args("--token-file", str(tmp_path / "missing")))


@pytest.mark.parametrize(("target", "loopback"), [
    ("localhost:50051", True), ("127.0.0.1:50051", True), ("[::1]:50051", True), ("dns:///localhost:1", True),
    ("unix:/tmp/attn.sock", True), ("10.0.0.5:50051", False), ("attn.example.com:443", False),
])
def test_plaintext_token_warning_is_for_remote_targets(target: str, loopback: bool) -> None:
    assert connection._is_loopback(target) is loopback


def test_plaintext_token_to_a_remote_target_warns(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_TOKEN", TOKEN)
    connection.from_args(_args("--target", "10.0.0.5:50051")).close()
    assert "without TLS" in capsys.readouterr().err
    connection.from_args(_args("--target", "127.0.0.1:50051")).close()
    assert capsys.readouterr().err == ""
