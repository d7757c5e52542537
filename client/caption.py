"""``attn caption IMAGE [--overlay out.png]``: the caption, where each word looked, and the paper-style overlay.

    attn caption photo.png                       caption and, per word, the image region of its attention peak
    attn caption photo.png --overlay out.png     plus one panel per word with its attention map over the image
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client import render
from client.options import add_decoding_arguments, decoding_options, usage_error
from client.picture_files import writing

if TYPE_CHECKING:
    from PIL import Image


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser,
               details: dict[str, Any]) -> None:
    c = commands.add_parser("caption", parents=[common], help="caption an image and show where each word looked")
    c.add_argument("image", type=Path, help="PNG, JPEG, WebP, BMP or GIF (first frame) file")
    add_decoding_arguments(c, details, "full", "attention detail (default full)", heads=False,
                           model_help="captioning model name (default: the server's first captioner)")
    c.add_argument("--overlay", type=Path, help="write one panel per word with its attention over the image")


def text(response: pb.CaptionResponse) -> str:
    size, grid = response.image_size, response.grid
    shown = render.shown
    lines = [f"{shown(response.model)}/{shown(response.version)}: image {size.width}×{size.height}, attention grid "
             f"{grid.height}×{grid.width}"]
    for rank, hyp in enumerate(response.hypotheses, 1):
        lines.append(f"{rank}. {shown(hyp.text)}   (score {hyp.score:.3f}{', truncated' if hyp.truncated else ''})")
        weights = render.matrix(hyp.attention) if hyp.attention.rows else None
        for i, (token, box) in enumerate(zip(hyp.tokens, hyp.peak_boxes)):
            word = "</s>" if token.special else shown(hyp.text[token.start : token.end].strip() or token.piece)
            share = f"  peak weight {weights[i].max():.2f}" if weights is not None else ""
            lines.append(f"   {word:<12} x {box.x0}–{box.x1}, y {box.y0}–{box.y1}{share}")
    return "\n".join(lines)


def picture(image_bytes: bytes, response: pb.CaptionResponse) -> Image.Image:
    """The picture the server captioned, made as the server makes it (:func:`server.imaging.decode`): the first
    frame, EXIF orientation applied (the orientation its boxes refer to), 16-bit greys scaled to 8 bits and
    transparency over white. A plain ``convert("RGB")`` clips a 16-bit grey to white and drops transparency to
    whatever colour the clear pixels hold."""
    from server.imaging import ImageLimits, decode

    size = response.image_size  # the server accepted these bytes: its limits, not the defaults, were the ones to pass
    return decode(image_bytes, ImageLimits(len(image_bytes), max(1, size.width * size.height))).image


def draw(image_bytes: bytes, response: pb.CaptionResponse, path: Path) -> None:
    """The best caption's words, each over its attention map (Xu et al. 2015, Figures 2-3)."""
    from server.artifacts.attention_maps import overlay

    hyp = response.hypotheses[0]
    words = ["</s>" if t.special else hyp.text[t.start : t.end].strip() or t.piece for t in hyp.tokens]
    grid = (response.grid.height, response.grid.width)
    panel = max(96, min(256, 1024 // max(1, min(len(words) + 1, 5))))
    weights = render.matrix(hyp.attention)
    sheet = overlay(picture(image_bytes, response), words, weights, grid, columns=5, panel=panel)
    with writing(path) as picture_format:
        sheet.save(path, format=picture_format)


def caption(args: argparse.Namespace, stub: pb_grpc.AttentionServiceStub, details: dict[str, Any]) -> int:
    if args.overlay and args.attention != "full":
        usage_error("--overlay needs --attention full")
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        raise SystemExit(f"attn: cannot read {args.image}: {exc.strerror}") from exc
    options = decoding_options(args, details)
    request = pb.CaptionRequest(model=args.model, version=args.version, image=data, options=options)
    response = stub.Caption(request, timeout=args.timeout)
    if args.json:
        print(render.as_json(response))
    else:
        print(text(response))
    if args.overlay:
        draw(data, response, args.overlay)
        print(f"overlay written to {args.overlay}", file=sys.stderr)
    return 0
