"""``attn-export CHECKPOINT --out models/NAME/VERSION``: translation or captioning, as the checkpoint says."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from exporter.caption_export import CaptionExportOptions, export_captioner
from exporter.export import ExportOptions, ParityError, export
from exporter.template import check_replaceable, model_folder_names, read_metrics
from training import checkpoint


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def model_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str]:
    """NAME and VERSION of --out = models/NAME/VERSION; a usage error for an --out that cannot be a model version
    folder, or a --name the server would refuse (it serves a manifest only from the folders it names)."""
    try:
        name, version = model_folder_names(args.out)
    except ValueError as exc:
        parser.error(f"--out: {exc}")
    if args.name is not None and args.name != name:
        parser.error(f"--name {args.name!r} differs from the NAME folder of --out ({name!r}): the server serves a "
                     "model only under the name of its folder; leave --name out or change --out")
    return name, version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-export", description=__doc__)
    parser.add_argument("checkpoint", type=Path,
                        help="a best.pt/last.pt checkpoint of `attn-train translation` or `attn-train caption`")
    parser.add_argument("--out", type=Path, required=True,
                        help="the model version folder to write, models/NAME/VERSION (the server's layout)")
    parser.add_argument("--name", help="model name; must be NAME, the parent folder of --out (the default), which "
                        "is the name the server serves it under")
    parser.add_argument("--parity-sentences", type=positive_int, default=500,
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


def _failed(exc: Exception | str) -> int:
    print(f"attn-export: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name, version = model_folder(parser, args)
    try:
        return _export(args, name, version, argv)
    except (ParityError, FileExistsError, ValueError) as exc:
        return _failed(exc)
    except OSError as exc:  # a disk that fills, a folder that turns unwritable: the staging folder is gone
        return _failed(f"{args.out} was not written: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename
                                                                            else ""))
    except KeyboardInterrupt:  # the staging folder is gone (exporter/template.py) and the target untouched
        print(f"attn-export: interrupted; {args.out} was not written", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace, name: str, version: str, argv: list[str] | None) -> int:
    # Everything the arguments name is checked before the (minutes-long) export: the folder it may replace, the
    # metrics file for the card, the checkpoint (load names the file when it is missing, unreadable or not a
    # checkpoint of attn-train: a ValueError).
    check_replaceable(args.out, args.force)
    if args.metrics is not None:
        read_metrics(args.metrics)
    captioning = checkpoint.load(args.checkpoint, kind=None)["kind"] == "captioning"
    if args.overlays is not None and not captioning:  # refused, as --int8 for a captioner is, not silently skipped
        return _failed(f"--overlays draws a captioning model's attention; {args.checkpoint} is a translation "
                       "checkpoint (its model card shows its alignments)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = (CaptionExportOptions if captioning else ExportOptions)(
        name=name,
        version=version,
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
    if captioning:
        manifest = export_captioner(args.checkpoint, args.out, options)
    else:
        manifest = export(args.checkpoint, args.out, options)
    print(f"exported {manifest.name}/{manifest.version} to {args.out}: parity {manifest.parity}")
    for line in variant_bleu_lines(manifest.metrics):
        print(line)
    return 0


def variant_bleu_lines(metrics: dict[str, Any]) -> list[str]:
    """What each quantised or half-precision variant cost in BLEU on the parity sentences, as the manifest records
    it: the number that says whether to serve it, shown where the export ends rather than only in the card."""
    return [f"{variant} variant: BLEU {metrics[f'parity_bleu_{variant}']} vs fp32 {metrics['parity_bleu_fp32']} on "
            f"the parity sentences ({metrics[f'{variant}_bleu_delta']:+})"
            for variant in ("int8", "fp16") if f"{variant}_bleu_delta" in metrics]


if __name__ == "__main__":
    sys.exit(main())
