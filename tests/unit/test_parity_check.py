"""The parity check's bar itself: what it must refuse whatever the model."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from exporter.caption_export import check as caption_check
from exporter.parity import check


class _Model:
    """Greedy decoding that always emits token 5, attending 0.5 to every source token."""

    cfg = SimpleNamespace(pad_id=0)

    def eval(self) -> None:
        pass

    def greedy(self, src: torch.Tensor, lengths: torch.Tensor, max_len: int,
               ) -> tuple[list[list[int]], list[torch.Tensor]]:
        return [[5] for _ in lengths], [torch.full((1, src.size(1)), 0.5) for _ in lengths]


def _graphs(attention: float) -> object:
    """The same tokens as :class:`_Model`, with every attention weight ``attention``."""

    def decode(batch: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
        return [[5] for _ in batch], [np.full((1, len(b)), attention, dtype=np.float32) for b in batch]

    return decode


def test_nan_attention_fails_parity_though_the_tokens_agree() -> None:
    sources = [[7, 8, 3], [9, 3]]
    assert check(_Model(), _graphs(0.5), sources).passed  # type: ignore[arg-type]
    report = check(_Model(), _graphs(float("nan")), sources)  # type: ignore[arg-type]
    assert not report.passed
    assert report.as_dict()["max_attention_abs_diff"] == float("inf")


class _Captioner:
    """Greedy captions that are always token 5, attending 0.25 to each of four grid cells."""

    cfg = SimpleNamespace(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])

    def eval(self) -> None:
        pass

    def greedy(self, images: torch.Tensor, max_len: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        return [[5] for _ in images], [torch.full((2, 4), 0.25) for _ in images]


def _caption_graphs(attention: float, cells: int = 4) -> object:
    def caption(images: np.ndarray) -> tuple[list[list[int]], list[np.ndarray]]:
        return [[5] for _ in images], [np.full((2, cells), attention, dtype=np.float32) for _ in images]

    return caption


def test_nan_attention_fails_caption_parity_though_the_captions_agree() -> None:
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    assert caption_check(_Captioner(), _caption_graphs(0.25), images).passed  # type: ignore[arg-type]
    report = caption_check(_Captioner(), _caption_graphs(float("nan")), images)  # type: ignore[arg-type]
    assert not report.passed
    assert report.as_dict()["max_attention_abs_diff"] == float("inf")


def test_attention_of_another_shape_fails_parity_instead_of_broadcasting() -> None:
    # One grid cell's weight, repeated by numpy's broadcasting against four, would look like agreement.
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert not caption_check(_Captioner(), _caption_graphs(0.25, cells=1), images).passed  # type: ignore[arg-type]
    sources = [[7, 8, 3], [9, 3]]

    def one_column(batch: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
        return [[5] for _ in batch], [np.full((1, 1), 0.5, dtype=np.float32) for _ in batch]

    assert not check(_Model(), one_column, sources).passed  # type: ignore[arg-type]
