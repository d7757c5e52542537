"""Captioning training: images with captions, the caption vocabulary, image batches, the cross-entropy plus the
doubly stochastic regulariser, and validation (:class:`CaptionRecipe`).

The run around them is :mod:`training.recipe`'s, the same as translation's: progress bar, budgets
(``--max-minutes`` and the others), ``--resume``, ``--device`` and ``torchrun`` behave alike; every process builds
the same shuffled batches and takes every N-th one; DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from torch import nn

from training.batching import pad
from training.caption_eval import MAX_CAPTION_TOKENS, bleu, caption_images, teacher_forced_correctness
from training.config import DEVICES, InputError, check, option
from training.data.captions import CaptionSet, absolute_spec, data_hash, load_caption_data
from training.loop import Step
from training.models.caption import ShowAttendTell, ShowAttendTellConfig, doubly_stochastic_penalty, normalise
from training.recipe import Recipe, run
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, too_small_vocabulary_is_input_error

log = logging.getLogger("attn.caption")


CAPTION_TOKENIZERS = ("word", "unigram", "bpe", "char")  # SentencePiece model types
INIT_STATES = ("mean", "learned")  # ShowAttendTellConfig.init_state
BEST_BY = ("valid_loss", "valid_bleu4", "valid_attention_correctness")  # what _validate reports


@dataclass
class CaptionTrainConfig:
    data: str = option("scenes", "Images with captions: scenes (generated, see training/data/scenes.py), "
                       "flickr8k:DIR or coco:ANNOTATIONS.json[:IMAGES_DIR].")
    out: str = option("runs/scenes-sat", "Run folder: spm.model, last.pt and best.pt are written here.",
                      on_resume=True)
    image_size: int = option(96, "Images are resized to SIZE × SIZE pixels.")
    train_images: int = option(20000, "scenes: images generated for the training split (ignored for real data).")
    valid_images: int = option(500, "scenes: images generated for the valid split (ignored for real data).")
    test_images: int = option(1000, "scenes: images generated for the test split (ignored for real data).")
    scene_seed: int = option(0, "scenes: seed of the generated images (ignored for real data).")
    vocab_size: int = option(5000, "Most tokens of the caption vocabulary (fewer when the captions have fewer).")
    tokenizer: str = option("word", "SentencePiece model type: word (whole words, rare ones <unk>), unigram or bpe "
                            "(subwords, byte fallback) or char.", CAPTION_TOKENIZERS)
    backbone: str = option("resnet-small", "Image encoder: resnet-small (a small residual CNN with coordinate "
                           "channels, trained from scratch) or torchvision:NAME, e.g. torchvision:resnet18 (needs "
                           "torchvision).")
    width: int = option(16, "resnet-small: channels of the stem; doubled at every downsampling.")
    stages: int = option(3, "resnet-small: stride-2 stages; the grid is image_size / 2**stages cells a side.")
    extra_blocks: int = option(1, "resnet-small: stride-1 residual blocks after the last stage (each widens the "
                               "receptive field).")
    feature_dim: int = option(128, "Size of an annotation vector (one per grid cell).")
    emb_dim: int = option(64, "Word embedding size.")
    hidden_dim: int = option(256, "LSTM state size.")
    attn_dim: int = option(128, "Hidden size of the soft attention's score v·tanh(…).")
    dropout: float = option(0.2, "Dropout probability (word embeddings, deep output), in [0, 1).")
    context_dropout: float = option(0.0, "Probability that in training the LSTM does not read a step's context (the "
                                    "output layer still does), in [0, 1).")
    lstm_reads_context: bool = option(True, "The LSTM reads the attention context (the paper); off: only the output "
                                      "layer does, so every word must look for itself.")
    init_state: str = option("mean", "Initial LSTM state: from the mean annotation (mean, the paper) or a learned "
                             "constant (learned).", INIT_STATES)
    alpha_reg: float = option(1.0, "λ of the doubly stochastic attention regulariser; 0 = off.")
    batch_size: int = option(64, "Images per batch (per process).")
    lr: float = option(1e-3, "Adam learning rate.", on_resume=True)
    clip: float = option(5.0, "Gradient norm clipping threshold.")
    epochs: int = option(20, "Budget: passes over the training captions.", on_resume=True)
    max_steps: int = option(0, "Budget: optimizer steps; 0 = no limit.", on_resume=True)
    max_target_tokens: int = option(0, "Budget: caption tokens trained on (all processes together); 0 = no limit.",
                                   on_resume=True)
    max_minutes: float = option(0.0, "Budget: wall-clock minutes; 0 = no limit.", on_resume=True)
    valid_every: int = option(500, "Validate (and write last.pt, and best.pt on a new best --best-by) every N steps.",
                              on_resume=True)
    valid_bleu_sample: int = option(500, "Valid images captioned for BLEU-4 (and attention correctness on scenes) "
                                    "at each validation.")
    best_by: str = option("valid_loss", "The validation metric that picks best.pt (lowest loss, highest others); "
                          "valid_attention_correctness needs scenes.", BEST_BY)
    seed: int = option(1, "Random seed: initialisation and batch order.")
    device: str = option("auto", "Where to train: cuda if available (auto), or force cpu / cuda.", DEVICES,
                         on_resume=True)
    amp: bool = option(True, "bf16 autocast on CUDA; ignored on CPU.")
    threads: int = option(0, "CPU threads for torch; 0 = torch's default. 1 keeps a run steady on a shared machine.",
                          on_resume=True)

    def __post_init__(self) -> None:
        check(
            self,
            positive=("image_size", "train_images", "vocab_size", "width", "stages", "feature_dim", "emb_dim",
                      "hidden_dim", "attn_dim", "batch_size", "lr", "clip", "epochs", "valid_every"),
            non_negative=("valid_images", "test_images", "extra_blocks", "alpha_reg", "max_steps", "max_target_tokens",
                          "max_minutes", "valid_bleu_sample", "threads"),
            fractions=("dropout", "context_dropout"),
        )
        kind, _, rest = self.data.partition(":")
        if kind not in ("scenes", "flickr8k", "coco") or (kind != "scenes" and not rest):
            raise ValueError(f"--data {self.data!r}: use scenes, flickr8k:DIR or coco:ANNOTATIONS.json[:IMAGES]")
        if self.best_by == "valid_attention_correctness" and kind != "scenes":
            # Without the scenes' object boxes validation has no such metric, and best.pt followed every validation.
            raise ValueError("--best-by valid_attention_correctness needs --data scenes (it is measured against the "
                             "generated scenes' object boxes): choose valid_loss or valid_bleu4")
        if self.backbone == "resnet-small" and self.image_size < 2**self.stages:
            raise ValueError(f"--image-size {self.image_size} leaves no grid cell after --stages {self.stages} "
                             f"(the grid is image_size / 2**stages = {self.image_size / 2**self.stages:g} cells a "
                             "side): lower --stages or raise --image-size")
        torchvision = self.backbone.startswith("torchvision:") and self.backbone.removeprefix("torchvision:")
        if self.backbone != "resnet-small" and not torchvision:
            raise ValueError(f"--backbone {self.backbone!r}: use resnet-small or torchvision:NAME")


def train_caption_tokenizer(captions: list[str], vocab_size: int, kind: str) -> bytes:
    """A SentencePiece model over the training captions, with the project's special ids."""
    model = io.BytesIO()
    with too_small_vocabulary_is_input_error(vocab_size):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
            model_type=kind, byte_fallback=kind != "word", character_coverage=0.9999, pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, num_threads=2, minloglevel=2,
        )
    return model.getvalue()


def _examples(data: CaptionSet, sp: spm.SentencePieceProcessor) -> list[tuple[int, list[int]]]:
    """(image index, BOS ids EOS) for every reference caption that fits the decoding budget."""
    out = []
    for i, refs in enumerate(data.captions):
        for caption in refs:
            ids = sp.encode(caption)
            if 0 < len(ids) < MAX_CAPTION_TOKENS:
                out.append((i, [BOS_ID, *ids, EOS_ID]))
    return out


def _batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def _loss(
    model: nn.Module, cfg: CaptionTrainConfig, data: CaptionSet, batch: list[tuple[int, list[int]]],
    device: torch.device, mean: list[float], std: list[float],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean token cross-entropy, the regulariser, and the number of target tokens of a batch."""
    images = normalise(torch.from_numpy(data.images([i for i, _ in batch])).to(device), mean, std)
    tgt = pad([ids for _, ids in batch], PAD_ID).to(device)
    logits, attention = model(images, tgt[:, :-1])
    gold = tgt[:, 1:]
    ce = nn.functional.cross_entropy(logits.flatten(0, 1).float(), gold.flatten(), ignore_index=PAD_ID)
    reg = doubly_stochastic_penalty(attention.float(), gold != PAD_ID, cfg.alpha_reg)
    return ce, reg, int((gold != PAD_ID).sum())


@torch.no_grad()
def _validate(
    model: ShowAttendTell, sp: spm.SentencePieceProcessor, valid: CaptionSet, examples: list[tuple[int, list[int]]],
    cfg: CaptionTrainConfig, device: torch.device,
) -> dict[str, Any]:
    model.eval()
    total, count = 0.0, 0
    for idx in _batches(len(examples), 128, 0, 0):
        ce, _, tokens = _loss(model, cfg, valid, [examples[i] for i in idx], device, model.cfg.mean, model.cfg.std)
        total, count = total + ce.item() * tokens, count + tokens
    sample = valid.subset(min(len(valid), cfg.valid_bleu_sample))
    tokens_out, _ = caption_images(model, sample.images(range(len(sample))))
    metrics: dict[str, Any] = {"valid_loss": round(total / max(count, 1), 4)}
    metrics["valid_bleu4"] = bleu([sp.decode(t) for t in tokens_out], sample.captions)["bleu4"]
    if sample.scenes is not None:
        correctness = teacher_forced_correctness(model, sp, sample)
        metrics["valid_attention_correctness"] = correctness["correctness"]
        metrics["valid_uniform_baseline"] = correctness["uniform_baseline"]
    model.train()
    return metrics


class CaptionRecipe(Recipe):
    """Images with reference captions, a caption vocabulary, image batches and the cross-entropy plus the doubly
    stochastic regulariser; validation by loss, BLEU-4 and (scenes) attention correctness."""

    kind = "captioning"
    items = "img"

    @property
    def best_by(self) -> str:
        return str(self.cfg.best_by)

    def configure(self) -> None:
        # Saved absolute, so that evaluate, resume and export read these images from any directory (an old
        # checkpoint's relative path resolves against the current directory, and its hash is checked).
        self.cfg = replace(self.cfg, data=absolute_spec(self.cfg.data))

    def load_data(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = self.cfg
        sizes = {"train": cfg.train_images, "valid": cfg.valid_images, "test": cfg.test_images}
        self.splits = load_caption_data(cfg.data, cfg.image_size, sizes, cfg.scene_seed)
        self.load_seconds = time.monotonic() - started
        return {"corpus": cfg.data, "hash": data_hash(self.splits),
                "sizes": {name: len(v) for name, v in self.splits.items()}, "image_size": cfg.image_size,
                "scene_seed": cfg.scene_seed}

    def train_tokenizer(self) -> bytes:
        captions = [c for refs in self.splits["train"].captions for c in refs]
        return train_caption_tokenizer(captions, self.cfg.vocab_size, self.cfg.tokenizer)

    def prepare(self, sp: spm.SentencePieceProcessor) -> int:
        self.train_examples = _examples(self.splits["train"], sp)
        self.valid_examples = _examples(self.splits["valid"], sp)
        if not self.train_examples:
            captions = sum(len(refs) for refs in self.splits["train"].captions)
            raise InputError(f"no training captions left from {self.cfg.data!r}: each of its {captions} training "
                             f"captions is empty or longer than {MAX_CAPTION_TOKENS - 1} tokens, the most a caption "
                             "is decoded to")
        return len(self.train_examples)

    def build_model(self, vocab_size: int) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.cfg
        self.model_cfg = ShowAttendTellConfig(
            vocab_size=vocab_size, image_size=cfg.image_size, backbone=cfg.backbone, width=cfg.width,
            stages=cfg.stages, extra_blocks=cfg.extra_blocks, feature_dim=cfg.feature_dim, emb_dim=cfg.emb_dim,
            hidden_dim=cfg.hidden_dim, attn_dim=cfg.attn_dim, dropout=cfg.dropout,
            context_dropout=cfg.context_dropout, lstm_reads_context=cfg.lstm_reads_context, pad_id=PAD_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, init_state=cfg.init_state,
        )
        return ShowAttendTell(self.model_cfg), asdict(self.model_cfg)

    def loss(self, model: nn.Module, batch: list[int], device: torch.device) -> tuple[torch.Tensor, Step]:
        examples = [self.train_examples[i] for i in batch]
        ce, reg, tokens = _loss(model, self.cfg, self.splits["train"], examples, device, self.model_cfg.mean,
                                self.model_cfg.std)
        return ce + reg, Step(tokens, len(examples), {"loss": ce.detach(), "reg": reg.detach()})

    def batches(self, epoch: int) -> list[list[int]]:
        return _batches(len(self.train_examples), self.cfg.batch_size, self.cfg.seed, epoch)

    def validate(self, model: nn.Module, sp: spm.SentencePieceProcessor, device: torch.device) -> dict[str, Any]:
        if not self.valid_examples:
            return {}
        assert isinstance(model, ShowAttendTell)
        return _validate(model, sp, self.splits["valid"], self.valid_examples, self.cfg, device)

    def describe(self, model: nn.Module, device: torch.device, world: int) -> str:
        assert isinstance(model, ShowAttendTell)
        return (f"training on {device} ×{world}: {len(self.train_examples)} train captions "
                f"({len(self.splits['train'])} images, loaded in {self.load_seconds:.0f} s), "
                f"{len(self.valid_examples)} valid, vocab {self.model_cfg.vocab_size}, grid {model.grid()}, "
                f"{sum(p.numel() for p in model.parameters())} parameters")


def train(cfg: CaptionTrainConfig, resume_path: Path | None = None,
          given: Collection[str] | None = None) -> Path:
    """Train and return the path of the best checkpoint; ``given``: the fields given on the command line
    (:func:`training.recipe.run`)."""
    return run(CaptionRecipe(cfg), resume_path, given)
