"""``attn-train``: train a model, or evaluate a checkpoint on a split."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from training import checkpoint
from training.caption_train import CaptionTrainConfig
from training.config import InputError
from training.loop import is_first_process
from training.recipe import RunInterrupted
from training.train import TrainConfig, model_config


def _add_config_flags(parser: argparse.ArgumentParser, config: type = TrainConfig) -> None:
    """One flag per config field, its help and choices from the field's metadata (training/config.py), so the
    dataclass stays the single description of a run.

    Every flag's argparse default is None and its help names the field's default: None then means "not on the
    command line", which a resumed run needs to know (``--lr 0.001`` replaces a saved 0.5 even though 0.001 is the
    default)."""
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"].replace("%", "%%") + f" (default: {str(f.default).replace('%', '%%')})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=help)


def _given_fields(config: type, args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, with their values."""
    names = {f.name for f in dataclasses.fields(config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _config(parser: argparse.ArgumentParser, config: type, args: argparse.Namespace) -> Any:
    """The run's config from the parsed flags; a value the config refuses is a usage error, not a traceback."""
    try:
        cfg = config(**_given_fields(config, args))
        if isinstance(cfg, TrainConfig):
            _check_model(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def _check_model(cfg: TrainConfig) -> None:
    """Build the network on the meta device (no memory, no time): shapes that do not fit (heads that do not divide
    --emb-dim, an odd --hidden-dim for Luong attention, --align-layer out of range) fail now, not after the corpus
    and the tokenizer."""
    with torch.device("meta"):
        checkpoint.new_model(cfg.arch, dataclasses.asdict(model_config(cfg, cfg.vocab_size)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("translation", help="train an attention encoder-decoder on a parallel corpus",
                        description="Train an attention encoder-decoder on a parallel corpus.")
    _add_config_flags(tr)
    tr.add_argument("--resume", type=Path, help="continue from a last.pt/best.pt checkpoint (its config is kept; "
                    "--epochs and --max-* budgets given here extend it, and --out, --lr, --cooldown-steps, --repeat, "
                    "--valid-every, --device and --threads given here replace it)")
    tr.set_defaults(config=TrainConfig, subparser=tr)
    cap = sub.add_parser("caption", help="train a Show-Attend-Tell image captioner (scenes, Flickr8k or COCO layout)",
                         description="Train a Show-Attend-Tell image captioner (scenes, Flickr8k or COCO layout).")
    _add_config_flags(cap, CaptionTrainConfig)
    cap.add_argument("--resume", type=Path, help="continue from a last.pt/best.pt checkpoint (its config is kept; "
                     "--epochs and --max-* budgets given here extend it, and --out, --lr, --valid-every, --device and "
                     "--threads given here replace it)")
    cap.set_defaults(config=CaptionTrainConfig, subparser=cap)
    ev = sub.add_parser("evaluate", help="BLEU and chrF of a translation checkpoint on a split, overall and by "
                        "length; BLEU-1..4 and attention correctness of a captioning checkpoint")
    ev.add_argument("checkpoint", type=Path, help="a best.pt/last.pt checkpoint (translation or captioning)")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"],
                    help="the split to evaluate on (default: %(default)s)")
    ev.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    ev.add_argument("--out", type=Path, help="write the results as JSON here")
    ev.add_argument("--limit", type=_count, default=0, help="evaluate only the first N pairs (images); 0 = all "
                    "(default: %(default)s)")
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config(args.subparser, args.config, args) if args.command in ("translation", "caption") else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return _run(args, cfg)
    except InputError as exc:  # a mistake in the data, a checkpoint or the machine: its one line, no traceback
        print(f"attn-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C ends a run on purpose: say where it can go on, not torch's stack
        print(f"attn-train: interrupted{_resumes(exc)}", file=sys.stderr)
        return 130


def _resumes(exc: KeyboardInterrupt) -> str:
    """What resumes an interrupted run, as the run knows it (training.recipe.RunInterrupted): the last.pt it wrote,
    or the checkpoint it was resumed from while it has written none, or nothing."""
    if not isinstance(exc, RunInterrupted):  # evaluate, or a Ctrl-C before the run began
        return ""
    if exc.written:
        return f"; {exc.resume_from} (written at every validation) resumes it with --resume"
    if exc.resume_from is not None:
        return (f" before its first validation wrote a checkpoint; {exc.resume_from} still resumes it with "
                "--resume")
    return (f" before its first validation (every --valid-every {exc.valid_every} steps) wrote a checkpoint; "
            "there is nothing to resume")


def _run(args: argparse.Namespace, cfg: Any) -> int:
    if args.command in ("translation", "caption"):
        from training.caption_train import train as train_captioner
        from training.train import train as train_translator

        train = train_translator if args.command == "translation" else train_captioner
        best = train(cfg, args.resume, set(_given_fields(args.config, args)))
        if is_first_process():
            _report_best(best)
        return 0

    if args.out:
        from training.evaluate import check_json_out

        check_json_out(args.out)
    if checkpoint.load(args.checkpoint, kind=None)["kind"] == "captioning":
        return _evaluate_captioner(args)
    return _evaluate_translation(args)


def _report_best(best: Path) -> None:
    """Name the best checkpoint; a resumed run that neither found a best.pt to carry over nor beat its restored best
    has none in its folder, and says so rather than naming a file that is not there."""
    if best.exists():
        print(f"best checkpoint: {best}")
    else:
        print(f"no best checkpoint in {best.parent}: this run did not beat the best of the run it resumed")


def _evaluate_translation(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    from training.data.corpus import checkpoint_corpus, split
    from training.evaluate import evaluate, write_json

    payload = checkpoint.load(args.checkpoint)
    model = checkpoint.build_model(payload)
    sp = spm.SentencePieceProcessor(model_proto=bytes(payload["tokenizer"]))
    pairs = split(checkpoint_corpus(payload["data"], args.data))[args.split]
    if args.limit:
        pairs = pairs[: args.limit]
    if not pairs:
        raise InputError(f"{args.checkpoint}: the {args.split} split of its corpus has no pairs to evaluate")
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "pairs": len(pairs),
              **evaluate(model, sp, pairs)}
    if args.out:
        write_json(result, args.out)
    json.dump({k: v for k, v in result.items() if k != "examples"}, sys.stdout, indent=2, ensure_ascii=False,
              allow_nan=False)
    print()
    return 0


def _evaluate_captioner(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    from training.caption_eval import evaluate
    from training.data.captions import checkpoint_split
    from training.evaluate import write_json

    payload = checkpoint.load(args.checkpoint, kind="captioning")
    model = checkpoint.build_captioner(payload)
    sp = spm.SentencePieceProcessor(model_proto=bytes(payload["tokenizer"]))
    images = checkpoint_split(payload["data"], payload["train_config"], args.split, args.limit, args.data)
    if not len(images):
        raise InputError(f"{args.checkpoint}: the {args.split} split has no images to evaluate")
    result = {"checkpoint": str(args.checkpoint), "split": args.split, **evaluate(model, sp, images)}
    if args.out:
        write_json(result, args.out)
    json.dump({k: v for k, v in result.items() if k != "examples"}, sys.stdout, indent=2, ensure_ascii=False,
              allow_nan=False)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
