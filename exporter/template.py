"""The export flow every model family shares, written once, in the manner of CTranslate2's ``Converter``.

:meth:`ModelExporter.run` holds the steps and their order, which is what the exporter promises the server; a family
(translation in exporter/export.py, captioning in exporter/caption_export.py) fills in what differs: its model, its
graphs, how parity is measured, its manifest, its variants and its card.

Everything is written to a staging directory first; only graphs that pass ``onnx.checker`` and the parity check are
moved into place, so a failed export never leaves a half-written model where the server would load it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import onnx
import sentencepiece as spm

from exporter.parity import ParityReport
from server.artifacts import Manifest
from training import checkpoint

EXPORTER_VERSION = "0.1.0"
log = logging.getLogger("attn.export")

Model = TypeVar("Model")


class ParityError(RuntimeError):
    """The exported graphs do not reproduce PyTorch; nothing was written."""


@dataclass
class ExportOptions:
    name: str
    version: str = "1"
    parity_sentences: int = 500
    int8: bool = False
    fp16: bool = False
    source_language: str = "de"
    target_language: str = "en"
    metrics_file: Path | None = None  # JSON written by `attn-train evaluate`
    force: bool = False
    command: str = ""


def training_section(payload: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``training`` section: how the checkpoint was made."""
    keys = ("data", "progress", "best")
    section = {k: payload[k] for k in keys}
    section.update(config=payload["train_config"], model_config=payload["model_config"],
                   hardware=payload.get("hardware", ""))
    return section


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A staging directory that replaces ``out`` only when the block completes; removed whatever happens.

    A failed export (parity, checker, anything) therefore never leaves a half-written model where the server would
    load it, nor a staging directory behind.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ModelExporter(ABC, Generic[Model]):
    """One checkpoint of a family, loaded and built; :meth:`run` exports it, calling the family's methods.

    What a family's parity check loads (the ONNX Runtime sessions, the held-out data) it keeps on ``self`` for its
    variants and its card, which decode with it again.
    """

    kind: ClassVar[str]  # the checkpoint kind `training.checkpoint.load` insists on
    encoder_file: ClassVar[str]
    decoder_file: ClassVar[str] = "decoder_step.onnx"

    def __init__(self, checkpoint_path: Path, options: ExportOptions) -> None:
        self.options = options
        self.payload = checkpoint.load(checkpoint_path, kind=self.kind)
        self.model = self.build_model(self.payload)
        self.tokenizer = bytes(self.payload["tokenizer"])
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)

    def run(self, out: Path) -> Manifest:
        """Write the model version folder ``out`` (replacing one only with ``options.force``); its manifest."""
        with staged(out, self.options.force) as staging:
            started = time.monotonic()
            (staging / "spm.model").write_bytes(self.tokenizer)
            encoder, decoder = staging / self.encoder_file, staging / self.decoder_file
            self.write_graphs(encoder, decoder)
            for graph in (encoder, decoder):
                onnx.checker.check_model(str(graph), full_check=True)
            report = self.parity(encoder, decoder)
            log.info("parity: %s", report.as_dict())
            if not report.passed:
                raise ParityError(f"parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")
            manifest = self.manifest(report)
            self.write_variants(staging, manifest)
            if self.options.metrics_file:
                manifest.metrics["evaluation"] = json.loads(Path(self.options.metrics_file).read_text(encoding="utf-8"))
            manifest.training["export_seconds"] = round(time.monotonic() - started, 1)
            manifest.save(staging)
            Manifest.load(staging)  # the server's own validation, before anything is moved into place
            self.write_card(staging, manifest, out)
        return manifest

    @abstractmethod
    def build_model(self, payload: dict[str, Any]) -> Model:
        """The PyTorch model of the checkpoint ``payload``."""

    @abstractmethod
    def write_graphs(self, encoder: Path, decoder: Path) -> None:
        """Export the encoder and the decoder step to these files."""

    @abstractmethod
    def parity(self, encoder: Path, decoder: Path) -> ParityReport:
        """Decode held-out inputs through the written graphs and with PyTorch, and compare."""

    @abstractmethod
    def manifest(self, report: ParityReport) -> Manifest:
        """The manifest of the checked graphs, with ``report`` as its parity section."""

    def write_variants(self, staging: Path, manifest: Manifest) -> None:
        """Write the variants ``options`` ask for beside the graphs and record them in ``manifest``; none by
        default."""

    @abstractmethod
    def write_card(self, staging: Path, manifest: Manifest, out: Path) -> None:
        """The model card, ``README.md``, in ``staging``; ``out`` is where the folder will be (for relative links)."""
