"""Checkpoints: state_dicts, config dataclasses as dicts, and the tokenizer model bytes. Never pickled modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.models.rnn import Seq2Seq, Seq2SeqConfig


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so that a run killed while saving never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("kind") != "translation":
        raise ValueError(f"{path} is not a translation checkpoint (kind={payload.get('kind')!r})")
    return payload


def build_model(payload: dict[str, Any]) -> Seq2Seq:
    model = Seq2Seq(Seq2SeqConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model
