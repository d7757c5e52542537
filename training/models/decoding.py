"""Greedy decoding over a model's own ``step``, shared by every translation model family.

The loop only chooses tokens; the step (and its state) belongs to the model, so there is still one decoding step
per model. The attention of a sentence has one row per emitted token including the final EOS, as the server does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# step(prev_token (batch,)) -> logits (batch, vocab), attention (batch, src_len); the closure keeps the state.
GreedyStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def never_generated(pad_id: int, bos_id: int, eos_id: int) -> list[int]:
    """The ids a translation never emits, as server/runtime.py bans them in its search: padding and the start
    token. An undertrained model can rank BOS first; decoded here it would score a translation (evaluate, the
    export's parity check and card) that the server never gives."""
    return sorted({pad_id, bos_id} - {eos_id})


def greedy_loop(
    step: GreedyStep, batch: int, bos_id: int, eos_id: int, max_len: int, device: torch.device,
    banned: Sequence[int] = (),
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each sentence's tokens (without EOS) and attention rows (tokens + 1 or all steps, src_len); ``banned`` ids
    are never chosen."""
    token = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps, step_weights = [], []
    for _ in range(max_len):
        logits, weights = step(token)
        if banned:
            logits = logits.clone()
            logits[:, list(banned)] = -torch.inf
        token = logits.argmax(-1)
        steps.append(token)
        step_weights.append(weights)
        done |= token == eos_id
        if bool(done.all()):
            break
    all_tokens = torch.stack(steps, 1).tolist()  # (batch, steps)
    all_weights = torch.stack(step_weights, 1)  # (batch, steps, src_len)
    tokens, rows = [], []
    for b, seq in enumerate(all_tokens):
        n = seq.index(eos_id) if eos_id in seq else len(seq)
        tokens.append(seq[:n])
        rows.append(all_weights[b, : min(n + 1, len(seq))])
    return tokens, rows


# What the exported graphs of a model look like, in the model's own terms (the exporter turns it into TensorSpecs):
# exported name -> (dtype, shape after the batch axis). A state axis named GROWING_AXIS grows by one every step
# (a key/value cache): the encoder returns it with length 0 and the step returns it one longer.
GROWING_AXIS = "past_len"
Shape = tuple[str, list[str | int]]


@dataclass
class DecoderInterface:
    static: dict[str, Shape]  # encoder outputs fed unchanged to every step
    state: dict[str, Shape]  # encoder outputs that are the initial state; the step returns "next_" + name
    extra_outputs: dict[str, Shape] = field(default_factory=dict)  # more step outputs (all heads' attention)


def greedy(model: Any, src: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[
        list[list[int]], list[torch.Tensor]]:
    """Greedy decoding through ``model.start`` and ``model.named_step``, which the exported graphs also wrap."""
    static, state = model.start(src, lengths)
    mask = src != model.cfg.pad_id

    def step(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal state
        logits, state, weights, _ = model.named_step(token, state, static, mask)
        return logits, weights

    cfg = model.cfg
    return greedy_loop(step, src.size(0), cfg.bos_id, cfg.eos_id, max_len, src.device,
                       never_generated(cfg.pad_id, cfg.bos_id, cfg.eos_id))
