"""The two exported graphs of a translation model, as thin wrappers around the model's own methods.

Both call the training code (``model.start`` = the encoder and the decoder's initial state, ``model.named_step`` =
the model's one decoding step), never a copy of it: a second hand-written decoding step is how exported models
silently drift from the trained ones.

The tensors are named by the model's :class:`~training.models.decoding.DecoderInterface`, which is also the manifest
binding: the encoder returns the static decoder inputs and the initial state under the decoder's input names; the
step returns ``next_`` + name for every state entry. Inputs of the step: ``prev_token``, the state, the static inputs,
``src_mask``; outputs: ``log_probs``, the next state, ``attention``, then any extra outputs (all heads' attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from server.artifacts import DecoderBinding, TensorSpec
from training.models.decoding import GROWING_AXIS, Shape

ENCODER_INPUTS = [
    TensorSpec("src_ids", "int64", ["batch", "src_len"]),
    TensorSpec("src_lengths", "int64", ["batch"]),
]
GROWN_AXIS = f"{GROWING_AXIS}_plus_1"  # a cache axis after the step has appended one position


def _spec(name: str, shape: Shape, growing: str | int = GROWING_AXIS) -> TensorSpec:
    dtype, dims = shape
    return TensorSpec(name, dtype, ["batch", *(growing if d == GROWING_AXIS else d for d in dims)])


def encoder_outputs(model: Any) -> list[TensorSpec]:
    """The static decoder inputs, then the initial state (caches start empty)."""
    iface = model.decoder_interface()
    return [_spec(n, s) for n, s in iface.static.items()] + [_spec(n, s, 0) for n, s in iface.state.items()]


def decoder_inputs(model: Any) -> list[TensorSpec]:
    iface = model.decoder_interface()
    return [
        TensorSpec("prev_token", "int64", ["batch"]),
        *(_spec(n, s) for n, s in iface.state.items()),
        *(_spec(n, s) for n, s in iface.static.items()),
        TensorSpec("src_mask", "bool", ["batch", "src_len"]),
    ]


def decoder_outputs(model: Any) -> list[TensorSpec]:
    iface = model.decoder_interface()
    return [
        TensorSpec("log_probs", "float32", ["batch", model.cfg.vocab_size]),
        *(_spec(f"next_{n}", s, GROWN_AXIS) for n, s in iface.state.items()),
        TensorSpec("attention", "float32", ["batch", "src_len"]),
        *(_spec(n, s) for n, s in iface.extra_outputs.items()),
    ]


def decoder_binding(model: Any) -> DecoderBinding:
    iface = model.decoder_interface()
    return DecoderBinding(
        token_input="prev_token", mask_input="src_mask", static_inputs=list(iface.static),
        state={name: f"next_{name}" for name in iface.state}, log_probs_output="log_probs",
        attention_output="attention",
    )


class EncoderGraph(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        static, state = self.model.start(src_ids, src_lengths)
        return (*static.values(), *state.values())


class DecoderStepGraph(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        iface = model.decoder_interface()
        self.state_names, self.static_names = list(iface.state), list(iface.static)
        self.extra_names = list(iface.extra_outputs)

    def forward(self, prev_token: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """prev_token, then the state, the static inputs and the source mask, in :func:`decoder_inputs` order."""
        n, m = len(self.state_names), len(self.static_names)
        state = dict(zip(self.state_names, tensors[:n]))
        static = dict(zip(self.static_names, tensors[n : n + m]))
        logits, next_state, weights, extra = self.model.named_step(prev_token, state, static, tensors[n + m])
        return (
            torch.log_softmax(logits, dim=-1), *(next_state[k] for k in self.state_names), weights,
            *(extra[k] for k in self.extra_names),
        )


def _dynamic_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in specs}


def export_graphs(model: Any, encoder_path: str, decoder_path: str, opset: int = 17) -> None:
    """Write ``encoder.onnx`` and ``decoder_step.onnx`` with dynamic batch, length and cache axes."""
    model.eval()
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
        static, state = model.start(src, lengths)
        mask = src != model.cfg.pad_id
        prev = torch.tensor([model.cfg.bos_id] * 2, dtype=torch.long)
        # Traced after one step, so that a growing cache is not empty in the example.
        _, state, _, _ = model.named_step(prev, state, static, mask)
        step = DecoderStepGraph(model)
        args = (prev, *(state[k] for k in step.state_names), *(static[k] for k in step.static_names), mask)
        dec_in, dec_out = decoder_inputs(model), decoder_outputs(model)
        torch.onnx.export(
            step, args, decoder_path,
            input_names=[t.name for t in dec_in], output_names=[t.name for t in dec_out],
            dynamic_axes=_dynamic_axes(dec_in + dec_out), opset_version=opset, dynamo=False,
        )
