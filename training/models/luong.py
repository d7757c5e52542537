"""Multiplicative and local attention (Luong, Pham and Manning 2015), queried with the *current* decoder state h_t.

Global attention scores every source annotation ``h̄_s``::

    dot      score(h_t, h̄_s) = h_tᵀ h̄_s
    general  score(h_t, h̄_s) = h_tᵀ W_a h̄_s
    concat   score(h_t, h̄_s) = v_aᵀ tanh(W_a [h_t; h̄_s])

``a_t = softmax_s(score)`` and ``c_t = Σ_s a_t(s) h̄_s``. The part of each score that depends on the source only
(``h̄_s``, ``W_a h̄_s``, the source half of the concat projection) is computed once per sentence by
:meth:`LuongAttention.project_keys`, like Bahdanau's ``U_a h_j``.

Local attention looks at the window ``[p_t − D, p_t + D]`` only (positions are 0-based):

* local-m (monotonic): ``p_t = min(t, S − 1)`` for target step t, S real source tokens (EOS included); the clamp
  keeps the window on the sentence when the translation is longer than the source.
* local-p (predictive): ``p_t = S · sigmoid(v_pᵀ tanh(W_p h_t))``, and the alignment is multiplied by a Gaussian
  ``exp(−(s − p_t)² / (2σ²))`` with ``σ = D / 2``, which makes p_t differentiable.

Outside the window (and on padding) the weights are exactly zero. Inside, we **renormalise** so that every row sums
to 1 — the paper uses the Gaussian-scaled softmax as it is, whose rows sum to less than 1 — because the served
alignment matrix must be a distribution per target token. Renormalising the Gaussian-weighted softmax is a softmax of
``score − (s − p_t)² / (2σ²)`` over the window, which is how it is computed.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.attention import masked_softmax

SCORES = ("dot", "general", "concat")


def source_positions(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … along the source axis as floats (batch, src_len); a cumulative sum keeps src_len dynamic in ONNX."""
    return torch.ones_like(mask, dtype=torch.float32).cumsum(-1) - 1


class LuongAttention(nn.Module):
    """Global attention with one of the three score functions; ``query_dim`` must equal ``key_dim`` for ``dot``."""

    def __init__(self, score: str, query_dim: int, key_dim: int, attn_dim: int) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown score function {score!r} (choose from {SCORES})")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(f"the dot score needs query_dim == key_dim, got {query_dim} and {key_dim}")
        self.score_name = score
        if score == "general":
            self.W_a = nn.Linear(key_dim, query_dim, bias=False)
        elif score == "concat":
            # W_a [h_t; h̄_s] split into its query and source halves, so the source half is precomputed.
            self.W_q = nn.Linear(query_dim, attn_dim, bias=False)
            self.W_k = nn.Linear(key_dim, attn_dim, bias=True)
            self.v_a = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The source-only part of the score: (batch, src_len, key_dim) -> (batch, src_len, query or attn dim)."""
        if self.score_name == "general":
            return self.W_a(memory)
        if self.score_name == "concat":
            return self.W_k(memory)
        return memory

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (batch, query_dim), keys from :meth:`project_keys` -> scores (batch, src_len)."""
        if self.score_name == "concat":
            return self.v_a(torch.tanh(self.W_q(query).unsqueeze(1) + keys)).squeeze(-1)
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        query: (batch, query_dim) the current decoder state h_t
        keys: (batch, src_len, ·) from :meth:`project_keys`; memory: (batch, src_len, key_dim) the annotations h̄_s
        mask: (batch, src_len) true on real source tokens
        returns context c_t (batch, key_dim) and weights a_t (batch, src_len), each row summing to 1
        """
        weights = masked_softmax(self.score(query, keys), mask)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights


class LocalAttention(nn.Module):
    """local-m (``predictive=False``) or local-p (``predictive=True``) around ``p_t`` with half-width ``window``."""

    def __init__(
        self, score: str, query_dim: int, key_dim: int, attn_dim: int, window: int, predictive: bool
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"the window half-width D must be at least 1, got {window}")
        self.align = LuongAttention(score, query_dim, key_dim, attn_dim)
        self.window = window
        self.predictive = predictive
        if predictive:
            self.W_p = nn.Linear(query_dim, attn_dim, bias=False)
            self.v_p = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.align.project_keys(memory)

    def center(self, query: torch.Tensor, mask: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        """p_t (batch,) as a float: predicted from h_t (local-p) or the target step clamped to the source (local-m)."""
        length = mask.sum(-1).to(torch.float32)  # S, real source tokens
        if self.predictive:
            return length * torch.sigmoid(self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)
        if position is None:
            raise ValueError("local-m attention needs the target position t")
        return torch.minimum(position.to(torch.float32), length - 1)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
        position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`LuongAttention.forward`; ``position`` (batch,) int64 is the target step t (local-m only)."""
        p_t = self.center(query, mask, position).unsqueeze(-1)  # (batch, 1)
        distance = source_positions(mask) - p_t  # (batch, src_len)
        inside = mask & (distance.abs() <= self.window)
        scores = self.align.score(query, keys)
        if self.predictive:
            sigma = self.window / 2
            scores = scores - distance.square() / (2 * sigma * sigma)
        weights = masked_softmax(scores, inside)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights
