"""Transformer encoder–decoder (Vaswani et al. 2017), in the split of the Annotated Transformer.

Multi-head scaled dot-product attention ``softmax(Q Kᵀ / √d_k) V`` per head, self-attention in the encoder,
causal self-attention and cross-attention over the encoder output in the decoder, position-wise feed-forward layers,
sinusoidal positions ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(…)``. Layers are pre-norm
(``x + sublayer(LayerNorm(x))``, a final LayerNorm per stack), which trains without a long warm-up on small data.
Source and target share the (joint SentencePiece) embedding, scaled by √d, and the output layer is tied to it.

Incremental decoding: :meth:`Transformer.step` runs one target position through the decoder, appending the new
self-attention keys and values of every layer to a cache. The cache is decoder state, and so is the position
counter; the cross-attention keys and values of the encoder output are computed once per sentence
(:meth:`Transformer.start`) and fed unchanged. :meth:`Transformer.forward` (teacher forcing, all positions at once)
runs the very same layers with an empty cache and a causal mask, so the step and the full-sequence decoder agree.

The alignment returned with every token is the cross-attention of one layer (``align_layer``), averaged over heads
or of one head (``align_head``); the step also returns every layer's and head's cross-attention
(batch, layers, heads, src_len), which the export exposes as an extra output for per-request selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from training.models.attention import masked_softmax
from training.models.decoding import GROWING_AXIS, DecoderInterface, Shape, greedy

State = dict[str, torch.Tensor]


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 256
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    ff_dim: int = 1024
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    align_layer: int = -1  # whose cross-attention is the alignment; -1 = the last decoder layer
    align_head: int = -1  # that head's weights; -1 = the mean over heads


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.d_k = heads, d_model // heads
        self.W_q = nn.Linear(d_model, d_model)
        self.W_k = nn.Linear(d_model, d_model)
        self.W_v = nn.Linear(d_model, d_model)
        self.W_o = nn.Linear(d_model, d_model)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, len, d_model) each; cached or precomputed, heads still merged (batch first)."""
        return self.W_k(x), self.W_v(x)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.d_k).transpose(1, 2)  # (batch, heads, len, d_k)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        query: (batch, q_len, d_model); keys, values: (batch, k_len, d_model) from :meth:`project_kv`
        mask: broadcastable to (batch, heads, q_len, k_len), true where attending is allowed; None = everywhere
        returns context (batch, q_len, d_model) and weights (batch, heads, q_len, k_len), rows summing to 1
        """
        q = self._split(self.W_q(query))
        scores = q @ self._split(keys).transpose(-1, -2) / math.sqrt(self.d_k)
        weights = torch.softmax(scores, dim=-1) if mask is None else masked_softmax(scores, mask)
        context = (weights @ self._split(values)).transpose(1, 2).flatten(2)
        return self.W_o(context), weights


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads)
        self.ff = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (batch, src_len, d_model); mask: (batch, 1, 1, src_len) true on real tokens."""
        h = self.norm1(x)
        context, _ = self.self_attn(h, *self.self_attn.project_kv(h), mask)
        x = x + self.dropout(context)
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.heads)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.heads)
        self.ff = FeedForward(cfg.d_model, cfg.ff_dim, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, cross_k: torch.Tensor,
        cross_v: torch.Tensor, src_mask: torch.Tensor, causal: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        x: (batch, new, d_model) the new target positions; past_k, past_v: (batch, past, d_model) their cache
        cross_k, cross_v: (batch, src_len, d_model); src_mask: (batch, 1, 1, src_len)
        causal: (new, past + new) for several new positions, None for one (it may see the whole cache)
        returns x, the grown cache (batch, past + new, d_model) ×2, cross weights (batch, heads, new, src_len)
        """
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        context, _ = self.self_attn(h, k, v, causal)
        x = x + self.dropout(context)
        context, cross = self.cross_attn(self.norm2(x), cross_k, cross_v, src_mask)
        x = x + self.dropout(context)
        x = x + self.dropout(self.ff(self.norm3(x)))
        return x, k, v, cross


class Transformer(nn.Module):
    inv_freq: torch.Tensor  # 10000^(-2i/d), a buffer

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if not -cfg.decoder_layers <= cfg.align_layer < cfg.decoder_layers:
            raise ValueError(f"align_layer {cfg.align_layer} is not a layer of {cfg.decoder_layers}")
        if not -1 <= cfg.align_head < cfg.heads:
            raise ValueError(f"align_head {cfg.align_head} is not -1 (mean) or a head of {cfg.heads}")
        self.cfg = cfg
        d = cfg.d_model
        self.embedding = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embedding.weight, std=d**-0.5)  # tied: the output layer sees it unscaled
        with torch.no_grad():
            self.embedding.weight[cfg.pad_id].zero_()
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.dropout = nn.Dropout(cfg.dropout)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("embedding"):
                nn.init.xavier_uniform_(p)
        self.register_buffer("inv_freq", 10000 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d), persistent=False)

    @property
    def align_layer(self) -> int:
        return self.cfg.align_layer % self.cfg.decoder_layers

    def positional(self, positions: torch.Tensor) -> torch.Tensor:
        """Sinusoidal encodings (…, d_model) of integer positions (…), sin on even and cos on odd dimensions."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (…, d_model / 2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(tokens) * math.sqrt(self.cfg.d_model) + self.positional(positions))

    def alignment(self, cross: torch.Tensor) -> torch.Tensor:
        """The served alignment from all cross-attention (batch, layers, heads, …, src_len): one layer, mean or one
        head."""
        layer = cross[:, self.align_layer]
        return layer.mean(1) if self.cfg.align_head < 0 else layer[:, self.cfg.align_head]

    # -- the decoder's interface, as the export and greedy decoding see it ----------------------------------------

    def decoder_interface(self) -> DecoderInterface:
        d, n = self.cfg.d_model, self.cfg.decoder_layers
        static: dict = {}
        state: dict = {"position": ("int64", [])}
        for i in range(n):
            static |= {f"cross_k_{i}": ("float32", ["src_len", d]), f"cross_v_{i}": ("float32", ["src_len", d])}
            state |= {f"self_k_{i}": ("float32", [GROWING_AXIS, d]), f"self_v_{i}": ("float32", [GROWING_AXIS, d])}
        extra: dict[str, Shape] = {"cross_attention": ("float32", [n, self.cfg.heads, "src_len"])}
        return DecoderInterface(static=static, state=state, extra_outputs=extra)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (batch, src_len) -> memory (batch, src_len, d_model) and the mask (batch, src_len)."""
        counts = torch.ones_like(src).cumsum(-1)  # 1, 2, …: keeps src_len dynamic in ONNX
        mask = counts <= lengths[:, None]
        x = self.embed(src, counts - 1)
        for layer in self.encoder_layers:
            x = layer(x, mask[:, None, None, :])
        return self.encoder_norm(x), mask

    def start(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[State, State]:
        """(static decoder inputs: each layer's cross-attention keys and values, initial state: position 0 and empty
        self-attention caches (batch, 0, d_model)), named as in :meth:`decoder_interface`."""
        memory, _ = self.encode(src, lengths)
        static: State = {}
        state: State = {"position": torch.zeros_like(lengths)}
        empty = memory[:, :0]
        for i, layer in enumerate(self.decoder_layers):
            static[f"cross_k_{i}"], static[f"cross_v_{i}"] = cast(DecoderLayer, layer).cross_attn.project_kv(memory)
            state[f"self_k_{i}"], state[f"self_v_{i}"] = empty, empty
        return static, state

    def _decode(
        self, x: torch.Tensor, state: State, static: State, mask: torch.Tensor, causal: torch.Tensor | None
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """The decoder stack on new positions x (batch, new, d_model): logits (batch, new, vocab), the grown caches
        and all cross-attention (batch, layers, heads, new, src_len)."""
        src_mask = mask[:, None, None, :]
        caches: State = {}
        crosses = []
        for i, layer in enumerate(self.decoder_layers):
            x, caches[f"self_k_{i}"], caches[f"self_v_{i}"], cross = layer(
                x, state[f"self_k_{i}"], state[f"self_v_{i}"], static[f"cross_k_{i}"], static[f"cross_v_{i}"],
                src_mask, causal,
            )
            crosses.append(cross)
        logits = nn.functional.linear(self.dropout(self.decoder_norm(x)), self.embedding.weight, self.out_bias)
        return logits, caches, torch.stack(crosses, dim=1)

    def step(
        self, prev_token: torch.Tensor, state: State, static: State, mask: torch.Tensor
    ) -> tuple[torch.Tensor, State, torch.Tensor, State]:
        """One decoder step: prev_token (batch,), the state from :meth:`start` or the previous step, mask
        (batch, src_len). Returns logits (batch, vocab), the next state, the alignment (batch, src_len) and
        ``{"cross_attention": (batch, layers, heads, src_len)}``."""
        position = state["position"]
        x = self.embed(prev_token[:, None], position[:, None])  # (batch, 1, d_model)
        logits, caches, cross = self._decode(x, state, static, mask, None)
        cross = cross[:, :, :, 0]  # (batch, layers, heads, src_len)
        return logits[:, 0], {"position": position + 1, **caches}, self.alignment(cross), {"cross_attention": cross}

    named_step = step

    def forward(
        self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing, all positions at once: logits (batch, tgt_len, vocab), alignment (batch, tgt_len,
        src_len)."""
        static, state = self.start(src, lengths)
        steps = tgt_in.size(1)
        positions = torch.arange(steps, device=src.device).expand_as(tgt_in)
        causal = torch.ones(steps, steps, dtype=torch.bool, device=src.device).tril()
        logits, _, cross = self._decode(self.embed(tgt_in, positions), state, static, src != self.cfg.pad_id, causal)
        return logits, self.alignment(cross)

    @torch.no_grad()
    def greedy(
        self, src: torch.Tensor, lengths: torch.Tensor, max_len: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding with the cache; each sentence's tokens (without EOS) and attention rows (EOS included)."""
        return greedy(self, src, lengths, max_len)
