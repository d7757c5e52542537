"""``attn-export CHECKPOINT --out models/NAME/VERSION``: translation or captioning, as the checkpoint says."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from exporter.caption_export import CaptionExportOptions, export_captioner
from exporter.export import ExportOptions, ParityError, export
from training import checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path,
                        help="a best.pt/last.pt checkpoint of `attn-train translation` or `attn-train caption`")
    parser.add_argument("--out", type=Path, required=True,
                        help="the model version folder to write, models/NAME/VERSION (the server's layout)")
    parser.add_argument("--name", help="model name (default: the parent folder of --out)")
    parser.add_argument("--parity-sentences", type=int, default=500,
                        help="held-out sentences (images) decoded by ONNX Runtime and PyTorch for the parity check; "
                        "nothing is written if they disagree (default: %(default)s)")
    parser.add_argument("--int8", action="store_true", help="also write a dynamically quantised int8 variant")
    parser.add_argument("--fp16", action="store_true",
                        help="also write an fp16 variant for GPUs (float32 inputs and outputs), parity-checked")
    parser.add_argument("--metrics", type=Path, help="evaluation JSON from `attn-train evaluate` for the card")
    parser.add_argument("--source-language", default="de",
                        help="translation: source language code recorded in the manifest and card "
                        "(default: %(default)s)")
    parser.add_argument("--target-language", default="en",
                        help="target (caption) language code recorded in the manifest and card (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    parser.add_argument("--overlays", type=Path, help="captioning: write two example attention overlays here (docs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    captioning = checkpoint.load(args.checkpoint, kind=None)["kind"] == "captioning"
    options = (CaptionExportOptions if captioning else ExportOptions)(
        name=args.name or args.out.parent.name,
        version=args.out.name,
        parity_sentences=args.parity_sentences,
        int8=args.int8,
        fp16=args.fp16,
        source_language=args.source_language,
        target_language=args.target_language,
        metrics_file=args.metrics,
        force=args.force,
        command=shlex.join(["attn-export", *(argv if argv is not None else sys.argv[1:])]),
    )
    if isinstance(options, CaptionExportOptions):
        options.overlays = args.overlays
    try:
        if captioning:
            manifest = export_captioner(args.checkpoint, args.out, options)
        else:
            manifest = export(args.checkpoint, args.out, options)
    except (ParityError, FileExistsError, ValueError) as exc:
        print(f"attn-export: {exc}", file=sys.stderr)
        return 1
    print(f"exported {manifest.name}/{manifest.version} to {args.out}: parity {manifest.parity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
