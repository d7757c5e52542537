"""Checkpoints: state_dicts, config dataclasses as dicts, and the tokenizer model bytes. Never pickled modules.

``kind`` says which model family a checkpoint holds: ``translation`` (:class:`Seq2Seq` or :class:`Transformer`, as
``arch`` says) or ``captioning`` (:class:`ShowAttendTell`).

Translation checkpoints written before ``arch`` existed are RNN ones, and their model configs lack the fields added
for the Luong and no-attention variants: the defaults of those fields mean the Bahdanau model they hold.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.config import InputError
from training.models.caption import ShowAttendTell, ShowAttendTellConfig
from training.models.rnn import Seq2Seq, Seq2SeqConfig
from training.models.transformer import Transformer, TransformerConfig

KINDS = ("translation", "captioning")
ARCHS = ("rnn", "transformer")
TranslationModel = Seq2Seq | Transformer


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so that a run killed while saving never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path, kind: str | None = "translation") -> dict[str, Any]:
    """The payload of a checkpoint of ``kind`` (any known kind when ``kind`` is None); :class:`InputError` naming
    the file when it is missing, unreadable, not a checkpoint or of another kind."""
    payload = _read(path)
    found = payload.get("kind") if isinstance(payload, dict) else None
    if (kind is None and found not in KINDS) or (kind is not None and found != kind):
        raise InputError(f"{path} is not a {kind or ' or '.join(KINDS)} checkpoint (kind={found!r})")
    return payload


def _read(path: Path) -> Any:
    """What ``torch.save`` wrote at ``path``. The errors are those of a file that is missing or a directory
    (OSError), truncated or not a zip archive (RuntimeError, EOFError) or holding something other than tensors and
    plain data (pickle.UnpicklingError, which weights_only raises)."""
    # torch.save writes a zip archive; on other bytes torch.load may raise anything (a KeyError, say), so look first.
    if path.is_file() and not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a checkpoint (not a torch.save archive, or truncated)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first_sentence = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise InputError(f"{path} is not a readable checkpoint ({first_sentence})") from None


def new_model(arch: str, model_config: dict[str, Any]) -> TranslationModel:
    """An untrained translation model of ``arch`` from its config as a dict."""
    if arch == "rnn":
        return Seq2Seq(Seq2SeqConfig(**model_config))
    if arch == "transformer":
        return Transformer(TransformerConfig(**model_config))
    raise ValueError(f"unknown architecture {arch!r} (choose from {ARCHS})")


def build_model(payload: dict[str, Any]) -> TranslationModel:
    """The trained translation model of a checkpoint, in eval mode."""
    model = new_model(payload.get("arch", "rnn"), payload["model_config"])
    model.load_state_dict(payload["model"])
    model.eval()
    return model


def build_captioner(payload: dict[str, Any]) -> ShowAttendTell:
    model = ShowAttendTell(ShowAttendTellConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model
