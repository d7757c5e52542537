"""Checkpoint → ``models/<name>/<version>/``: ONNX graphs, tokenizer, manifest, model card.

Everything is written to a staging directory first; only a graph that passes ``onnx.checker`` and the parity check
is moved into place, so a failed export never leaves a half-written model where the server would load it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import sentencepiece as spm

from exporter import card
from exporter.graphs import ENCODER_INPUTS, decoder_inputs, decoder_outputs, encoder_outputs, export_graphs
from exporter.parity import OnnxGreedy, ParityReport, check
from server.artifacts import DecoderBinding, GraphSpec, Manifest
from training import checkpoint
from training.data.corpus import Pair, load_corpus, split
from training.evaluate import group_references, score
from training.models.rnn import Seq2Seq

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


def _manifest(model: Seq2Seq, payload: dict[str, Any], options: ExportOptions, parity: ParityReport) -> Manifest:
    cfg = model.cfg
    return Manifest(
        name=options.name,
        version=options.version,
        family="translation",
        architecture="rnn",
        attention={"type": cfg.attention, "uniform": False, "query": "previous decoder state"},
        languages={"source": options.source_language, "target": options.target_language},
        tokenizer={"type": "sentencepiece", "file": "spm.model"},
        special_ids={"pad": cfg.pad_id, "unk": 1, "bos": cfg.bos_id, "eos": cfg.eos_id},
        vocab_size=cfg.vocab_size,
        encoder=GraphSpec("encoder.onnx", ENCODER_INPUTS, encoder_outputs(model)),
        decoder_step=GraphSpec("decoder_step.onnx", decoder_inputs(model), decoder_outputs(model)),
        decoder=DecoderBinding(
            token_input="prev_token", mask_input="src_mask", static_inputs=["memory", "keys"],
            state={"state": "next_state"}, log_probs_output="log_probs", attention_output="attention",
        ),
        limits={"max_source_tokens": 128, "max_target_tokens": 266},
        training={
            "data": payload["data"],
            "config": payload["train_config"],
            "model_config": payload["model_config"],
            "progress": payload["progress"],
            "best": payload["best"],
            "hardware": payload.get("hardware", ""),
        },
        parity=parity.as_dict(),
        exporter_version=EXPORTER_VERSION,
    )


def export(checkpoint_path: Path, out: Path, options: ExportOptions) -> Manifest:
    out = Path(out)
    if out.exists() and not options.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    payload = checkpoint.load(checkpoint_path)
    model = checkpoint.build_model(payload)
    sp_bytes = bytes(payload["tokenizer"])
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.monotonic()
        (staging / "spm.model").write_bytes(sp_bytes)
        export_graphs(model, str(staging / "encoder.onnx"), str(staging / "decoder_step.onnx"))
        for graph in ("encoder.onnx", "decoder_step.onnx"):
            onnx.checker.check_model(str(staging / graph), full_check=True)

        pairs = held_out_pairs(payload, options.parity_sentences)
        sources = [sp.encode(p.source)[:127] + [model.cfg.eos_id] for p in pairs]
        ids = model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id
        onnx_fp32 = OnnxGreedy.load(staging / "encoder.onnx", staging / "decoder_step.onnx", *ids)
        report = check(model, onnx_fp32, sources)
        log.info("parity: %s", report.as_dict())
        if not report.passed:
            raise ParityError(f"parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")

        manifest = _manifest(model, payload, options, report)
        manifest.metrics["parity_bleu_fp32"] = _bleu(onnx_fp32, sp, sources, pairs)
        if options.int8:
            _quantize(staging, manifest, onnx_fp32, sp, sources, pairs, ids)
        if options.metrics_file:
            manifest.metrics["evaluation"] = json.loads(Path(options.metrics_file).read_text(encoding="utf-8"))
        manifest.training["export_seconds"] = round(time.monotonic() - started, 1)
        manifest.save(staging)
        Manifest.load(staging)  # the server's own validation, before anything is moved into place
        card.write(staging, manifest, onnx_fp32, sp, pairs, options.command)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quantize(
    staging: Path, manifest: Manifest, onnx_fp32: OnnxGreedy, sp: spm.SentencePieceProcessor,
    sources: list[list[int]], pairs: list[Pair], ids: tuple[int, int, int],
) -> None:
    """Dynamic int8 weights for MatMul/Gemm/GRU; records its BLEU beside fp32 on the same parity sentences."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    for graph in ("encoder", "decoder_step"):
        target = f"{graph}.int8.onnx"
        quantize_dynamic(str(staging / f"{graph}.onnx"), str(staging / target), weight_type=QuantType.QInt8)
        files[graph] = target
    manifest.variants["int8"] = files
    onnx_int8 = OnnxGreedy.load(staging / files["encoder"], staging / files["decoder_step"], *ids)
    bleu = _bleu(onnx_int8, sp, sources, pairs)
    manifest.metrics["parity_bleu_int8"] = bleu
    manifest.metrics["int8_bleu_delta"] = round(bleu - manifest.metrics["parity_bleu_fp32"], 2)
