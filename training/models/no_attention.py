"""The encoder–decoder without attention (Cho et al. 2014; "RNNencdec" in Bahdanau et al. 2015): the baseline.

The decoder sees one fixed summary of the source at every step, the last encoder states ``c = [→h_S; ←h_1]``.
:class:`NoAttention` has the interface of an attention module so that the model, the export and the server need no
special case: its ``keys`` are that summary, its context is the summary whatever the query, and its weights are
uniform over the real source tokens. Those weights say nothing about the model; the manifest flags them
(``attention.uniform: true``) so that clients do not read alignments into them.
"""

from __future__ import annotations

import torch
from torch import nn


class NoAttention(nn.Module):
    def project_keys(self, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The summary [→h_S; ←h_1] (batch, 2H) of memory (batch, src_len, 2H), S the last real position."""
        if mask is None:
            raise ValueError("the summary needs the source mask to find the last real token")
        half = memory.size(-1) // 2
        last = (mask.sum(-1) - 1).view(-1, 1, 1).expand(-1, 1, memory.size(-1))  # (batch, 1, 2H)
        forward_last = memory.gather(1, last).squeeze(1)[:, :half]  # →h_S
        backward_first = memory[:, 0, half:]  # ←h_1
        return torch.cat([forward_last, backward_first], dim=-1)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys: (batch, 2H) the summary; returns it as the context and uniform weights (batch, src_len)."""
        weights = mask.to(keys.dtype)
        weights = weights / weights.sum(-1, keepdim=True)
        return keys, weights
