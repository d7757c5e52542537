"""The two exported graphs of a Show-Attend-Tell captioner, as thin wrappers around the model's own methods.

``image_encoder.onnx``: a normalised image tensor → the annotation grid, its projected keys and the initial state.
``decoder_step.onnx``: one call of :meth:`ShowAttendTell.step` → log-probabilities, the next state and the
attention over the grid. Neither re-implements anything of the model.
"""

from __future__ import annotations

import torch
from torch import nn

from server.artifacts import TensorSpec
from training.models.caption import ShowAttendTell

# A grid has no padding: the decoder step takes no mask.
STATE = {"h": "next_h", "c": "next_c"}


def encoder_inputs(model: ShowAttendTell) -> list[TensorSpec]:
    s = model.cfg.image_size
    return [TensorSpec("image", "float32", ["batch", 3, s, s])]


def encoder_outputs(model: ShowAttendTell) -> list[TensorSpec]:
    rows, cols = model.grid()
    D, A, H = model.cfg.feature_dim, model.cfg.attn_dim, model.cfg.hidden_dim
    return [
        TensorSpec("features", "float32", ["batch", rows * cols, D]),
        TensorSpec("keys", "float32", ["batch", rows * cols, A]),
        TensorSpec("h", "float32", ["batch", H]),
        TensorSpec("c", "float32", ["batch", H]),
    ]


def decoder_inputs(model: ShowAttendTell) -> list[TensorSpec]:
    rows, cols = model.grid()
    D, A, H = model.cfg.feature_dim, model.cfg.attn_dim, model.cfg.hidden_dim
    return [
        TensorSpec("prev_token", "int64", ["batch"]),
        TensorSpec("h", "float32", ["batch", H]),
        TensorSpec("c", "float32", ["batch", H]),
        TensorSpec("features", "float32", ["batch", rows * cols, D]),
        TensorSpec("keys", "float32", ["batch", rows * cols, A]),
    ]


def decoder_outputs(model: ShowAttendTell) -> list[TensorSpec]:
    rows, cols = model.grid()
    H = model.cfg.hidden_dim
    return [
        TensorSpec("log_probs", "float32", ["batch", model.cfg.vocab_size]),
        TensorSpec("next_h", "float32", ["batch", H]),
        TensorSpec("next_c", "float32", ["batch", H]),
        TensorSpec("attention", "float32", ["batch", rows * cols]),
    ]


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: ShowAttendTell) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode(image)


class CaptionStepGraph(nn.Module):
    def __init__(self, model: ShowAttendTell) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, prev_token: torch.Tensor, h: torch.Tensor, c: torch.Tensor, features: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, next_h, next_c, weights = self.model.step(prev_token, h, c, features, keys)
        return torch.log_softmax(logits, dim=-1), next_h, next_c, weights


def _dynamic_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in specs}


def export_graphs(model: ShowAttendTell, encoder_path: str, decoder_path: str, opset: int = 17) -> None:
    """Write ``image_encoder.onnx`` and ``decoder_step.onnx`` with a dynamic batch axis (the image size is fixed)."""
    model.eval()
    s = model.cfg.image_size
    image = torch.randn(2, 3, s, s)
    enc_in, enc_out = encoder_inputs(model), encoder_outputs(model)
    dec_in, dec_out = decoder_inputs(model), decoder_outputs(model)
    with torch.no_grad():
        torch.onnx.export(
            ImageEncoderGraph(model).eval(), (image,), encoder_path,
            input_names=[t.name for t in enc_in], output_names=[t.name for t in enc_out],
            dynamic_axes=_dynamic_axes(enc_in + enc_out), opset_version=opset, dynamo=False,
        )
        features, keys, h, c = model.encode(image)
        prev = torch.full((2,), model.cfg.bos_id, dtype=torch.long)
        torch.onnx.export(
            CaptionStepGraph(model).eval(), (prev, h, c, features, keys), decoder_path,
            input_names=[t.name for t in dec_in], output_names=[t.name for t in dec_out],
            dynamic_axes=_dynamic_axes(dec_in + dec_out), opset_version=opset, dynamo=False,
        )
