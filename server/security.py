"""Transport security: TLS or mutual TLS on the gRPC port, and bearer tokens for everything but health and reflection.

:func:`configure` turns the settings into what :class:`server.app.AttentionServer` needs: the server credentials
(``None`` for plaintext) and the interceptors. Problems with the files (unreadable, not PEM, key not matching the
certificate, certificate expired, no tokens) are :class:`~server.errors.StartupError` s that name the setting, never
a token. The TLS files are watched afterwards (:class:`CertificateWatch`): renewed ones serve the next new handshakes.

Token authentication is deny by default: every method needs ``authorization: Bearer <token>`` metadata unless its
service is in :data:`OPEN_SERVICES`, so a service added to the same port later is protected without being listed here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import StartupError
from server.logs import event
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("attn.security")

AUTHORIZATION_KEY = "authorization"
# Probes and tooling must work without a token: a Kubernetes probe or grpcurl has no secret to send.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP/2 header value carries unescaped

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def configure(settings: Settings, metrics: Metrics) -> tuple[grpc.ServerCredentials | None, list[Any]]:
    """(server credentials or ``None`` for plaintext, server interceptors), logged once for the operator."""
    credentials = server_credentials(settings)
    interceptors: list[Any] = []
    tokens = 0
    if settings.auth_token_file:
        token_file = TokenFile(settings.auth_token_file)
        tokens = len(token_file.digests())
        interceptors.append(TokenAuthInterceptor(token_file, metrics))
    event(log, "security", tls=credentials is not None, mutual_tls=bool(settings.tls_client_ca),
          auth_tokens=tokens)
    return credentials, interceptors


def check(settings: Settings) -> None:
    """Raises the :class:`~server.errors.StartupError` that :func:`configure` would, without building anything. The
    parent of front-end processes calls it before it starts any: a bad file then stops the server with one line that
    names it, instead of a line from every front-end, a last one that only says a front-end exited, and an engine that
    loaded the models for nothing."""
    server_credentials(settings)
    if settings.auth_token_file:
        load_tokens(settings.auth_token_file)


# -- TLS ---------------------------------------------------------------------------------------------------------------


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key``, requiring client certificates signed by ``tls_client_ca`` when
    that is set; ``None`` when TLS is off. The files are checked here, because gRPC itself would only fail at the first
    handshake, in a log line the operator may never see. They are watched from then on (:class:`CertificateWatch`):
    a handshake after they change uses the new ones."""
    if not settings.tls_cert:  # Settings checked that tls_key and tls_client_ca are empty then
        return None
    return CertificateWatch(settings).credentials()


@dataclass(frozen=True)
class TlsFiles:
    """The contents of the TLS files, checked to make a usable pair (and CA)."""

    cert: bytes
    key: bytes
    ca: bytes | None
    serial: str  # of the server's certificate, for the log: "" where Python cannot read it
    not_after: str

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)


def load_tls_files(settings: Settings) -> TlsFiles:
    """The TLS files named by ``settings``, or the :class:`~server.errors.StartupError` that says what is wrong."""
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise StartupError(f"tls_cert {settings.tls_cert} and tls_key {settings.tls_key} are not a usable pair "
                           f"(PEM certificate chain and the matching unencrypted PEM private key): {exc}") from exc
    dates = _check_not_expired(settings.tls_cert)
    ca: bytes | None = None
    if settings.tls_client_ca:
        ca = _read("tls_client_ca", settings.tls_client_ca)
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"tls_client_ca {settings.tls_client_ca} holds no usable PEM CA certificate: "
                               f"{exc}") from exc
    return TlsFiles(cert, key, ca, str(dates.get("serialNumber", "")), str(dates.get("notAfter", "")))


class WatchedFiles:
    """Files an operator replaces in place while the server runs (cert-manager rewrites a mounted Secret, certbot
    renews, an editor saves): :meth:`changed` says, once per change, that they were rewritten or replaced, from their
    ``stat`` (a Kubernetes Secret swaps a symlink: ``stat`` follows it), so that they are read only then."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = tuple(paths)
        # Taken before the caller first reads them: a write meanwhile changes it, and the next look reads them again.
        self._seen: tuple[tuple[int, ...] | None, ...] | None = self._stamp()

    def changed(self) -> bool:
        """Whether the files changed since the last look that said so (each state of the files is judged once)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True

    def look_again(self) -> None:
        """The next :meth:`changed` says so: what was read was still being written."""
        self._seen = None

    def _stamp(self) -> tuple[tuple[int, ...] | None, ...]:
        stamps: list[tuple[int, ...] | None] = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)  # removed while being replaced: loading it says so
                continue
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)


class CertificateWatch:
    """The TLS files as gRPC's certificate fetcher: gRPC calls it at every new handshake, in its own threads, and
    existing connections keep the certificate they started with.

    Each call reads the files only when they changed (:class:`WatchedFiles`). Files that do not load
    (half written, a key that does not match the certificate, an expired certificate) leave the previous credentials
    in use, and are logged once per change of the files, not at every handshake; a later write that fixes them is
    taken and logged too. Nothing is ever raised into gRPC.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._watched = WatchedFiles([p for p in (settings.tls_cert, settings.tls_key, settings.tls_client_ca) if p])
        self._lock = threading.Lock()  # handshakes run in parallel; one of them reads changed files
        self._files = load_tls_files(settings)  # at start, a StartupError stops the server

    def credentials(self) -> grpc.ServerCredentials:
        # Whether clients must present a certificate is fixed for the port: tls_client_ca's contents may change, not
        # whether it is set.
        # The stubs say the fetcher returns a configuration; gRPC documents None for "unchanged".
        return grpc.dynamic_ssl_server_credentials(self._files.configuration(), self,  # type: ignore[arg-type]
                                                   require_client_authentication=self._files.ca is not None)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and load, else ``None``: gRPC keeps what it has."""
        try:
            with self._lock:
                return self._reload_if_changed()
        except Exception as exc:  # raised into gRPC it would only be logged there, at every handshake
            event(log, "tls_reload_failed", level=logging.ERROR, exc_info=True, error=str(exc),
                  serving_serial=self._files.serial, serving_not_after=self._files.not_after)
            return None

    def _reload_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        if not self._watched.changed():  # this state of the files is judged (and logged) once, whatever comes of it
            return None
        try:
            files = load_tls_files(self._settings)
        except StartupError as exc:
            event(log, "tls_reload_failed", level=logging.WARNING, error=str(exc),
                  serving_serial=self._files.serial, serving_not_after=self._files.not_after)
            return None
        if files == self._files:  # touched, or written again with the same contents
            return None
        if not self._unchanged_since(files):  # the files checked were not quite the bytes read: still being written
            self._watched.look_again()
            return None
        self._files = files
        event(log, "tls_reloaded", cert=self._settings.tls_cert, serial=files.serial, not_after=files.not_after,
              client_ca=bool(files.ca))
        return files.configuration()

    def _unchanged_since(self, files: TlsFiles) -> bool:
        """Whether the files still hold what was read: OpenSSL checked them by their paths, gRPC gets the bytes."""
        try:
            return (Path(self._settings.tls_cert).read_bytes() == files.cert
                    and Path(self._settings.tls_key).read_bytes() == files.key
                    and (files.ca is None or Path(self._settings.tls_client_ca).read_bytes() == files.ca))
        except OSError:
            return False


def _check_not_expired(cert: str) -> dict[str, Any]:
    """Neither OpenSSL's loading nor gRPC looks at the dates: an expired certificate would be served, and every client
    would refuse it at the handshake. Returns what Python read of the certificate (empty where it cannot)."""
    # Python reads a certificate's dates only through this helper of its own tests (the file's first certificate, the
    # server's own); without it the start goes on unchecked, as it did before.
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return {}
    try:
        decoded: dict[str, Any] = decode(cert)
        not_after = decoded["notAfter"]
        expires = ssl.cert_time_to_seconds(not_after)
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return {}  # load_cert_chain read it: a date Python cannot parse is no reason to refuse it
    if expires <= time.time():
        raise StartupError(f"tls_cert {cert} expired on {not_after}: every client would refuse it; renew it")
    return decoded


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {setting} {path}: {exc.strerror or exc}") from exc


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key; gRPC cannot use one anyway.
    raise ValueError("the private key is encrypted; give gRPC an unencrypted key (file readable by the server only)")


# -- bearer tokens -----------------------------------------------------------------------------------------------------


def parse_tokens(text: str, source: str = "auth_token_file") -> list[str]:
    """The tokens in a token file: one per line; blank lines and lines starting with ``#`` are skipped, surrounding
    whitespace is ignored. A line with inner whitespace or non-ASCII characters is an error (naming the line, not the
    token); so is a file without tokens, which would lock every client out."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _TOKEN.fullmatch(line):
            raise StartupError(f"{source} line {number}: a token is one word of visible ASCII characters "
                               "(no spaces, no 'Bearer ' prefix)")
        tokens.append(line)
    if not tokens:
        raise StartupError(f"{source} holds no tokens (one per line); leave auth_token_file empty to turn "
                           "authentication off")
    return tokens


def load_tokens(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise StartupError(f"auth_token_file {path} is not ASCII text") from exc
    except OSError as exc:
        raise StartupError(f"cannot read auth_token_file {path}: {exc.strerror or exc}") from exc
    return parse_tokens(text, f"auth_token_file {path}")


TOKEN_FILE_LOOK_SECONDS = 1.0  # a revoked token is refused within this much of its line's removal


class TokenFile:
    """The digests of the tokens in ``auth_token_file``, read again when the file changes, so that a token is added or
    revoked (a leaked one) without a restart. The file (:class:`WatchedFiles`) is looked at no more than once every
    :data:`TOKEN_FILE_LOOK_SECONDS` (on the event loop's thread, where calls are checked). A replacement that does
    not load (no tokens, a malformed line, unreadable) leaves the tokens before it in force: an empty file must not
    lock every client out, nor a typo let anyone in. It is logged once per change of the file, as is one that loads."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._path, self._clock = path, clock
        self._watched = WatchedFiles([path])
        self._digests = _digests(load_tokens(path))  # at start, a StartupError stops the server
        self._looked = clock()

    def digests(self) -> tuple[bytes, ...]:
        now = self._clock()
        if now - self._looked >= TOKEN_FILE_LOOK_SECONDS:
            self._looked = now
            self._reload_if_changed()
        return self._digests

    def _reload_if_changed(self) -> None:
        if not self._watched.changed():
            return
        try:
            digests = _digests(load_tokens(self._path))
        except StartupError as exc:  # the message names the file and the line, never a token
            event(log, "auth_tokens_reload_failed", level=logging.WARNING, error=str(exc),
                  serving_tokens=len(self._digests))
            return
        if digests != self._digests:
            self._digests = digests
            event(log, "auth_tokens_reloaded", path=self._path, tokens=len(digests))


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a known bearer token with ``UNAUTHENTICATED``, before the request is even parsed.

    Tokens are kept and compared as SHA-256 digests with :func:`hmac.compare_digest`, against every known token, so
    the time taken says nothing about a token's length, its prefix, or which token matched. ``tokens``: fixed, or a
    :class:`TokenFile` whose changes count from the next call.
    """

    def __init__(self, tokens: Iterable[str] | TokenFile, metrics: Metrics,
                 open_services: Iterable[str] = OPEN_SERVICES) -> None:
        self._file = tokens if isinstance(tokens, TokenFile) else None
        self._digests = tokens.digests() if isinstance(tokens, TokenFile) else _digests(tokens)
        if not self._digests:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._metrics = metrics
        self._open = frozenset(open_services)

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        service = method.lstrip("/").rpartition("/")[0]
        if service in self._open:
            return await continuation(handler_call_details)
        problem = self.check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return await continuation(handler_call_details)
        # The real handler only tells the denial its label: an unknown method is refused too, so that callers
        # without a token cannot map which methods exist.
        handler = await continuation(handler_call_details)
        rpc = method.rpartition("/")[2] if handler is not None else "unknown"  # bounded label values
        return _denial(problem, rpc, self._metrics)

    def check(self, metadata: Sequence[Any]) -> str | None:
        """``None`` when the metadata carries a known bearer token, else the reason, fit for the client."""
        values = [value for key, value in metadata if key == AUTHORIZATION_KEY]
        if not values:
            return "missing credentials: send the metadata 'authorization: Bearer <token>'"
        value = values[0]
        if not isinstance(value, str):
            return "malformed authorization metadata: expected 'Bearer <token>'"
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed authorization metadata: expected 'Bearer <token>'"
        presented = _digest(token.strip())
        known = False
        digests = self._digests if self._file is None else self._file.digests()
        for digest in digests:  # no early exit: all tokens are compared every time
            known |= hmac.compare_digest(presented, digest)
        return None if known else "invalid bearer token"


def _digests(tokens: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(_digest(t) for t in tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _denial(message: str, rpc: str, metrics: Metrics) -> grpc.RpcMethodHandler:
    async def deny(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        # Answered, by its final code, like the servicer's own refusals; no model was looked up.
        metrics.observe(rpc, "", "", grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
        metrics.refusals.labels(rpc, "unauthenticated").inc()
        event(log, "unauthenticated", level=logging.WARNING, rpc=rpc, peer=context.peer(), reason=message)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Streaming requests whatever the method's shape (the wire is the same): gRPC runs such a handler once the call's
    # headers are in, and the request is never read. A unary handler runs only once the whole request message has
    # arrived, so a caller without a token that sent the headers and no message held the call open, and with it
    # every drain for the whole grace.
    return grpc.stream_stream_rpc_method_handler(deny)
