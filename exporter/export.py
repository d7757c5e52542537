"""Checkpoint → ``models/<name>/<version>/``: ONNX graphs, tokenizer, manifest, model card.

Everything is written to a staging directory first; only a graph that passes ``onnx.checker`` and the parity check
is moved into place, so a failed export never leaves a half-written model where the server would load it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import sentencepiece as spm

from exporter import card
from exporter.fp16 import to_fp16
from exporter.graphs import (
    ENCODER_INPUTS,
    decoder_binding,
    decoder_inputs,
    decoder_outputs,
    encoder_outputs,
    export_graphs,
)
from exporter.parity import FP16_ATTENTION_TOLERANCE, FP16_TOKEN_AGREEMENT, OnnxGreedy, ParityReport, check
from exporter.quantize import quantize
from server.artifacts import GraphSpec, Manifest
from training import checkpoint
from training.checkpoint import TranslationModel
from training.data.corpus import Pair, load_corpus, split
from training.evaluate import group_references, score
from training.models.transformer import Transformer

EXPORTER_VERSION = "0.1.0"
log = logging.getLogger("attn.export")


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


def held_out_pairs(payload: dict[str, Any], count: int) -> list[Pair]:
    """Unique-source pairs of the checkpoint's own test split (then valid), full sentences first."""
    splits = split(load_corpus(payload["data"]["corpus"]))
    pool = splits["test"] + splits["valid"]
    pool = [p for p in pool if p.sentence] + [p for p in pool if not p.sentence]
    seen: set[str] = set()
    out = []
    for p in pool:
        if p.source not in seen:
            seen.add(p.source)
            out.append(p)
        if len(out) == count:
            break
    return out


def _bleu(onnx: OnnxGreedy, sp: spm.SentencePieceProcessor, sources: list[list[int]], pairs: list[Pair]) -> float:
    hypotheses: list[str] = []
    for start in range(0, len(sources), 64):
        tokens, _ = onnx(sources[start : start + 64])
        hypotheses.extend(sp.decode(t) for t in tokens)
    _, references, _ = group_references(pairs)
    return score(hypotheses, references)["bleu"]


def attention_info(model: TranslationModel) -> dict[str, Any]:
    """The manifest's ``attention`` section: what the served alignment is, so that clients can read it right."""
    if isinstance(model, Transformer):
        t = model.cfg
        return {
            "type": "multihead", "uniform": False, "query": "current target position (cross-attention)",
            "layer": model.align_layer, "head": "mean" if t.align_head < 0 else t.align_head,
            "layers": t.decoder_layers, "heads": t.heads,
            # (batch, layers, heads, src_len): every layer's and head's cross-attention, for per-request selection
            "all_heads_output": "cross_attention",
        }
    cfg = model.cfg
    name = cfg.attention
    if name == "bahdanau":
        return {"type": "bahdanau", "uniform": False, "query": "previous decoder state"}
    if name == "none":
        # Rows are 1/len(source): the model has no alignment. Clients should not draw conclusions from them.
        return {"type": "none", "uniform": True, "query": "none", "context": "last encoder states"}
    info: dict[str, Any] = {
        "type": name, "uniform": False, "query": "current decoder state", "input_feeding": cfg.input_feeding,
    }
    if name.startswith("luong-"):
        return {**info, "scope": "global", "score": name.removeprefix("luong-")}
    info |= {"scope": "local", "score": cfg.local_score, "window": cfg.window, "renormalised": True}
    if name == "local-m":
        return {**info, "center": "p_t = min(t, S - 1)"}
    return {**info, "center": "p_t = S * sigmoid(v_p . tanh(W_p h_t))", "sigma": cfg.window / 2}


def _manifest(
    model: TranslationModel, payload: dict[str, Any], options: ExportOptions, parity: ParityReport
) -> Manifest:
    cfg = model.cfg
    return Manifest(
        name=options.name,
        version=options.version,
        family="translation",
        architecture="transformer" if isinstance(model, Transformer) else "rnn",
        attention=attention_info(model),
        languages={"source": options.source_language, "target": options.target_language},
        tokenizer={"type": "sentencepiece", "file": "spm.model"},
        special_ids={"pad": cfg.pad_id, "unk": 1, "bos": cfg.bos_id, "eos": cfg.eos_id},
        vocab_size=cfg.vocab_size,
        encoder=GraphSpec("encoder.onnx", ENCODER_INPUTS, encoder_outputs(model)),
        decoder_step=GraphSpec("decoder_step.onnx", decoder_inputs(model), decoder_outputs(model)),
        decoder=decoder_binding(model),
        limits={"max_source_tokens": 128, "max_target_tokens": 266},
        training=training_section(payload),
        parity=parity.as_dict(),
        exporter_version=EXPORTER_VERSION,
    )


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


def export(checkpoint_path: Path, out: Path, options: ExportOptions) -> Manifest:
    payload = checkpoint.load(checkpoint_path)
    model = checkpoint.build_model(payload)
    sp_bytes = bytes(payload["tokenizer"])
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    with staged(out, options.force) as staging:
        started = time.monotonic()
        (staging / "spm.model").write_bytes(sp_bytes)
        export_graphs(model, str(staging / "encoder.onnx"), str(staging / "decoder_step.onnx"))
        for graph in ("encoder.onnx", "decoder_step.onnx"):
            onnx.checker.check_model(str(staging / graph), full_check=True)

        pairs = held_out_pairs(payload, options.parity_sentences)
        sources = [sp.encode(p.source)[:127] + [model.cfg.eos_id] for p in pairs]
        ids = model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id
        binding = decoder_binding(model)
        onnx_fp32 = OnnxGreedy.load(staging / "encoder.onnx", staging / "decoder_step.onnx", binding, *ids)
        report = check(model, onnx_fp32, sources)
        log.info("parity: %s", report.as_dict())
        if not report.passed:
            raise ParityError(f"parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")

        manifest = _manifest(model, payload, options, report)
        manifest.metrics["parity_bleu_fp32"] = _bleu(onnx_fp32, sp, sources, pairs)
        if options.int8:
            _quantize(staging, manifest, onnx_fp32, sp, sources, pairs, ids)
        if options.fp16:
            _half(staging, manifest, model, onnx_fp32, sp, sources, pairs, ids)
        if options.metrics_file:
            manifest.metrics["evaluation"] = json.loads(Path(options.metrics_file).read_text(encoding="utf-8"))
        manifest.training["export_seconds"] = round(time.monotonic() - started, 1)
        manifest.save(staging)
        Manifest.load(staging)  # the server's own validation, before anything is moved into place
        card.write(staging, manifest, onnx_fp32, sp, pairs, options.command)
    return manifest


def _quantize(
    staging: Path, manifest: Manifest, onnx_fp32: OnnxGreedy, sp: spm.SentencePieceProcessor,
    sources: list[list[int]], pairs: list[Pair], ids: tuple[int, int, int],
) -> None:
    """Dynamic int8 weights (exporter/quantize.py); records its BLEU beside fp32 on the same parity sentences."""
    files = {}
    for graph in ("encoder", "decoder_step"):
        files[graph] = f"{graph}.int8.onnx"
        quantize(staging / f"{graph}.onnx", staging / files[graph])
    manifest.variants["int8"] = files
    onnx_int8 = OnnxGreedy.load(staging / files["encoder"], staging / files["decoder_step"], onnx_fp32.binding, *ids)
    bleu = _bleu(onnx_int8, sp, sources, pairs)
    manifest.metrics["parity_bleu_int8"] = bleu
    manifest.metrics["int8_bleu_delta"] = round(bleu - manifest.metrics["parity_bleu_fp32"], 2)


def _half(
    staging: Path, manifest: Manifest, model: TranslationModel, onnx_fp32: OnnxGreedy, sp: spm.SentencePieceProcessor,
    sources: list[list[int]], pairs: list[Pair], ids: tuple[int, int, int],
) -> None:
    """fp16 graphs with a float32 interface (exporter/fp16.py), checked against PyTorch fp32 with the fp16 bar
    (exporter/parity.py): a variant that misses it fails the export like fp32 parity does. Records the check and
    the BLEU beside fp32 on the same parity sentences."""
    files = {}
    for graph in ("encoder", "decoder_step"):
        files[graph] = f"{graph}.fp16.onnx"
        to_fp16(staging / f"{graph}.onnx", staging / files[graph])
        onnx.checker.check_model(str(staging / files[graph]), full_check=True)
    onnx_fp16 = OnnxGreedy.load(staging / files["encoder"], staging / files["decoder_step"], onnx_fp32.binding, *ids)
    report = check(model, onnx_fp16, sources, tolerance=FP16_ATTENTION_TOLERANCE, agreement=FP16_TOKEN_AGREEMENT)
    log.info("fp16 parity: %s", report.as_dict())
    if not report.passed:
        raise ParityError(f"fp16 parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")
    manifest.variants["fp16"] = files
    manifest.metrics["parity_fp16"] = report.as_dict()
    bleu = _bleu(onnx_fp16, sp, sources, pairs)
    manifest.metrics["parity_bleu_fp16"] = bleu
    manifest.metrics["fp16_bleu_delta"] = round(bleu - manifest.metrics["parity_bleu_fp32"], 2)
