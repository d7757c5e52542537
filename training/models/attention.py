"""Additive attention (Bahdanau, Cho and Bengio 2015).

``e_ij = v_a · tanh(W_a s_{i-1} + U_a h_j)``, ``α_ij = softmax_j(e_ij)``, ``c_i = Σ_j α_ij h_j``.

``U_a h_j`` does not depend on the decoder step, so :meth:`BahdanauAttention.project_keys` computes it once per
source sentence; the exported encoder returns it and the decoder step takes it as an input (outside the beam).
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with padded positions (``mask`` false) at exactly zero weight."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask


class BahdanauAttention(nn.Module):
    def __init__(self, query_dim: int, key_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.W_a = nn.Linear(query_dim, attn_dim, bias=False)
        self.U_a = nn.Linear(key_dim, attn_dim, bias=True)
        self.v_a = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``U_a h_j`` for every source position: (batch, src_len, key_dim) -> (batch, src_len, attn_dim)."""
        return self.U_a(memory)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        query: (batch, query_dim) the previous decoder state s_{i-1}
        keys: (batch, src_len, attn_dim) from :meth:`project_keys`
        memory: (batch, src_len, key_dim) the annotations h_j
        mask: (batch, src_len) true on real source tokens
        returns context (batch, key_dim) and weights (batch, src_len), each row summing to 1
        """
        scores = self.v_a(torch.tanh(self.W_a(query).unsqueeze(1) + keys)).squeeze(-1)  # (batch, src_len)
        weights = masked_softmax(scores, mask)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights
