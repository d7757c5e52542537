"""Token-budget batches of length-sorted examples, and their padding into tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    src: list[int]  # source ids followed by EOS
    tgt: list[int]  # BOS, target ids, EOS


def make_batches(examples: Sequence[Example], max_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices whose padded size (count × longest side) stays within ``max_tokens``.

    Sorting by length keeps padding low; the sort key has a random tie-break and the batch order is shuffled, both
    seeded by (seed, epoch), so every process of a distributed run computes the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].src), len(examples[i].tgt), rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(len(examples[i].src), len(examples[i].tgt))
        if current and max(longest, size) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns src (batch, src_len), src lengths (batch,) and tgt (batch, tgt_len) with BOS … EOS."""
    src = pad([e.src for e in examples], pad_id)
    lengths = torch.tensor([len(e.src) for e in examples], dtype=torch.long)
    tgt = pad([e.tgt for e in examples], pad_id)
    return src, lengths, tgt
