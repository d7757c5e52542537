"""Decoding options on the command line, shared by ``attn translate``, ``attn batch`` and ``attn caption``."""

from __future__ import annotations

import argparse
from typing import Any

from attention_pb.v1 import attention_pb2 as pb


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
    parser.add_argument("--model", default="", help=model_help or "model name (default: the server's default)")
    parser.add_argument("--version", default="", help="model version (default: the highest)")
    parser.add_argument("--beam", type=int, default=0, help="beam size (default: the server's; 1 = greedy)")
    parser.add_argument("--nbest", type=int, default=0, help="hypotheses per input (default 1)")
    parser.add_argument("--max-output-tokens", type=int, default=0, help="token budget per output (default: model's)")
    parser.add_argument("--length-penalty", type=float, default=None, help="length penalty alpha (default 1.0)")
    if heads:
        parser.add_argument("--attention-layer", type=int, default=None,
                            help="multi-head models: the decoder layer whose cross-attention to show (0-based)")
        parser.add_argument("--attention-head", type=int, default=None,
                            help="multi-head models: the head to show (0-based), or -1 for the mean over heads")
    parser.add_argument("--attention", choices=details, default=attention_default, help=attention_help)
