"""Session fixtures: a tiny translation model trained and exported inside the test run (no network, no hub)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
DING_SAMPLE = FIXTURES / "ding-sample.txt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few dozen steps of a small Bahdanau model on the Ding fixture: enough to exercise every path."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = TrainConfig(
        data=f"ding:{DING_SAMPLE}", out=str(out), vocab_size=400, emb_dim=32, hidden_dim=48, attn_dim=32,
        max_steps=40, valid_every=1000, valid_bleu_sample=20, max_tokens=2000, threads=1,
    )
    return train(cfg)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A models directory laid out as the server reads it: ``<dir>/tiny-de-en/1/``."""
    from exporter.export import ExportOptions, export

    root = tmp_path_factory.mktemp("models")
    logging.getLogger("root").setLevel(logging.WARNING)
    export(tiny_checkpoint, root / "tiny-de-en" / "1", ExportOptions(name="tiny-de-en", parity_sentences=40, int8=True))
    return root


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Show-Attend-Tell model, a few dozen steps on generated scenes: enough to exercise every path."""
    from training.caption_train import CaptionTrainConfig
    from training.caption_train import train as train_captioner

    out = tmp_path_factory.mktemp("tiny-caption-run")
    cfg = CaptionTrainConfig(
        out=str(out), train_images=300, valid_images=20, test_images=30, width=8, feature_dim=16, emb_dim=16,
        hidden_dim=32, attn_dim=16, batch_size=16, lr=0.003, max_steps=40, valid_every=1000, valid_bleu_sample=20,
        device="cpu", lstm_reads_context=False, alpha_reg=0.005,  # as the bundled model
    )
    return train_captioner(cfg)


@pytest.fixture(scope="session")
def caption_models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_captioner: Path) -> Path:
    """A models directory holding the tiny captioner, exported as ``<dir>/tiny-scenes/1/``."""
    from exporter.caption_export import CaptionExportOptions, export_captioner

    root = tmp_path_factory.mktemp("caption-models")
    pictures = tmp_path_factory.mktemp("caption-docs")
    export_captioner(tiny_captioner, root / "tiny-scenes" / "1", CaptionExportOptions(
        name="tiny-scenes", parity_sentences=20, target_language="en", overlays=pictures))
    return root


# Every attention variant `attn-train translation` can build (issue 5), by its --attention name (or "transformer").
VARIANTS = ("bahdanau", "luong-dot", "luong-general", "luong-concat", "local-m", "local-p", "none", "transformer")


@pytest.fixture(scope="session")
def tiny_variant(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_variant(name)``: the best.pt of a tiny model of that variant, trained once per session through the
    `attn-train translation` command line for a dozen steps on the Ding fixture (enough for export and serving)."""
    from training.cli import main as train_main

    built: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in built:
            out = tmp_path_factory.mktemp(f"tiny-{variant}-run")
            model = ["--arch", "transformer", "--layers", "2", "--heads", "4"] if variant == "transformer" else [
                "--attention", variant, "--window", "3"]
            assert train_main([
                "translation", "--data", f"ding:{DING_SAMPLE}", "--out", str(out), "--vocab-size", "400",
                "--emb-dim", "32", "--hidden-dim", "48", "--attn-dim", "32", "--max-steps", "12",
                "--valid-every", "1000", "--valid-bleu-sample", "10", "--max-tokens", "1000", "--device", "cpu",
                "--threads", "1",
                *model,
            ]) == 0
            built[variant] = out / "best.pt"
        return built[variant]

    return build


@pytest.fixture(scope="session")
def variant_models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_variant: Callable[[str], Path]) -> Path:
    """A models directory with every variant exported as ``<dir>/tiny-<variant>/1/`` (for serving tests)."""
    from exporter.export import ExportOptions, export

    root = tmp_path_factory.mktemp("variant-models")
    for variant in VARIANTS:
        export(tiny_variant(variant), root / f"tiny-{variant}" / "1",
               ExportOptions(name=f"tiny-{variant}", parity_sentences=20))
    return root
