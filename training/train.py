"""Translation training: the parallel corpus, its joint vocabulary, token-count batches, the cross-entropy of the
target tokens and validation by loss and BLEU (:class:`TranslationRecipe`); the run around them (Adam, budgets,
checkpoints, resume, DDP) is :mod:`training.recipe`'s, the same as captioning's.

Run under ``torchrun --nproc-per-node N`` for several processes (gloo on CPU, NCCL on CUDA): every process builds
the same batches and takes every N-th one; gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from torch import nn

from training import checkpoint
from training.batching import Example, collate, make_batches
from training.checkpoint import TranslationModel
from training.config import DEVICES, InputError, check, option
from training.data.corpus import DOMAINS, Pair, absolute_spec, data_hash, load_corpus, split
from training.evaluate import EVAL_SETS, eval_set_of, group_references, required_placeholders, score, translate
from training.loop import Step
from training.models.rnn import ATTENTIONS, Seq2SeqConfig
from training.models.transformer import TransformerConfig
from training.recipe import Recipe, run
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

log = logging.getLogger("attn.train")


@dataclass
class TrainConfig:
    data: str = option("ding", "Parallel corpus: ding (the Ding German-English dictionary), ding:PATH, mixed (the "
                       "corpus that make data builds in data/de-en: Ding, Debian package descriptions, gettext "
                       "messages), mixed:DIR or DIR (another such build), PATH.tsv (source<TAB>target lines) or "
                       "SRC_PATH,TGT_PATH (two line-aligned files).")
    out: str = option("runs/de-en-bahdanau", "Run folder: spm.model, last.pt and best.pt are written here.",
                      on_resume=True)
    vocab_size: int = option(8000, "Pieces of the joint SentencePiece unigram model trained on the training split.")
    emb_dim: int = option(128, "Token embedding size; the transformer's d_model.")
    hidden_dim: int = option(256, "rnn: GRU state size of the decoder and of each encoder direction (Luong and "
                             "local attention: split over the two directions, so it must be even).")
    attn_dim: int = option(256, "rnn: hidden size of the additive score v·tanh(…) of bahdanau and luong-concat.")
    dropout: float = option(0.1, "Dropout probability, in [0, 1).")
    # The model: `--arch rnn --attention bahdanau` is the RNNsearch model the project started with.
    arch: str = option("rnn", "Model family: rnn (bidirectional GRU encoder, GRU decoder with --attention) or "
                       "transformer (multi-head attention, d_model = --emb-dim).", checkpoint.ARCHS)
    attention: str = option("bahdanau", "Attention of the rnn decoder: bahdanau (additive), luong-dot, "
                            "luong-general, luong-concat, local-m, local-p (Luong's local windows) or none (a fixed "
                            "source summary); transformer: multihead (the default, bahdanau, is taken to mean it).",
                            (*ATTENTIONS, "multihead"))
    input_feeding: bool = option(True, "Luong variants: the attentional state of step t-1 is an input of step t.")
    window: int = option(10, "local-m/local-p: half-width D of the window [p_t - D, p_t + D], at least 1.")
    layers: int = option(3, "transformer: encoder layers and decoder layers (each).")
    heads: int = option(4, "transformer: attention heads (must divide --emb-dim).")
    ff_dim: int = option(0, "transformer: feed-forward size; 0 = 4 × --emb-dim.")
    align_layer: int = option(-1, "transformer: decoder layer whose cross-attention is served as the alignment; "
                              "-1 = the last.")
    align_head: int = option(-1, "transformer: the head whose cross-attention is served; -1 = the mean over heads.")
    warmup_steps: int = option(0, "Linear learning-rate warm-up over this many steps; 0 = none.")
    cooldown_steps: int = option(0, "Linear learning-rate decay to zero over the last N steps of --max-steps (the "
                                 "decay of a warm-up-stable-decay schedule); 0 = none.", on_resume=True)
    repeat: str = option("", "Repeat the training pairs of these groups in every epoch: GROUP=N[,GROUP=N...] with "
                         "groups ding-sentences, ding-phrases, ddtp, gettext (the evaluation sets) and placeholders "
                         "(gettext messages whose translation keeps a placeholder); e.g. placeholders=3.",
                         on_resume=True)
    max_tokens: int = option(3000, "Padded tokens per batch (per process).")
    max_source_tokens: int = option(64, "Training pairs with a longer source (or a target longer than twice this) "
                                    "are skipped.")
    lr: float = option(1e-3, "Adam learning rate.", on_resume=True)
    clip: float = option(1.0, "Gradient norm clipping threshold.")
    epochs: int = option(10, "Budget: passes over the training data.", on_resume=True)
    max_steps: int = option(0, "Budget: optimizer steps; 0 = no limit.", on_resume=True)
    max_target_tokens: int = option(0, "Budget: target tokens trained on (all processes together); 0 = no limit.",
                                   on_resume=True)
    max_minutes: float = option(0.0, "Budget: wall-clock minutes; 0 = no limit.", on_resume=True)
    valid_every: int = option(1000, "Validate (and write last.pt, best.pt on a new best valid loss) every N steps.",
                              on_resume=True)
    valid_bleu_sample: int = option(300, "Valid pairs translated for BLEU/chrF at each validation (half of them "
                                    "drawn from the full sentences).")
    seed: int = option(1, "Random seed: initialisation, batch order, the validation sample.")
    device: str = option("auto", "Where to train: cuda if available (auto), or force cpu / cuda.", DEVICES,
                         on_resume=True)
    amp: bool = option(True, "bf16 autocast on CUDA; ignored on CPU.")
    threads: int = option(0, "CPU threads for torch; 0 = torch's default. 1 keeps a run steady on a shared machine.",
                          on_resume=True)

    def __post_init__(self) -> None:
        check(
            self,
            positive=("vocab_size", "emb_dim", "hidden_dim", "attn_dim", "window", "layers", "heads", "max_tokens",
                      "max_source_tokens", "lr", "clip", "epochs", "valid_every"),
            non_negative=("ff_dim", "warmup_steps", "cooldown_steps", "max_steps", "max_target_tokens",
                          "max_minutes", "valid_bleu_sample", "threads"),
            fractions=("dropout",),
        )
        if self.cooldown_steps and not self.max_steps:
            raise ValueError("--cooldown-steps decays towards --max-steps: give --max-steps too")
        repeats(self.repeat)  # a malformed --repeat fails now, not after the corpus is read
        if self.arch == "transformer" and self.attention not in ("bahdanau", "multihead"):
            raise ValueError(f"--arch transformer has multi-head attention, not {self.attention!r}")
        if self.arch == "rnn" and self.attention not in ATTENTIONS:
            raise ValueError(f"--arch rnn has no {self.attention!r} attention (choose from {', '.join(ATTENTIONS)})")


# The groups --repeat can weight: the evaluation sets, and the software messages that carry a placeholder.
REPEAT_GROUPS = (*EVAL_SETS, "placeholders")


def repeats(spec: str) -> dict[str, int]:
    """``--repeat``'s GROUP=N pairs as {group: N}; ValueError naming what is wrong."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        group, sep, count = item.partition("=")
        if not sep or group not in REPEAT_GROUPS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--repeat wants GROUP=N with N ≥ 1 and GROUP one of {', '.join(REPEAT_GROUPS)}, "
                             f"not {item!r}")
        out[group] = int(count)
    return out


def times_repeated(pair: Pair, weights: dict[str, int]) -> int:
    """How often ``pair`` is trained on per epoch: the largest repeat of the groups it belongs to (1 if none)."""
    if not weights:  # no --repeat: skip the placeholder search over every training pair
        return 1
    groups = [eval_set_of(pair)] if pair.domain in DOMAINS else []
    if pair.domain == "gettext" and "placeholders" in weights and required_placeholders(pair.source, [pair.target]):
        groups.append("placeholders")
    return max([weights.get(g, 1) for g in groups], default=1)


def _examples(pairs: list[Pair], sp: spm.SentencePieceProcessor, max_len: int, repeat: str = "") -> list[Example]:
    examples = []
    weights = repeats(repeat)
    for p in pairs:
        src = sp.encode(p.source) + [EOS_ID]
        tgt = [BOS_ID] + sp.encode(p.target) + [EOS_ID]
        if len(src) <= max_len and len(tgt) <= 2 * max_len:
            examples.extend([Example(src, tgt)] * times_repeated(p, weights))
    return examples


def model_config(cfg: TrainConfig, vocab_size: int) -> Seq2SeqConfig | TransformerConfig:
    """The model config of a run: the fields of ``cfg`` that describe the network."""
    ids = {"pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}
    if cfg.arch == "transformer":
        if cfg.attention not in ("bahdanau", "multihead"):  # bahdanau: the flag's default, left as it was
            raise ValueError(f"--arch transformer has multi-head attention, not {cfg.attention!r}")
        return TransformerConfig(
            vocab_size=vocab_size, d_model=cfg.emb_dim, heads=cfg.heads, encoder_layers=cfg.layers,
            decoder_layers=cfg.layers, ff_dim=cfg.ff_dim or 4 * cfg.emb_dim, dropout=cfg.dropout,
            align_layer=cfg.align_layer, align_head=cfg.align_head, **ids,
        )
    if cfg.arch != "rnn":
        raise ValueError(f"unknown --arch {cfg.arch!r} (choose from {checkpoint.ARCHS})")
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"unknown --attention {cfg.attention!r} (choose from {ATTENTIONS})")
    return Seq2SeqConfig(
        vocab_size=vocab_size, emb_dim=cfg.emb_dim, hidden_dim=cfg.hidden_dim, attn_dim=cfg.attn_dim,
        dropout=cfg.dropout, attention=cfg.attention, input_feeding=cfg.input_feeding, window=cfg.window, **ids,
    )


@torch.no_grad()
def _valid_loss(model: TranslationModel, examples: list[Example], device: torch.device, max_tokens: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for idx in make_batches(examples, max_tokens, seed=0, epoch=0):
        src, lengths, tgt = (t.to(device) for t in collate([examples[i] for i in idx], PAD_ID))
        logits, _ = model(src, lengths, tgt[:, :-1])
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=PAD_ID, reduction="sum"
        ).item()
        count += int((tgt[:, 1:] != PAD_ID).sum())
    model.train()
    return total / max(count, 1)


def _validate(
    model: TranslationModel, sp: spm.SentencePieceProcessor, valid: list[Pair], examples: list[Example],
    cfg: TrainConfig, device: torch.device,
) -> dict[str, float]:
    loss = _valid_loss(model, examples, device, cfg.max_tokens)
    # A fixed sample that over-weights full sentences: phrases alone say little about sentence translation.
    rng = random.Random(cfg.seed)
    sentences = [p for p in valid if p.sentence]
    sample = rng.sample(sentences, min(len(sentences), cfg.valid_bleu_sample // 2))
    sample += rng.sample(valid, min(len(valid), cfg.valid_bleu_sample - len(sample)))
    sources, references, _ = group_references(sample)
    bleu = score(translate(model, sp, sources), references)
    model.train()
    return {"valid_loss": round(loss, 4), "valid_bleu": bleu["bleu"], "valid_chrf": bleu["chrf"]}


class TranslationRecipe(Recipe):
    """A parallel corpus, a joint SentencePiece vocabulary, token-count batches and the cross-entropy of the
    target tokens; validation by loss and by BLEU/chrF on a fixed sample."""

    kind = "translation"

    def configure(self) -> None:
        if self.cfg.arch == "transformer" and self.cfg.attention == "bahdanau":
            self.cfg = replace(self.cfg, attention="multihead")  # what the run is, in its saved config
        # Saved absolute, so that evaluate, resume and export read this corpus from any directory. An old checkpoint's
        # relative path resolves against the current directory, as it always did (and its hash is checked).
        self.cfg = replace(self.cfg, data=absolute_spec(self.cfg.data))
        model_config(self.cfg, self.cfg.vocab_size)  # an unknown --arch or --attention fails now, not after the data

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"arch": self.cfg.arch}

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, constant, then (with --cooldown-steps) linear decay to zero at --max-steps: the
        warm-up-stable-decay schedule, whose stable phase can be resumed and decayed at any length."""
        cfg = self.cfg
        factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.cooldown_steps:
            factor = min(factor, max(0.0, (cfg.max_steps - step) / cfg.cooldown_steps))
        return cfg.lr * factor

    def load_data(self) -> dict[str, Any]:
        pairs = load_corpus(self.cfg.data)
        self.splits = split(pairs)
        if not self.splits["train"]:  # else sentencepiece fails on no sentences, in words only its developers read
            raise InputError(f"corpus {self.cfg.data!r}: no training pairs ({len(pairs)} pairs in all)")
        return {"corpus": self.cfg.data, "hash": data_hash(pairs),
                "sizes": {name: len(v) for name, v in self.splits.items()},
                "sentences": {name: sum(p.sentence for p in v) for name, v in self.splits.items()}}

    def train_tokenizer(self) -> bytes:
        return train_tokenizer(self.splits["train"], self.cfg.vocab_size, self.cfg.seed)

    def prepare(self, sp: spm.SentencePieceProcessor) -> int:
        self.train_examples = _examples(self.splits["train"], sp, self.cfg.max_source_tokens, self.cfg.repeat)
        self.valid_examples = _examples(self.splits["valid"], sp, self.cfg.max_source_tokens)
        if not self.train_examples:
            raise InputError(f"no training pairs left from {self.cfg.data!r}: every source is longer than "
                             f"--max-source-tokens {self.cfg.max_source_tokens} tokens (or its target twice that)")
        return len(self.train_examples)

    def build_model(self, vocab_size: int) -> tuple[nn.Module, dict[str, Any]]:
        config = asdict(model_config(self.cfg, vocab_size))
        return checkpoint.new_model(self.cfg.arch, config), config

    def loss(self, model: nn.Module, batch: list[int], device: torch.device) -> tuple[torch.Tensor, Step]:
        src, lengths, tgt = (t.to(device) for t in collate([self.train_examples[i] for i in batch], PAD_ID))
        logits, _ = model(src, lengths, tgt[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=PAD_ID)
        return loss, Step(int((tgt[:, 1:] != PAD_ID).sum()), len(batch), {"loss": loss.detach()})

    def batches(self, epoch: int) -> list[list[int]]:
        return make_batches(self.train_examples, self.cfg.max_tokens, self.cfg.seed, epoch)

    def validate(self, model: nn.Module, sp: spm.SentencePieceProcessor, device: torch.device) -> dict[str, Any]:
        if not self.valid_examples:
            return {}
        return _validate(model, sp, self.splits["valid"], self.valid_examples, self.cfg, device)

    def describe(self, model: nn.Module, device: torch.device, world: int) -> str:
        return (f"training on {device} ×{world}: {len(self.train_examples)} train examples, "
                f"{len(self.valid_examples)} valid, vocab {model.cfg.vocab_size}, "
                f"{sum(p.numel() for p in model.parameters())} parameters")


def train(cfg: TrainConfig, resume_path: Path | None = None,
          given: Collection[str] | None = None) -> Path:
    """Train and return the path of the best checkpoint; ``given``: the fields given on the command line
    (:func:`training.recipe.run`)."""
    return run(TranslationRecipe(cfg), resume_path, given)
