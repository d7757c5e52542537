"""The two exported graphs of an attention encoder–decoder, as thin wrappers around the model's own methods.

Both call the training code (:meth:`Seq2Seq.encode`, :meth:`Seq2Seq.step`), never a copy of it: a second
hand-written decoding step is how exported models silently drift from the trained ones.
"""

from __future__ import annotations

import torch
from torch import nn

from server.artifacts import TensorSpec
from training.models.rnn import Seq2Seq

ENCODER_INPUTS = [
    TensorSpec("src_ids", "int64", ["batch", "src_len"]),
    TensorSpec("src_lengths", "int64", ["batch"]),
]


def encoder_outputs(model: Seq2Seq) -> list[TensorSpec]:
    H, A = model.cfg.hidden_dim, model.cfg.attn_dim
    return [
        TensorSpec("memory", "float32", ["batch", "src_len", 2 * H]),
        TensorSpec("keys", "float32", ["batch", "src_len", A]),
        TensorSpec("state", "float32", ["batch", H]),
    ]


def decoder_inputs(model: Seq2Seq) -> list[TensorSpec]:
    H, A = model.cfg.hidden_dim, model.cfg.attn_dim
    return [
        TensorSpec("prev_token", "int64", ["batch"]),
        TensorSpec("state", "float32", ["batch", H]),
        TensorSpec("memory", "float32", ["batch", "src_len", 2 * H]),
        TensorSpec("keys", "float32", ["batch", "src_len", A]),
        TensorSpec("src_mask", "bool", ["batch", "src_len"]),
    ]


def decoder_outputs(model: Seq2Seq) -> list[TensorSpec]:
    return [
        TensorSpec("log_probs", "float32", ["batch", model.cfg.vocab_size]),
        TensorSpec("next_state", "float32", ["batch", model.cfg.hidden_dim]),
        TensorSpec("attention", "float32", ["batch", "src_len"]),
    ]


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode(src_ids, src_lengths)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        prev_token: torch.Tensor,
        state: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        src_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, next_state, weights = self.model.step(prev_token, state, memory, keys, src_mask)
        return torch.log_softmax(logits, dim=-1), next_state, weights


def _dynamic_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in specs}


def export_graphs(model: Seq2Seq, encoder_path: str, decoder_path: str, opset: int = 17) -> None:
    """Write ``encoder.onnx`` and ``decoder_step.onnx`` with dynamic batch and length axes."""
    model.eval()
    H = model.cfg.hidden_dim
    # Example inputs of batch 2 with unequal lengths, so that padding paths are traced.
    src = torch.tensor([[5, 6, 7, model.cfg.eos_id], [8, model.cfg.eos_id, 0, 0]], dtype=torch.long)
    lengths = torch.tensor([4, 2], dtype=torch.long)
    enc_out = encoder_outputs(model)
    with torch.no_grad():
        torch.onnx.export(
            EncoderGraph(model), (src, lengths), encoder_path,
            input_names=[t.name for t in ENCODER_INPUTS], output_names=[t.name for t in enc_out],
            dynamic_axes=_dynamic_axes(ENCODER_INPUTS + enc_out), opset_version=opset, dynamo=False,
        )
        memory, keys, state = model.encode(src, lengths)
        prev = torch.tensor([model.cfg.bos_id] * 2, dtype=torch.long)
        dec_in, dec_out = decoder_inputs(model), decoder_outputs(model)
        torch.onnx.export(
            DecoderStepGraph(model), (prev, state, memory, keys, src != model.cfg.pad_id), decoder_path,
            input_names=[t.name for t in dec_in], output_names=[t.name for t in dec_out],
            dynamic_axes=_dynamic_axes(dec_in + dec_out), opset_version=opset, dynamo=False,
        )
    assert state.shape[-1] == H
