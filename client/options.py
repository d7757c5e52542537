"""Decoding options on the command line, shared by ``attn translate``, ``attn batch`` and ``attn caption``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from attention_pb.v1 import attention_pb2 as pb

# Any number float() reads, with a minus sign: -1, -.5, -1e3, -1_000.5, -inf, -Infinity, -nan.
NEGATIVE_NUMBER = re.compile(r"-(?:(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:e[-+]?\d+)?|inf(?:inity)?|nan)\Z",
                             re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, taking any negative number after an option for its value: ``--length-penalty -inf``.
    argparse reads an argument that starts with "-" as an option unless its negative-number pattern matches it, and
    that pattern leaves out -inf and -nan, and before Python 3.14 -1e3 too (-1 and -.5 it has always matched): such a
    value ended in "argument --length-penalty: expected one argument", and only ``--length-penalty=-inf`` worked.
    The pattern is argparse's attribute ``_negative_number_matcher`` (every Python 3 has it; no parser of ``attn``
    has an option that looks like a negative number, which would turn the matching off); subparsers are made of
    this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``, the range of the request field it goes into (protobuf
    refuses any other with a ValueError, which would end the command in a traceback)."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    parse.__name__ = "integer"  # what argparse's message calls a value that is no integer
    return parse


UINT32, INT32 = _bounded(0, 2**32 - 1), _bounded(-(2**31), 2**31 - 1)


MAX_SECONDS = 10**9  # about 31 years; gRPC's deadline (nanoseconds in 64 bits) overflows past about 7e9 from now


def seconds(text: str) -> float:
    """An argparse type: ``--timeout``, a deadline a call can meet. gRPC takes 0, a negative number, NaN, infinity
    and any number past its range as a deadline already passed, and answers DEADLINE_EXCEEDED as if the server had
    been too slow."""
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0 and at most {MAX_SECONDS}")
    return value


def usage_error(message: str) -> NoReturn:
    """Ends the command as argparse ends one whose options it refuses (exit status 2), for the refusals it cannot
    make itself: options that do not go together."""
    print(f"attn: {message}", file=sys.stderr)
    raise SystemExit(2)


def text(value: str) -> str:
    """An argparse type: an argument sent as a request's text. An argument its locale cannot decode reaches Python
    with those bytes escaped (PEP 383), which no protobuf string holds: its bytes are read as UTF-8 (what a C locale
    without Python's UTF-8 mode passes on as ASCII), and refused if they are not UTF-8 either."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raw = os.fsencode(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not UTF-8 text") from None
    return value


def decoding_options(args: argparse.Namespace, details: dict[str, Any]) -> pb.DecodingOptions:
    """``--beam --nbest --max-output-tokens --length-penalty --attention --attention-layer --attention-head``."""
    options = pb.DecodingOptions(beam_size=args.beam, nbest=args.nbest, max_output_tokens=args.max_output_tokens,
                                 attention=details[args.attention])
    if args.length_penalty is not None:
        options.length_penalty = args.length_penalty
    if getattr(args, "attention_layer", None) is not None:  # translation only
        options.attention_layer = args.attention_layer
    if getattr(args, "attention_head", None) is not None:
        options.attention_head = args.attention_head
    return options


def add_decoding_arguments(parser: argparse.ArgumentParser, details: dict[str, Any], attention_default: str,
                           attention_help: str, heads: bool = True, model_help: str = "") -> None:
    """``--model --version --beam --nbest --max-output-tokens --length-penalty --attention`` and, for translation,
    ``--attention-layer --attention-head``."""
    parser.add_argument("--model", type=text, default="",
                        help=model_help or "model name (default: the server's default)")
    parser.add_argument("--version", type=text, default="", help="model version (default: the highest)")
    parser.add_argument("--beam", type=UINT32, default=0, help="beam size (default: the server's; 1 = greedy)")
    parser.add_argument("--nbest", type=UINT32, default=0, help="hypotheses per input (default 1)")
    parser.add_argument("--max-output-tokens", type=UINT32, default=0,
                        help="token budget per output (default: model's)")
    parser.add_argument("--length-penalty", type=float, default=None, help="length penalty alpha (default 1.0)")
    if heads:
        parser.add_argument("--attention-layer", type=UINT32, default=None,
                            help="multi-head models: the decoder layer whose cross-attention to show (0-based)")
        parser.add_argument("--attention-head", type=INT32, default=None,
                            help="multi-head models: the head to show (0-based), or -1 for the mean over heads")
    parser.add_argument("--attention", choices=details, default=attention_default, help=attention_help)
