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
from training.train import TrainConfig, model_config


def _add_config_flags(parser: argparse.ArgumentParser, config: type = TrainConfig) -> None:
    """One flag per config field, its help and choices from the field's metadata (training/config.py), so the
    dataclass stays the single description of a run."""
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"].replace("%", "%%") + " (default: %(default)s)"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"], help=help)


def _config(parser: argparse.ArgumentParser, config: type, args: argparse.Namespace) -> Any:
    """The run's config from the parsed flags; a value the config refuses is a usage error, not a traceback."""
    names = {f.name for f in dataclasses.fields(config)}
    try:
        cfg = config(**{k: v for k, v in vars(args).items() if k in names})
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
                    "--max-* budgets given here extend it, and --out, --lr, --cooldown-steps, --repeat, --valid-every, "
                    "--device and --threads given here replace it)")
    tr.set_defaults(config=TrainConfig, subparser=tr)
    cap = sub.add_parser("caption", help="train a Show-Attend-Tell image captioner (scenes, Flickr8k or COCO layout)",
                         description="Train a Show-Attend-Tell image captioner (scenes, Flickr8k or COCO layout).")
    _add_config_flags(cap, CaptionTrainConfig)
    cap.add_argument("--resume", type=Path, help="continue from a last.pt/best.pt checkpoint (its config is kept; "
                     "--max-* budgets given here extend it, and --out, --lr, --valid-every, --device and --threads "
                     "given here replace it)")
    cap.set_defaults(config=CaptionTrainConfig, subparser=cap)
    ev = sub.add_parser("evaluate", help="BLEU and chrF of a translation checkpoint on a split, overall and by "
                        "length; BLEU-1..4 and attention correctness of a captioning checkpoint")
    ev.add_argument("checkpoint", type=Path, help="a best.pt/last.pt checkpoint (translation or captioning)")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"],
                    help="the split to evaluate on (default: %(default)s)")
    ev.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    ev.add_argument("--out", type=Path, help="write the results as JSON here")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (images)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config(args.subparser, args.config, args) if args.command in ("translation", "caption") else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    if args.command == "translation":
        from training.train import train

        best = train(cfg, args.resume)
        print(f"best checkpoint: {best}")
        return 0

    if args.command == "caption":
        from training.caption_train import train as train_captioner

        best = train_captioner(cfg, args.resume)
        print(f"best checkpoint: {best}")
        return 0

    import sentencepiece as spm

    if checkpoint.load(args.checkpoint, kind=None)["kind"] == "captioning":
        return _evaluate_captioner(args)
    from training.data.corpus import load_corpus, split
    from training.evaluate import evaluate, write_json

    payload = checkpoint.load(args.checkpoint)
    model = checkpoint.build_model(payload)
    sp = spm.SentencePieceProcessor(model_proto=bytes(payload["tokenizer"]))
    pairs = split(load_corpus(args.data or payload["data"]["corpus"]))[args.split]
    if args.limit:
        pairs = pairs[: args.limit]
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "pairs": len(pairs),
              **evaluate(model, sp, pairs)}
    if args.out:
        write_json(result, args.out)
    json.dump({k: v for k, v in result.items() if k != "examples"}, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


def _evaluate_captioner(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    from training.caption_eval import evaluate
    from training.data.captions import load_caption_data
    from training.evaluate import write_json

    payload = checkpoint.load(args.checkpoint, kind="captioning")
    model = checkpoint.build_captioner(payload)
    sp = spm.SentencePieceProcessor(model_proto=bytes(payload["tokenizer"]))
    cfg = payload["train_config"]
    sizes = {"train": cfg["train_images"], "valid": cfg["valid_images"], "test": cfg["test_images"]}
    if args.limit:
        sizes[args.split] = min(sizes[args.split], args.limit)
    data = load_caption_data(args.data or cfg["data"], cfg["image_size"], sizes, cfg["scene_seed"], [args.split])
    images = data[args.split].subset(args.limit) if args.limit else data[args.split]
    result = {"checkpoint": str(args.checkpoint), "split": args.split, **evaluate(model, sp, images)}
    if args.out:
        write_json(result, args.out)
    json.dump({k: v for k, v in result.items() if k != "examples"}, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
