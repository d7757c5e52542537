"""Decoding options from the command line, shared by ``attn translate`` and ``attn batch``."""

from __future__ import annotations

import argparse
from typing import Any

from attention.v1 import attention_pb2 as pb


def decoding_options(args: argparse.Namespace, details: dict[str, Any]) -> pb.DecodingOptions:
    """``--beam --nbest --max-output-tokens --length-penalty --attention --attention-layer --attention-head``."""
    options = pb.DecodingOptions(beam_size=args.beam, nbest=args.nbest, max_output_tokens=args.max_output_tokens,
                                 attention=details[args.attention])
    if args.length_penalty is not None:
        options.length_penalty = args.length_penalty
    if args.attention_layer is not None:
        options.attention_layer = args.attention_layer
    if args.attention_head is not None:
        options.attention_head = args.attention_head
    return options
