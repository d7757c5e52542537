"""Translation checkpoint → ``models/<name>/<version>/``: encoder.onnx, decoder_step.onnx, the SentencePiece model,
manifest.json, the model card and, on request, the int8 and fp16 variants.

The flow (staging, checks, parity, manifest) is the one of exporter/template.py; this module is what translation fills
in: greedy parity on held-out sentences, the parity BLEU the variants are measured against, and the variants.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

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
from exporter.template import EXPORTER_VERSION, ExportOptions, ModelExporter, ParityError, training_section
from server.artifacts import GraphSpec, Manifest
from training import checkpoint
from training.checkpoint import TranslationModel
from training.data.corpus import RESTORE_DATA, Pair, checkpoint_corpus, split
from training.evaluate import group_references, score
from training.models.transformer import Transformer

log = logging.getLogger("attn.export")


def held_out_pairs(payload: dict[str, Any], count: int) -> list[Pair]:
    """Unique-source pairs of the checkpoint's own test split (then valid), full sentences first."""
    splits = split(checkpoint_corpus(payload["data"], remedy=RESTORE_DATA))  # refused if it changed since training
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


class TranslationExporter(ModelExporter[TranslationModel]):
    kind = "translation"
    encoder_file = "encoder.onnx"
    parity_inputs = "sentences (test or valid split)"
    evaluation_keys = ("split", "pairs", "all", "sentences", "phrases", "by_source_words")  # card._scores_table

    # Kept by the parity check for the variants and the card.
    pairs: list[Pair]
    sources: list[list[int]]
    onnx_fp32: OnnxGreedy

    def build_model(self, payload: dict[str, Any]) -> TranslationModel:
        return checkpoint.build_model(payload)

    def read_held_out(self) -> None:
        self.pairs = held_out_pairs(self.payload, self.options.parity_sentences)

    def write_graphs(self, encoder: Path, decoder: Path) -> None:
        export_graphs(self.model, str(encoder), str(decoder))

    def parity(self, encoder: Path, decoder: Path) -> ParityReport:
        self.sources = [self.sp.encode(p.source)[:127] + [self.model.cfg.eos_id] for p in self.pairs]
        self.onnx_fp32 = self._greedy(encoder, decoder)
        return check(self.model, self.onnx_fp32, self.sources)

    def manifest(self, report: ParityReport) -> Manifest:
        model, options = self.model, self.options
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
            encoder=GraphSpec(self.encoder_file, ENCODER_INPUTS, encoder_outputs(model)),
            decoder_step=GraphSpec(self.decoder_file, decoder_inputs(model), decoder_outputs(model)),
            decoder=decoder_binding(model),
            limits={"max_source_tokens": 128, "max_target_tokens": 266},
            training=training_section(self.payload),
            parity=report.as_dict(),
            exporter_version=EXPORTER_VERSION,
        )

    def write_variants(self, staging: Path, manifest: Manifest) -> None:
        """The fp32 graphs' BLEU on the parity sentences (recorded always: the variants are measured against it),
        then the int8 and fp16 variants that the options ask for."""
        manifest.metrics["parity_bleu_fp32"] = self._bleu(self.onnx_fp32)
        if self.options.int8:
            self._quantize(staging, manifest)
        if self.options.fp16:
            self._half(staging, manifest)

    def write_card(self, staging: Path, manifest: Manifest, out: Path) -> None:
        card.write(staging, manifest, self.onnx_fp32, self.sp, self.pairs, self.options.command)

    def _greedy(self, encoder: Path, decoder: Path) -> OnnxGreedy:
        """Greedy decoding through a pair of this model's graphs: the fp32 ones or a variant's."""
        cfg = self.model.cfg
        return OnnxGreedy.load(encoder, decoder, decoder_binding(self.model), cfg.bos_id, cfg.eos_id, cfg.pad_id)

    def _bleu(self, greedy: OnnxGreedy) -> float:
        hypotheses: list[str] = []
        for start in range(0, len(self.sources), 64):
            tokens, _ = greedy(self.sources[start : start + 64])
            hypotheses.extend(self.sp.decode(t) for t in tokens)
        _, references, _ = group_references(self.pairs)
        return score(hypotheses, references)["bleu"]

    def _quantize(self, staging: Path, manifest: Manifest) -> None:
        """Dynamic int8 weights (exporter/quantize.py); records its BLEU beside fp32 on the same parity sentences."""
        files = {}
        for graph in ("encoder", "decoder_step"):
            files[graph] = f"{graph}.int8.onnx"
            quantize(staging / f"{graph}.onnx", staging / files[graph])
        manifest.variants["int8"] = files
        bleu = self._bleu(self._greedy(staging / files["encoder"], staging / files["decoder_step"]))
        manifest.metrics["parity_bleu_int8"] = bleu
        manifest.metrics["int8_bleu_delta"] = round(bleu - manifest.metrics["parity_bleu_fp32"], 2)

    def _half(self, staging: Path, manifest: Manifest) -> None:
        """fp16 graphs with a float32 interface (exporter/fp16.py), checked against PyTorch fp32 with the fp16 bar
        (exporter/parity.py): a variant that misses it fails the export like fp32 parity does. Records the check and
        the BLEU beside fp32 on the same parity sentences."""
        files = {}
        for graph in ("encoder", "decoder_step"):
            files[graph] = f"{graph}.fp16.onnx"
            to_fp16(staging / f"{graph}.onnx", staging / files[graph])
            onnx.checker.check_model(str(staging / files[graph]), full_check=True)
        onnx_fp16 = self._greedy(staging / files["encoder"], staging / files["decoder_step"])
        report = check(self.model, onnx_fp16, self.sources, tolerance=FP16_ATTENTION_TOLERANCE,
                       agreement=FP16_TOKEN_AGREEMENT)
        log.info("fp16 parity: %s", report.as_dict())
        if not report.passed:
            raise ParityError(f"fp16 parity check failed, nothing written: {report.as_dict()} {report.mismatches[:2]}")
        manifest.variants["fp16"] = files
        manifest.metrics["parity_fp16"] = report.as_dict()
        bleu = self._bleu(onnx_fp16)
        manifest.metrics["parity_bleu_fp16"] = bleu
        manifest.metrics["fp16_bleu_delta"] = round(bleu - manifest.metrics["parity_bleu_fp32"], 2)


def export(checkpoint_path: Path, out: Path, options: ExportOptions) -> Manifest:
    return TranslationExporter(checkpoint_path, options).run(out)
