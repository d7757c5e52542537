"""RNN encoder–decoder with attention (Bahdanau et al. 2015, "RNNsearch").

Encoder: a bidirectional GRU; the annotation of source word j is ``h_j = [→h_j; ←h_j]``.
Decoder: a GRU whose state ``s_i = f(s_{i-1}, y_{i-1}, c_i)``, where the context ``c_i`` is attention over the
annotations queried with ``s_{i-1}``. The readout ``t_i = tanh(W_o [s_i; c_i; E y_{i-1}])`` is scored against the
(tied) embedding matrix, which keeps the model small enough to ship (the output layer is the largest part otherwise).

:meth:`Seq2Seq.step` is the only decoding step: the training loop (through :meth:`Seq2Seq.forward`), greedy
evaluation and the ONNX export all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.models.attention import BahdanauAttention


@dataclass
class Seq2SeqConfig:
    vocab_size: int
    emb_dim: int = 128
    hidden_dim: int = 256
    attn_dim: int = 256
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    attention: str = "bahdanau"


class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.rnn = nn.GRU(cfg.emb_dim, cfg.hidden_dim, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (batch, src_len); returns memory (batch, src_len, 2*hidden) and ←h_1 (batch, hidden)."""
        embedded = self.dropout(self.embedding(src))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, final = self.rnn(packed)
        memory, _ = pad_packed_sequence(output, batch_first=True, total_length=src.size(1))
        # final: (2, batch, hidden); index 1 is the backward direction, which has read the whole sentence.
        return memory, final[1]


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        if cfg.attention != "bahdanau":
            raise ValueError(f"unknown attention {cfg.attention!r}")
        self.cfg = cfg
        H = cfg.hidden_dim
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_dim, padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, self.embedding)
        self.init_state = nn.Linear(H, H)
        self.attention = BahdanauAttention(H, 2 * H, cfg.attn_dim)
        self.cell = nn.GRUCell(cfg.emb_dim + 2 * H, H)
        self.readout = nn.Linear(H + 2 * H + cfg.emb_dim, cfg.emb_dim)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.dropout = nn.Dropout(cfg.dropout)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns memory (batch, src_len, 2H), projected keys (batch, src_len, attn) and s_0 (batch, H)."""
        memory, backward_first = self.encoder(src, lengths)
        keys = self.attention.project_keys(memory)
        state = torch.tanh(self.init_state(backward_first))
        return memory, keys, state

    def step(
        self,
        prev_token: torch.Tensor,
        state: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step.

        prev_token: (batch,) y_{i-1}; state: (batch, H) s_{i-1}; mask: (batch, src_len) true on real tokens.
        Returns logits (batch, vocab), s_i (batch, H) and the attention weights α_i (batch, src_len).
        """
        embedded = self.dropout(self.embedding(prev_token))  # (batch, emb)
        context, weights = self.attention(state, keys, memory, mask)
        next_state = self.cell(torch.cat([embedded, context], dim=-1), state)
        readout = torch.tanh(self.readout(torch.cat([next_state, context, embedded], dim=-1)))
        logits = self.dropout(readout) @ self.embedding.weight.t() + self.out_bias
        return logits, next_state, weights

    def forward(
        self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding: logits (batch, tgt_len, vocab) and attention (batch, tgt_len, src_len)."""
        memory, keys, state = self.encode(src, lengths)
        mask = src != self.cfg.pad_id
        all_logits, all_weights = [], []
        for i in range(tgt_in.size(1)):
            logits, state, weights = self.step(tgt_in[:, i], state, memory, keys, mask)
            all_logits.append(logits)
            all_weights.append(weights)
        return torch.stack(all_logits, 1), torch.stack(all_weights, 1)

    @torch.no_grad()
    def greedy(
        self, src: torch.Tensor, lengths: torch.Tensor, max_len: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding of a batch; returns each sentence's tokens (without EOS) and attention rows.

        The attention of a sentence has one row per emitted token including the final EOS, as the server does.
        """
        memory, keys, state = self.encode(src, lengths)
        mask = src != self.cfg.pad_id
        batch = src.size(0)
        token = torch.full((batch,), self.cfg.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        steps, step_weights = [], []
        for _ in range(max_len):
            logits, state, weights = self.step(token, state, memory, keys, mask)
            token = logits.argmax(-1)
            steps.append(token)
            step_weights.append(weights)
            done |= token == self.cfg.eos_id
            if bool(done.all()):
                break
        all_tokens = torch.stack(steps, 1).tolist()  # (batch, steps)
        all_weights = torch.stack(step_weights, 1)  # (batch, steps, src_len)
        tokens, rows = [], []
        for b, seq in enumerate(all_tokens):
            n = seq.index(self.cfg.eos_id) if self.cfg.eos_id in seq else len(seq)
            tokens.append(seq[:n])
            rows.append(all_weights[b, : min(n + 1, len(seq))])
        return tokens, rows
