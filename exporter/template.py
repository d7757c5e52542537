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
import os
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
    """The exported graphs do not reproduce PyTorch, or there was nothing to compare them on; nothing was written."""


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

    def __post_init__(self) -> None:
        # 0 would check nothing (and translation's held-out pool used to read it as "all"): parity needs an input.
        if self.parity_sentences < 1:
            raise ValueError(f"parity_sentences must be at least 1, not {self.parity_sentences}")


def model_folder_names(out: Path) -> tuple[str, str]:
    """(NAME, VERSION) of ``out`` = models/NAME/VERSION, the folder names the server discovers it by
    (server/registry.py ``discover``); ValueError for a path that cannot be a model version folder.

    Read from the path as written: ``.``, ``..``, ``/`` or a bare ``v1`` have no NAME/VERSION of their own, and
    the server skips hidden (dot) folders, so none of those is ever served."""
    out = Path(out)
    for part, value in (("VERSION", out.name), ("NAME", out.parent.name)):
        if value in ("", ".", "..") or value.startswith("."):
            raise ValueError(f"{out} is not a model version folder models/NAME/VERSION: its {part} would be "
                             f"{value!r}, which the server does not serve")
    return out.parent.name, out.name


def is_model_version_folder(path: Path) -> bool:
    """A real folder holding a manifest.json, or an empty folder: the only things an export may replace."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / "manifest.json").is_file() or not any(path.iterdir())


def check_replaceable(out: Path, force: bool) -> None:
    """Raise FileExistsError unless ``out`` is free, or is a model version folder and ``force`` says replace it.

    Whatever ``force`` says, nothing but a model version folder is ever removed: ``--out .`` or ``--out ~`` must not
    empty a working or home directory."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not is_model_version_folder(out):
        raise FileExistsError(f"{out} exists and is not a model version folder (no manifest.json): refusing to "
                              "replace it")
    if not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")


def read_metrics(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The evaluation JSON for the card (``attn-train evaluate --out``), holding ``keys`` (what the family's card
    reads from it); ValueError naming the file otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"metrics file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        # NaN and Infinity are not JSON (attn-train evaluate never writes them), and would reach manifest.json.
        metrics = json.loads(text, parse_constant=_not_a_number)
    except ValueError as exc:  # json.JSONDecodeError, or _not_a_number's
        raise ValueError(f"metrics file {path} is not JSON ({exc}); expected the output of attn-train evaluate") \
            from exc
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics file {path} is not a JSON object; expected the output of attn-train evaluate")
    missing = [key for key in keys if key not in metrics]
    if missing:  # else the card fails on them with a KeyError, at the end of the export
        raise ValueError(f"metrics file {path} has no {', '.join(missing)}; expected the output of attn-train "
                         "evaluate on a checkpoint of this model's family")
    return metrics


def _not_a_number(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


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
    load it, nor a staging directory behind, nor an empty model folder (models/NAME) it made for the version.
    """
    out = Path(out)
    check_replaceable(out, force)
    staging = out.parent / f".{out.name}.staging"
    replaced = out.parent / f".{out.name}.replaced"  # hidden, as the staging folder is: no server loads it
    created = _missing_folders(out.parent)  # models/NAME, when this export is the model's first
    shutil.rmtree(staging, ignore_errors=True)
    aside = False  # whether the version being replaced is renamed to ``replaced``
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as exc:  # a file where a folder of --out should be, a models folder this user cannot write
            raise ValueError(f"cannot write the model version folder {out}: {exc.strerror or exc} "
                             f"({exc.filename})") from None
        yield staging
        check_replaceable(out, force)  # again: the block ran for minutes, and rmtree must only ever meet a model
        shutil.rmtree(replaced, ignore_errors=True)
        if out.exists():
            # Renamed aside, not removed, before the new folder takes its name: removing a large model's files takes
            # a while, and a server looking at the folder meanwhile would find the version gone and retire it.
            out.rename(replaced)
            aside = True
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if aside and not os.path.lexists(out):
            # The new folder did not take the name (an error, or Ctrl-C between the two renames): the old version
            # gets it back rather than going with the new one.
            replaced.rename(out)
        shutil.rmtree(replaced, ignore_errors=True)
        # Still empty only when the export failed: a server scanning the models folder would find a model NAME
        # with no versions. rmdir, not rmtree: a folder another export has written into meanwhile stays.
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def _missing_folders(path: Path) -> list[Path]:
    """The folders of ``path`` (itself and its parents) that do not exist yet, deepest first."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


class ModelExporter(ABC, Generic[Model]):
    """One checkpoint of a family, loaded and built; :meth:`run` exports it, calling the family's methods.

    What a family's parity check loads (the ONNX Runtime sessions, the held-out data) it keeps on ``self`` for its
    variants and its card, which decode with it again.
    """

    kind: ClassVar[str]  # the checkpoint kind `training.checkpoint.load` insists on
    encoder_file: ClassVar[str]
    decoder_file: ClassVar[str] = "decoder_step.onnx"
    parity_inputs: ClassVar[str]  # what the parity check decodes and where from, for its messages
    evaluation_keys: ClassVar[tuple[str, ...]] = ()  # what the card reads from an `attn-train evaluate` file

    def __init__(self, checkpoint_path: Path, options: ExportOptions) -> None:
        self.options = options
        self.payload = checkpoint.load(checkpoint_path, kind=self.kind)
        self.model = self.build_model(self.payload)
        self.tokenizer = bytes(self.payload["tokenizer"])
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)

    def run(self, out: Path) -> Manifest:
        """Write the model version folder ``out`` (replacing one only with ``options.force``); its manifest."""
        self.check_target(out)
        evaluation = (read_metrics(self.options.metrics_file, self.evaluation_keys) if self.options.metrics_file
                      else None)
        self.read_held_out()  # before the graphs are exported: data changed since training stops it at once
        with staged(out, self.options.force) as staging:
            started = time.monotonic()
            (staging / "spm.model").write_bytes(self.tokenizer)
            encoder, decoder = staging / self.encoder_file, staging / self.decoder_file
            self.write_graphs(encoder, decoder)
            for graph in (encoder, decoder):
                onnx.checker.check_model(str(graph), full_check=True)
            report = self.parity(encoder, decoder)
            log.info("parity: %s", report.as_dict())
            if report.sentences == 0:
                raise ParityError(f"parity check had nothing to check: no held-out {self.parity_inputs} in the "
                                  "checkpoint's data; nothing written")
            if not report.passed:
                raise ParityError(f"parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")
            manifest = self.manifest(report)
            self.write_variants(staging, manifest)
            if evaluation is not None:
                manifest.metrics["evaluation"] = evaluation
            manifest.training["export_seconds"] = round(time.monotonic() - started, 1)
            manifest.save(staging)
            Manifest.load(staging)  # the server's own validation, before anything is moved into place
            self.write_card(staging, manifest, out)
        return manifest

    def check_target(self, out: Path) -> None:
        """The manifest's name and version are the folder names of ``out``: the server refuses a model whose
        manifest says otherwise (server/registry.py), so such an export would only ever be refused there."""
        name, version = model_folder_names(out)
        if (self.options.name, self.options.version) != (name, version):
            raise ValueError(f"the model name and version {self.options.name}/{self.options.version} differ from the "
                             f"folders of {out} ({name}/{version}); the server refuses a manifest that does not "
                             "match its folder")

    @abstractmethod
    def build_model(self, payload: dict[str, Any]) -> Model:
        """The PyTorch model of the checkpoint ``payload``."""

    @abstractmethod
    def read_held_out(self) -> None:
        """Read the held-out inputs the parity check decodes from the checkpoint's data; refused when that data
        changed since training."""

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
