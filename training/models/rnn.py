"""RNN encoder–decoders: with additive attention (Bahdanau et al. 2015, "RNNsearch"), with global or local
multiplicative attention (Luong et al. 2015), or without attention (the "RNNencdec" baseline).

Encoder: a bidirectional GRU; the annotation of source word j is ``h_j = [→h_j; ←h_j]``. For Luong attention each
direction has ``hidden_dim / 2`` units, so that annotations and decoder states have the same size (the dot score
needs it); the decoder starts from ``tanh(W ←h_1)`` in every variant.

The variants differ in *when* the decoder asks, and what it does with the answer:

* Bahdanau (``bahdanau``) and no attention (``none``) query with the **previous** state:
  ``c_i = attend(s_{i-1})``, ``s_i = GRU([E y_{i-1}; c_i], s_{i-1})``,
  readout ``t_i = tanh(W_o [s_i; c_i; E y_{i-1}])``.
  Without attention ``c_i`` is the fixed summary ``[→h_S; ←h_1]`` and the returned weights are uniform.
* Luong (``luong-dot|general|concat``, ``local-m``, ``local-p``) queries with the **current** state:
  ``h_t = GRU([E y_{t-1}; h̃_{t-1}], h_{t-1})`` (input feeding; without it just ``E y_{t-1}``), ``c_t = attend(h_t)``,
  ``h̃_t = tanh(W_c [c_t; h_t])``. h̃ has the embedding size so that the output layer can stay tied.

Logits are the readout (``t_i`` or ``h̃_t``) scored against the tied embedding matrix. The decoder state is a dict of
named tensors (``state``, plus ``feed`` = h̃_{t-1} with input feeding, plus ``position`` = t for local-m): the same
names are the exported graphs' state inputs, and ``next_`` + name their outputs.

:meth:`Seq2Seq.step` is the only decoding step: the training loop (through :meth:`Seq2Seq.forward`), greedy
evaluation and the ONNX export all call it, for every variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.models.attention import BahdanauAttention
from training.models.decoding import DecoderInterface, greedy
from training.models.luong import LocalAttention, LuongAttention
from training.models.no_attention import NoAttention

ATTENTIONS = ("bahdanau", "luong-dot", "luong-general", "luong-concat", "local-m", "local-p", "none")
State = dict[str, torch.Tensor]


@dataclass
class Seq2SeqConfig:
    vocab_size: int
    emb_dim: int = 128
    hidden_dim: int = 256
    attn_dim: int = 256  # Bahdanau, concat scores and the local-p position predictor
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    attention: str = "bahdanau"  # one of ATTENTIONS
    input_feeding: bool = True  # Luong variants: feed h̃_{t-1} to the next step
    window: int = 10  # local-m/local-p: the half-width D of the window (the paper's D = 10)
    local_score: str = "general"  # local-m/local-p: the score function inside the window (the paper's choice)


class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, embedding: nn.Embedding, hidden: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.rnn = nn.GRU(cfg.emb_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (batch, src_len); returns memory (batch, src_len, 2*hidden) and ←h_1 (batch, hidden)."""
        embedded = self.dropout(self.embedding(src))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, final = self.rnn(packed)
        memory, _ = pad_packed_sequence(output, batch_first=True, total_length=src.size(1))
        # final: (2, batch, hidden); index 1 is the backward direction, which has read the whole sentence.
        return memory, final[1]


Attention = BahdanauAttention | LuongAttention | LocalAttention | NoAttention


def _attention(cfg: Seq2SeqConfig, H: int, M: int) -> Attention:
    name = cfg.attention
    if name == "bahdanau":
        return BahdanauAttention(H, M, cfg.attn_dim)
    if name == "none":
        return NoAttention()
    if name.startswith("luong-"):
        return LuongAttention(name.removeprefix("luong-"), H, M, cfg.attn_dim)
    return LocalAttention(cfg.local_score, H, M, cfg.attn_dim, cfg.window, predictive=name == "local-p")


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {cfg.attention!r} (choose from {ATTENTIONS})")
        self.cfg = cfg
        H, E = cfg.hidden_dim, cfg.emb_dim
        self.luong = cfg.attention.startswith(("luong-", "local-"))  # queries with h_t, not s_{i-1}
        if self.luong and H % 2:
            raise ValueError(f"Luong attention needs an even hidden_dim (two encoder directions), got {H}")
        enc_hidden = H // 2 if self.luong else H
        M = 2 * enc_hidden  # the size of an annotation
        self.embedding = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, self.embedding, enc_hidden)
        self.init_state = nn.Linear(enc_hidden, H)
        self.attention: Attention = _attention(cfg, H, M)
        if self.luong:
            self.cell = nn.GRUCell(E + (E if cfg.input_feeding else 0), H)
            self.readout = nn.Linear(M + H, E)  # W_c
        else:
            self.cell = nn.GRUCell(E + M, H)
            self.readout = nn.Linear(H + M + E, E)  # W_o
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.dropout = nn.Dropout(cfg.dropout)

    # -- the decoder's interface, as the export and greedy decoding see it ----------------------------------------

    def decoder_interface(self) -> DecoderInterface:
        H, E, M = self.cfg.hidden_dim, self.cfg.emb_dim, self.encoder.rnn.hidden_size * 2
        score = self._score()
        static: dict = {"memory": ("float32", ["src_len", M])}
        if score == "none":
            static = {"keys": ("float32", [M])}  # the summary [→h_S; ←h_1]; the step never reads the memory
        elif score != "dot":  # dot scores the memory itself: no separate keys
            static["keys"] = ("float32", ["src_len", H if score == "general" else self.cfg.attn_dim])
        state: dict = {"state": ("float32", [H])}
        if self.luong and self.cfg.input_feeding:
            state["feed"] = ("float32", [E])
        if self.cfg.attention == "local-m":
            state["position"] = ("int64", [])
        return DecoderInterface(static=static, state=state)

    def _score(self) -> str:
        """additive, dot, general, concat or none: what the keys hold."""
        name = self.cfg.attention
        if not self.luong:
            return "additive" if name == "bahdanau" else "none"
        return name.removeprefix("luong-") if name.startswith("luong-") else self.cfg.local_score

    def start(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[State, State]:
        """(static decoder inputs, initial state), named as in :meth:`decoder_interface`."""
        memory, keys, state = self.encode(src, lengths)
        static = {"memory": memory, "keys": keys}
        return {name: static[name] for name in self.decoder_interface().static}, state

    def named_step(
        self, prev_token: torch.Tensor, state: State, static: State, mask: torch.Tensor
    ) -> tuple[torch.Tensor, State, torch.Tensor, State]:
        """:meth:`step` over named static inputs; returns logits, next state, attention and no extra outputs."""
        memory = static.get("memory")
        keys = static.get("keys", memory)
        logits, next_state, weights = self.step(prev_token, state, memory, keys, mask)  # type: ignore[arg-type]
        return logits, next_state, weights, {}

    # -- the model ---------------------------------------------------------------------------------------------

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Returns memory (batch, src_len, M), keys (what the attention precomputes per source) and the initial
        decoder state: ``state`` s_0 (batch, H), and ``feed`` h̃_0 = 0 (batch, E), ``position`` 0 (batch,)."""
        memory, backward_first = self.encoder(src, lengths)
        mask = torch.ones_like(src).cumsum(-1) <= lengths[:, None]  # (batch, src_len); cumsum keeps ONNX dynamic
        keys = self.attention.project_keys(memory, mask)
        s0 = torch.tanh(self.init_state(backward_first))
        state = {"state": s0}
        if self.luong and self.cfg.input_feeding:
            state["feed"] = s0.new_zeros(s0.size(0), self.cfg.emb_dim)
        if self.cfg.attention == "local-m":
            state["position"] = torch.zeros_like(lengths)
        return memory, keys, state

    def step(
        self,
        prev_token: torch.Tensor,
        state: State,
        memory: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoder step.

        prev_token: (batch,) y_{i-1}; state: the named decoder state; mask: (batch, src_len) true on real tokens.
        Returns logits (batch, vocab), the next state and the attention weights (batch, src_len).
        """
        embedded = self.dropout(self.embedding(prev_token))  # (batch, emb)
        if not self.luong:
            s_prev = state["state"]  # (batch, H)
            context, weights = self.attention(s_prev, keys, memory, mask)
            s = self.cell(torch.cat([embedded, context], dim=-1), s_prev)
            readout = torch.tanh(self.readout(torch.cat([s, context, embedded], dim=-1)))
            next_state = {"state": s}
        else:
            inputs = torch.cat([embedded, state["feed"]], dim=-1) if self.cfg.input_feeding else embedded
            h = self.cell(inputs, state["state"])  # h_t (batch, H)
            if self.cfg.attention == "local-m":
                context, weights = self.attention(h, keys, memory, mask, position=state["position"])
            else:
                context, weights = self.attention(h, keys, memory, mask)
            readout = torch.tanh(self.readout(torch.cat([context, h], dim=-1)))  # h̃_t (batch, E)
            next_state = {"state": h}
            if self.cfg.input_feeding:
                next_state["feed"] = readout
            if self.cfg.attention == "local-m":
                next_state["position"] = state["position"] + 1
        # F.linear rather than `@ weight.t()`: the export then shares the one embedding matrix (no folded copy).
        logits = nn.functional.linear(self.dropout(readout), self.embedding.weight, self.out_bias)
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
        return greedy(self, src, lengths, max_len)
