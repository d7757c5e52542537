"""Channels to the server: plaintext or TLS (optionally with a client certificate: mutual TLS), with an optional bearer
token. The ``attn`` commands share these options through :func:`add_arguments` and :func:`from_args`.

    attn models --target host:50051 --tls-ca ca.pem                              TLS, server checked against ca.pem
    attn models --target 10.0.0.5:50051 --tls-ca ca.pem --tls-server-name attn   ... when the address is not its name
    attn models --tls-ca ca.pem --tls-cert me.pem --tls-key me.key               mutual TLS
    ATTN_TOKEN=... attn models --tls                                             a token, TLS with the system's CAs

The token travels as ``authorization: Bearer <token>`` metadata: over TLS as gRPC call credentials; over plaintext
(allowed, for a loopback address or a TLS-terminating proxy next to the client) through an interceptor.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from client.options import usage_error

TOKEN_ENV = "ATTN_TOKEN"
MAX_MESSAGE_BYTES = 256 * 2**20  # attention matrices make large responses
# Once a server has asked a connection to move (its ATTN_MAX_CONNECTION_AGE), gRPC closes it as soon as the last
# answer is written to the socket, and a frame the client sends while it still reads that answer meets a closed
# socket, whose kernel resets the connection and drops the rest of the answer. gRPC's client sends two kinds of such
# frames on its own: the pings of its bandwidth-delay probe, which grows the flow-control window as data arrives, and
# window updates once half the window is read. So the probe is off and the window fixed, larger than any answer but
# the rarest. What the client still sends while it reads (window updates riding on its answer to the server's GOAWAY
# ping) makes losses fewer, not none: attn batch retries them (docs/serving-processes.md, "What the age costs").
# 64 MiB is also more than a 10 Gbit/s link with 50 ms of round trip needs to stay full.
ANSWER_WINDOW = 64 * 2**20
QUIET_WHILE_READING = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", ANSWER_WINDOW))
# gRPC gives channels to one target with the same options one shared connection (its global subchannel pool). A
# server with several front-end processes on one port (SO_REUSEPORT) hands each connection, not each call, to one of
# them: a client that wants more than one front-end's throughput needs connections of its own, one per channel made
# with this option (docs/serving-processes.md, "Connections and front-ends").
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
Options = Sequence[tuple[str, Any]]


# The schemes of gRPC's resolvers. gRPC reads a target with another scheme, or none, as a DNS name: host[:port].
SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p",
                     "google-c2p-experimental"})
MAX_PORT = 65535


class OptionsError(ValueError):
    """Options that do not go together: on the command line, a usage error (exit status 2), not a failed call."""


@dataclass(frozen=True)
class ChannelConfig:
    """Where the server is and how to talk to it; files are paths, read when a channel is made."""

    target: str
    tls: bool = False  # implied by any of the tls_* fields
    tls_ca: str | None = None  # PEM CA(s) that signed the server's certificate; None: the system's trusted CAs
    tls_cert: str | None = None  # PEM client certificate (mutual TLS), with tls_key
    tls_key: str | None = None
    tls_server_name: str | None = None  # the name to expect in the server's certificate instead of the target's host
    token: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise OptionsError("--tls-cert and --tls-key go together (a client certificate and its private key)")
        if self.token is not None:
            _check_token(self.token, "the token")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_server_name)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> ChannelConfig:
        """From the options of :func:`add_arguments`; the token from ``--token-file``, else ``$ATTN_TOKEN``."""
        environ = dict(os.environ) if environ is None else environ
        token = read_token(args.token_file) if args.token_file else environ.get(TOKEN_ENV) or None
        return cls(args.target, args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name,
                   token.strip() if token else None)

    def channel(self, options: Options = ()) -> grpc.Channel:
        """A blocking-API channel (the one ``attn`` uses)."""
        options = self._options(options)
        if self.uses_tls:
            return grpc.secure_channel(self.target, self._credentials(), options=options)
        channel = grpc.insecure_channel(self.target, options=options)
        return grpc.intercept_channel(channel, _BearerMetadata(self.token)) if self.token else channel

    def aio_channel(self, options: Options = ()) -> grpc.aio.Channel:
        """The same for asyncio code."""
        options = self._options(options)
        if self.uses_tls:
            return grpc.aio.secure_channel(self.target, self._credentials(), options=options)
        interceptors = _aio_bearer_interceptors(self.token) if self.token else None
        return grpc.aio.insecure_channel(self.target, options=options, interceptors=interceptors)

    def _options(self, extra: Options) -> list[tuple[str, Any]]:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *QUIET_WHILE_READING, *extra]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def _credentials(self) -> grpc.ChannelCredentials:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=_read(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        )
        if self.token:
            credentials = grpc.composite_channel_credentials(credentials,
                                                             grpc.access_token_call_credentials(self.token))
        return credentials


def channel(target: str, options: Options = (), **security: Any) -> grpc.Channel:
    """``channel("host:50051", tls_ca="ca.pem", token="...")``: see :class:`ChannelConfig` for the keywords."""
    return ChannelConfig(target, **security).channel(options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection options (``--target`` stays with the caller): TLS, mutual TLS and the bearer token."""
    group = parser.add_argument_group("connection security")
    group.add_argument("--tls", action="store_true", help="use TLS, checking the server against the system's CAs "
                       "(implied by the other --tls-* options)")
    group.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to check the server's certificate against")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    group.add_argument("--tls-server-name", metavar="NAME",
                       help="name expected in the server's certificate, when --target is an address or an alias")
    group.add_argument("--token-file", metavar="FILE", help=f"file holding the bearer token (first line that is not "
                       f"blank or a # comment); else the token comes from ${TOKEN_ENV}, if set")


def from_args(args: argparse.Namespace, options: Options = ()) -> grpc.Channel:
    """The channel the options of :func:`add_arguments` (and ``--target``) describe; exits with a message on options
    that do not go together (exit status 2, as argparse's own refusals), a bad token or an unreadable file (1)."""
    try:
        config = ChannelConfig.from_args(args)
        if config.token and not config.uses_tls and not _is_loopback(config.target):
            print(f"attn: warning: sending the bearer token without TLS to {config.target}", file=sys.stderr)
        return config.channel(options)
    except OptionsError as exc:
        usage_error(str(exc))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"attn: {exc}") from exc


def handshake_hint(args: argparse.Namespace, code: grpc.StatusCode, details: str) -> str | None:
    """What to add when the server closed the connection before any call: a TLS server does that to a plaintext
    client, and a mutual TLS server to a client without a certificate, and gRPC reports both as 'Socket closed'."""
    if code != grpc.StatusCode.UNAVAILABLE or not details.endswith("Socket closed"):
        return None
    if not ChannelConfig(args.target, args.tls, args.tls_ca, args.tls_cert, args.tls_key,
                         args.tls_server_name).uses_tls:
        return "if the server speaks TLS, add --tls-ca PEM (or --tls, for a certificate from a public CA)"
    if not args.tls_cert:
        return "if the server asks for a client certificate (mutual TLS), add --tls-cert PEM --tls-key PEM"
    return None


def target_problem(target: str) -> str | None:
    """What is wrong with ``target``, or None: the mistakes gRPC finds only when it resolves or connects (after its
    own log lines) or never (it wraps a port past 65535 around: 99999 is 34463). Only a DNS name's host and port are
    checked, as gRPC splits them; the targets of its other schemes are its to judge. A host without a port is taken:
    gRPC's port for it is 443."""
    if not target.strip():
        return "no server named"
    scheme, colon, rest = target.partition(":")
    if colon and scheme in SCHEMES:
        if scheme != "dns":
            return None if rest else f"no address after {scheme}:"
        if rest.startswith("//"):  # dns://[DNS server]/host:port
            _, slash, rest = rest[2:].partition("/")
            if not slash:
                return "dns:// is followed by the address of a DNS server, and no host: write dns:///HOST:PORT"
        return _host_port_problem(rest)
    if "://" in target:
        return f"gRPC knows no {scheme}://: write HOST:PORT"
    return _host_port_problem(target)


def _host_port_problem(name: str) -> str | None:
    if name.startswith("["):  # [IPv6 address]:port
        host, closed, after = name[1:].partition("]")
        if not closed or (after and not after.startswith(":")):
            return "neither host:port nor [IPv6 address]:port"
        port = after[1:] if after else None
    elif name.count(":") > 1:  # gRPC reads it as an IPv6 address without a port
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return "neither host:port nor an IPv6 address"
        host, port = name, None
    else:
        host, colon, port_text = name.partition(":")
        port = port_text if colon else None
    if not host:
        return "no host before the port"
    if port == "":
        return "no port after the ':'"
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= MAX_PORT):
        return f"the port must be a number from 1 to {MAX_PORT}"
    return None


def read_token(path: str) -> str:
    """The first line of ``path`` that is neither blank nor a ``#`` comment (a server's token file works as is)."""
    text = _read(path, "--token-file").decode("utf-8", errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return _check_token(line, f"the token in {path}")
    raise ValueError(f"--token-file {path} holds no token")


def _check_token(token: str, what: str) -> str:
    if not token or not all("\x21" <= c <= "\x7e" for c in token):
        raise ValueError(f"{what} must be one word of visible ASCII characters (no 'Bearer ' prefix)")
    return token


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {option} {path}: {exc.strerror or exc}") from exc


def _is_loopback(target: str) -> bool:
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("unix:"):
        return True
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a plaintext channel (gRPC's call credentials refuse plaintext)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        details = _CallDetails(d.method, d.timeout, _with_token(d.metadata, self._token), d.credentials,
                               getattr(d, "wait_for_ready", None), getattr(d, "compression", None))
        return details  # type: ignore[return-value]  # duck-typed like grpc's own examples

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _aio_bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*_with_token(d.metadata, token)),
                                          d.credentials, d.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                         request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                          request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
