"""PyTorch's greedy decoding (attn-train evaluate, the export's parity check and card) never emits what the server's
search never emits: padding and the start token. An undertrained Transformer that ranked BOS first decoded
[BOS, BOS, BOS] in PyTorch where the server answered an empty translation, and the parity check passed on it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from exporter.parity import greedy_loop as onnx_greedy_loop
from training.models import decoding

PAD, BOS, EOS, WORD = 0, 2, 3, 5
VOCAB = 8


def _scores(step: int) -> list[float]:
    """BOS first, then padding, then a word, then EOS: the next-best of each banned choice is kept."""
    scores = [0.0] * VOCAB
    order = [[BOS, WORD, EOS], [PAD, WORD, EOS], [EOS, WORD, BOS]][min(step, 2)]
    for rank, token in enumerate(order):
        scores[token] = 3.0 - rank
    return scores


class _Model:
    cfg = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS)

    def start(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        return {}, 0

    def named_step(self, token: torch.Tensor, state: int, static: object, mask: torch.Tensor) -> tuple[
            torch.Tensor, int, torch.Tensor, None]:
        logits = torch.tensor([_scores(state)] * token.size(0))
        return logits, state + 1, torch.full((token.size(0), mask.size(1)), 1.0 / mask.size(1)), None


def test_pytorch_greedy_never_emits_bos_or_padding() -> None:
    tokens, rows = decoding.greedy(_Model(), torch.tensor([[7, 6, EOS]]), torch.tensor([3]), max_len=10)
    assert tokens == [[WORD, WORD]]
    assert rows[0].shape == (3, 3)  # a row for each token and the EOS


def test_the_parity_checks_onnx_loop_bans_what_it_is_told_to() -> None:
    steps = iter(range(10))

    def step(token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([_scores(next(steps))], dtype=np.float32), np.ones((1, 2), dtype=np.float32) / 2

    tokens, _ = onnx_greedy_loop(step, 1, BOS, EOS, 10, decoding.never_generated(PAD, BOS, EOS))
    assert tokens == [[WORD, WORD]]
