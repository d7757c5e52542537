"""Parity of the exported graphs with PyTorch: identical greedy tokens, attention within a tolerance.

The ONNX side is driven the way the server drives it (encoder once, then decoder steps over numpy arrays) but by a
loop of its own: the exporter does not depend on the server's search code, only on the manifest schema. Like the
server, the loop knows no tensor names: the manifest's :class:`DecoderBinding` says which encoder outputs are static
decoder inputs, which are the initial state, and which step output replaces each state entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from server.artifacts import DecoderBinding
from training.batching import pad
from training.evaluate import max_target_len
from training.models import decoding

ATTENTION_TOLERANCE = 1e-4
# The fp16 variant (exporter/fp16.py) passes with 95% of its greedy outputs identical to PyTorch fp32 and attention
# within 1e-2 on those. Rounding to fp16 legitimately flips near-ties between the two best tokens, after which a
# sentence goes its own way (the bundled de-en model: 149 of 150 identical, attention within 2e-4); a broken
# conversion (an overflow to inf, a wrong cast) changes most sentences, or the attention by far more.
FP16_ATTENTION_TOLERANCE = 1e-2
FP16_TOKEN_AGREEMENT = 0.95


def greedy_loop(step: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], batch: int, bos_id: int, eos_id: int,
                max_steps: int, banned: Sequence[int] = ()) -> tuple[list[list[int]], list[np.ndarray]]:
    """:func:`training.models.decoding.greedy_loop` over a numpy step (previous tokens → log-probabilities,
    attention; the closure keeps the state), so that the graphs are checked by the very loop PyTorch decodes with."""

    def torch_step(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, weights = step(token.numpy())
        return torch.from_numpy(log_probs), torch.from_numpy(weights)

    tokens, rows = decoding.greedy_loop(torch_step, batch, bos_id, eos_id, max_steps, torch.device("cpu"), banned)
    return tokens, [row.numpy() for row in rows]


@dataclass
class OnnxGreedy:
    """Greedy decoding through the exported encoder and decoder step on ONNX Runtime's CPU provider."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    binding: DecoderBinding
    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def load(
        cls, encoder: Path, decoder: Path, binding: DecoderBinding, bos_id: int, eos_id: int, pad_id: int,
        threads: int = 0,
    ) -> OnnxGreedy:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        return cls(
            ort.InferenceSession(str(encoder), options, providers=providers),
            ort.InferenceSession(str(decoder), options, providers=providers),
            binding, bos_id, eos_id, pad_id,
        )

    def __call__(self, batch: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
        bind = self.binding
        src = pad(batch, self.pad_id).numpy()
        lengths = np.array([len(s) for s in batch], dtype=np.int64)
        wanted = [*bind.static_inputs, *bind.state]
        encoded = dict(zip(wanted, self.encoder.run(wanted, {"src_ids": src, "src_lengths": lengths})))
        static = {name: encoded[name] for name in bind.static_inputs}
        static[bind.mask_input] = src != self.pad_id
        state = {name: encoded[name] for name in bind.state}
        fetch = [bind.log_probs_output, bind.attention_output, *bind.state.values()]

        def step(token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal state
            log_probs, weights, *next_state = self.decoder.run(fetch, {bind.token_input: token, **state, **static})
            state = dict(zip(bind.state, next_state))
            return log_probs, weights

        tokens, rows = greedy_loop(step, len(batch), self.bos_id, self.eos_id, max_target_len(src.shape[1]),
                                   decoding.never_generated(self.pad_id, self.bos_id, self.eos_id))
        return tokens, [r[:, : len(b)] for r, b in zip(rows, batch)]


@dataclass
class ParityReport:
    sentences: int = 0
    identical_tokens: int = 0
    max_attention_diff: float = 0.0  # over the sentences whose tokens are identical
    mismatches: list[dict[str, object]] = field(default_factory=list)
    tolerance: float = ATTENTION_TOLERANCE
    agreement: float = 1.0  # the share of sentences whose greedy tokens must be identical

    @property
    def passed(self) -> bool:
        # Over no sentences every bar holds vacuously, and a parity check that checked nothing passes nothing.
        return (self.sentences > 0 and self.identical_tokens >= self.agreement * self.sentences
                and self.max_attention_diff <= self.tolerance)

    def add(self, torch_tokens: list[int], onnx_tokens: list[int], torch_rows: np.ndarray, onnx_rows: np.ndarray,
            mismatch: dict[str, object]) -> None:
        """One decoded input of the check: its greedy tokens and attention rows both ways; ``mismatch`` says which
        input it was, for the report of one whose tokens differ."""
        self.sentences += 1
        if torch_tokens != onnx_tokens:
            if len(self.mismatches) < 5:
                self.mismatches.append({**mismatch, "torch": torch_tokens, "onnx": onnx_tokens})
            return
        self.identical_tokens += 1
        # Rows of another shape are no parity, though numpy would broadcast one column against every source token.
        diff = float(np.abs(torch_rows - onnx_rows).max()) if torch_rows.shape == onnx_rows.shape else np.inf
        # NaN attention is no alignment at all; and max(0.0, nan) is 0.0, which would pass it silently.
        self.max_attention_diff = max(self.max_attention_diff, np.inf if np.isnan(diff) else diff)

    def as_dict(self) -> dict[str, object]:
        report: dict[str, object] = {
            "sentences": self.sentences,
            "identical_greedy_tokens": self.identical_tokens,
            "max_attention_abs_diff": float(f"{self.max_attention_diff:.3g}"),
            "attention_tolerance": self.tolerance,
        }
        if self.agreement < 1.0:
            report["token_agreement"] = round(self.identical_tokens / max(self.sentences, 1), 4)
            report["required_token_agreement"] = self.agreement
        return report | {"passed": self.passed}


def check(
    model: Any, onnx: OnnxGreedy, sources: Sequence[Sequence[int]], batch_size: int = 64,
    tolerance: float = ATTENTION_TOLERANCE, agreement: float = 1.0,
) -> ParityReport:
    """Greedy-decode ``sources`` (token ids ending in EOS) both ways and compare; ``tolerance`` and ``agreement``
    are the bar (:class:`ParityReport`)."""
    report = ParityReport(tolerance=tolerance, agreement=agreement)
    model.eval()
    for start in range(0, len(sources), batch_size):
        batch = sources[start : start + batch_size]
        src = pad(batch, model.cfg.pad_id)
        lengths = torch.tensor([len(s) for s in batch])
        torch_tokens, torch_rows = model.greedy(src, lengths, max_target_len(src.size(1)))
        onnx_tokens, onnx_rows = onnx(batch)
        for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens)):
            report.add(a, b, torch_rows[i][:, : len(batch[i])].numpy(), onnx_rows[i], {"source_ids": list(batch[i])})
    return report
