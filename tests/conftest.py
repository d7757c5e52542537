"""Session fixtures: a tiny translation model trained and exported inside the test run (no network, no hub)."""

from __future__ import annotations

import logging
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
        max_steps=40, valid_every=1000, valid_bleu_sample=20, max_tokens=2000,
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
