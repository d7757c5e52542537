"""``attn``: translate with alignments, caption images with their attention maps, or list the served models.

    attn translate "Ich hoffe, es geht dir gut." [--beam 4] [--nbest 2] [--json] [--heatmap out.png]
    attn caption image.png [--beam 3] [--json] [--overlay out.png]
    attn batch inputs.jsonl -o out.jsonl [--batch-size 16] [--concurrency 8] [--shard I/N]   (resumable)
    attn models
    attn health      (exit status 0 when the server reports SERVING: for container health checks)
"""

from __future__ import annotations

from client import grpc_logs  # noqa: F401  (before grpc is imported: its C core logs nothing to stderr)

# isort: split
import argparse
import codecs
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client import batch, caption, connection, render
from client.options import ArgumentParser, add_decoding_arguments, decoding_options, seconds, text, usage_error

DETAILS = {"full": pb.ATTENTION_DETAIL_FULL, "words": pb.ATTENTION_DETAIL_WORDS, "none": pb.ATTENTION_DETAIL_NONE}
MAX_MESSAGE_BYTES = 256 * 2**20
DEFAULT_TARGET = "localhost:50051"


def parser() -> argparse.ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument("--target", help=f"server host:port [ATTN_TARGET, default {DEFAULT_TARGET}]")
    common.add_argument("--timeout", type=seconds, default=60.0, help="deadline in seconds (default 60)")
    connection.add_arguments(common)  # --tls, --tls-ca, --tls-cert/--tls-key, --tls-server-name, --token-file
    # Not for ``attn batch``, which writes JSONL whatever it is told: there --json would be accepted and do nothing.
    printing = ArgumentParser(add_help=False, parents=[common])
    printing.add_argument("--json", action="store_true", help="print the response as JSON")
    top = ArgumentParser(prog="attn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    t = commands.add_parser("translate", parents=[printing], help="translate texts and show the alignment")
    t.add_argument("texts", nargs="+", type=text, help="texts to translate (one batch)")
    add_decoding_arguments(t, DETAILS, "full", "attention detail (default full)")
    t.add_argument("--heatmap", type=Path, help="write the best hypothesis's attention matrix to this PNG")
    caption.add_parser(commands, printing, DETAILS)
    batch.add_parser(commands, common, DETAILS)
    commands.add_parser("models", parents=[printing], help="list the served models")
    commands.add_parser("health", parents=[printing], help="exit 0 if the server is SERVING, 1 otherwise")
    return top


def _target(given: str | None) -> str:
    """``--target``, else ``$ATTN_TARGET``, else :data:`DEFAULT_TARGET`. A target gRPC cannot use is a usage error
    (exit status 2) that names where it came from, before gRPC fails on it late or wraps its port around."""
    source, target = ("--target", given) if given is not None else ("ATTN_TARGET", os.environ.get("ATTN_TARGET"))
    if target is None:
        return DEFAULT_TARGET
    problem = connection.target_problem(target)
    if problem:
        usage_error(f"{source} {target!r}: {problem}")
    return target


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """The channel for ``--target`` and the connection options (TLS, token): see :mod:`client.connection`."""
    return connection.from_args(args)


def translate(args: argparse.Namespace, stub: pb_grpc.AttentionServiceStub) -> int:
    if args.heatmap and args.attention != "full":
        usage_error("--heatmap needs --attention full")
    options = decoding_options(args, DETAILS)
    request = pb.TranslateRequest(model=args.model, version=args.version, texts=args.texts, options=options)
    response = stub.Translate(request, timeout=args.timeout)
    if args.json:
        print(render.as_json(response))
    else:
        print(render.translation(response, args.texts))
    if args.heatmap:
        from client import heatmap

        # A folder ("." or "/", which have no name to number, or one that has) is tried as it is, to be refused as
        # one text's is, not numbered into files beside it: --heatmap names a picture, not where to put pictures.
        numbered = len(response.translations) > 1 and args.heatmap.name and not args.heatmap.is_dir()
        for i, result in enumerate(response.translations):
            path = args.heatmap.with_stem(f"{args.heatmap.stem}-{i + 1}") if numbered else args.heatmap
            heatmap.draw(result, result.hypotheses[0], path)
            print(f"heatmap written to {path}", file=sys.stderr)
    return 0


def models(args: argparse.Namespace, stub: pb_grpc.AttentionServiceStub) -> int:
    response = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout)
    if args.json:
        print(render.as_json(response))
    else:
        print(render.models(response))
    return 0


def health(args: argparse.Namespace, channel: grpc.Channel) -> int:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the typeshed stub lacks the methods
    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


# What a shell reports for a program that SIGPIPE ended, which is how `cat` or `grep` leave such a pipeline.
EXIT_BROKEN_PIPE = 128 + 13
EXIT_INTERRUPTED = 128 + 2  # and for one that Ctrl-C (SIGINT) ended, as `attn batch` reports it


def _stop_writing_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's flush at exit does not hit the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


ESCAPE = "attn.escape"


def _escape(error: UnicodeError) -> tuple[str, int]:
    """A codec error handler: each character the stream's encoding has no bytes for as JSON writes it, ``\\uXXXX``
    (a surrogate pair above U+FFFF), so that ``--json`` stays JSON and the readable view readable."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    escaped: list[str] = []
    for char in error.object[error.start : error.end]:
        code = ord(char)
        units = [code] if code <= 0xFFFF else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + (code & 0x3FF)]
        escaped.extend(f"\\u{unit:04x}" for unit in units)
    return "".join(escaped), error.end


def _escape_what_the_streams_cannot_encode() -> None:
    """stdout (and stderr) whose encoding cannot write every character, ASCII (PYTHONIOENCODING=ascii, a C locale
    without Python's UTF-8 mode) or Latin-1, and which raise on one they cannot (errors "strict" or
    "surrogateescape"): such a character, "←" in an alignment, "→" in a models row, ended the command in a
    UnicodeEncodeError traceback, half printed. It is written as an escape instead."""
    codecs.register_error(ESCAPE, _escape)
    for stream in (sys.stdout, sys.stderr):
        if (isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape")
                and not codecs.lookup(stream.encoding).name.startswith("utf")):
            stream.reconfigure(errors=ESCAPE)


def main(argv: Sequence[str] | None = None) -> int:
    _escape_what_the_streams_cannot_encode()
    # `attn models --json | head` closes the pipe before the answer is printed: the reader has what it wanted, so
    # that ends the command quietly rather than with a traceback.
    try:
        status = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        _stop_writing_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C while the call waits on a server that does not answer: no traceback
        print("attn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    args.target = _target(args.target)
    with _channel(args) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        try:
            if args.command == "health":
                return health(args, channel)
            if args.command == "caption":
                return caption.caption(args, stub, DETAILS)
            if args.command == "batch":
                return batch.run(args, channel, DETAILS)
            return translate(args, stub) if args.command == "translate" else models(args, stub)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
            print(f"attn: {code.name}: {details}", file=sys.stderr)
            hint = connection.handshake_hint(args, code, details)
            if hint:
                print(f"attn: {hint}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
