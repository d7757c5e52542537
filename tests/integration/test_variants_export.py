"""Every attention variant: trained by the one command, exported with the parity check, driven by its manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter.parity import OnnxGreedy
from server.artifacts import Manifest
from tests.conftest import VARIANTS
from training import checkpoint
from training.models.rnn import Seq2Seq
from training.models.transformer import Transformer
from training.train import TrainConfig, model_config


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_exports_with_parity(variant: str, variant_models_dir: Path) -> None:
    directory = variant_models_dir / f"tiny-{variant}" / "1"
    manifest = Manifest.load(directory)
    p = manifest.parity
    assert p["passed"] and p["identical_greedy_tokens"] == p["sentences"] > 0
    assert p["max_attention_abs_diff"] <= 1e-4
    attention = manifest.attention
    assert attention["uniform"] is (variant == "none")
    if variant == "transformer":
        assert manifest.architecture == "transformer" and attention["type"] == "multihead"
        assert attention["layers"] == 2 and attention["heads"] == 4 and attention["layer"] == 1
        assert attention["head"] == "mean" and attention["all_heads_output"] == "cross_attention"
        assert set(manifest.decoder.state) == {"position", "self_k_0", "self_v_0", "self_k_1", "self_v_1"}
    else:
        assert manifest.architecture == "rnn" and attention["type"] == variant
    card = (directory / "README.md").read_text(encoding="utf-8").splitlines()[2]  # what the model is, in words
    described = {"transformer": "Transformer, ", "none": "no attention", "bahdanau": "Bahdanau's additive attention",
                 "luong-dot": "global attention with the dot score, input feeding",
                 "luong-general": "global attention with the general score, input feeding",
                 "luong-concat": "global attention with the concat score, input feeding",
                 "local-m": "Luong's local-m attention (window", "local-p": "Luong's local-p attention (window"}
    assert described[variant] in card
    # Every state entry starts as the encoder output of the same name and is replaced by a step output.
    enc_out = set(manifest.encoder.output_names())
    dec_out = set(manifest.decoder_step.output_names())
    assert set(manifest.decoder.state) <= enc_out and set(manifest.decoder.state.values()) <= dec_out
    graph = onnx.load(str(directory / "decoder_step.onnx")).graph
    assert [i.name for i in graph.input] == manifest.decoder_step.input_names()
    assert [o.name for o in graph.output] == manifest.decoder_step.output_names()


def test_the_transformer_exposes_every_layer_and_head(
    variant_models_dir: Path, tiny_variant: Callable[[str], Path]
) -> None:
    """The extra step output (batch, layers, heads, src_len) reduces to the served alignment as the manifest says."""
    directory = variant_models_dir / "tiny-transformer" / "1"
    manifest = Manifest.load(directory)
    onnx_model = OnnxGreedy.load(
        directory / "encoder.onnx", directory / "decoder_step.onnx", manifest.decoder, 2, 3, 0
    )
    b = manifest.decoder
    src = np.array([[5, 6, 7, 3], [8, 3, 0, 0]], dtype=np.int64)
    lengths = np.array([4, 2], dtype=np.int64)
    wanted = [*b.static_inputs, *b.state]
    encoded = dict(zip(wanted, onnx_model.encoder.run(wanted, {"src_ids": src, "src_lengths": lengths})))
    feeds = {name: encoded[name] for name in wanted}
    feeds |= {b.mask_input: src != 0, b.token_input: np.array([2, 2], dtype=np.int64)}
    for step in range(3):
        attention, everything, k0 = onnx_model.decoder.run(["attention", "cross_attention", "next_self_k_0"], feeds)
        assert everything.shape == (2, 2, 4, 4) and k0.shape[1] == step + 1
        np.testing.assert_allclose(everything[:, manifest.attention["layer"]].mean(1), attention, atol=1e-6)
        np.testing.assert_allclose(everything.sum(-1), 1.0, atol=1e-5)
        assert (everything[1, ..., 2:] == 0).all()
        outputs = onnx_model.decoder.run(list(b.state.values()), feeds)
        feeds |= dict(zip(b.state, outputs))
    model = checkpoint.build_model(checkpoint.load(tiny_variant("transformer")))
    assert isinstance(model, Transformer)


def test_checkpoints_say_their_architecture(tiny_variant: Callable[[str], Path]) -> None:
    payload = checkpoint.load(tiny_variant("local-p"))
    assert payload["arch"] == "rnn" and payload["model_config"]["attention"] == "local-p"
    model = checkpoint.build_model(payload)
    assert isinstance(model, Seq2Seq) and model.cfg.window == 3
    payload = checkpoint.load(tiny_variant("transformer"))
    assert payload["arch"] == "transformer" and payload["train_config"]["attention"] == "multihead"


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(ValueError, match="attention"):
        model_config(TrainConfig(attention="luong-cosine"), 30)
    with pytest.raises(ValueError, match="multi-head"):
        model_config(TrainConfig(arch="transformer", attention="local-p"), 30)
    with pytest.raises(ValueError, match="arch"):
        model_config(TrainConfig(arch="cnn"), 30)
