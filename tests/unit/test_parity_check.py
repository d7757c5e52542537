"""The parity check's bar itself: what it must refuse whatever the model."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

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
