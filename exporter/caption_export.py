"""Captioning checkpoint → ``models/<name>/<version>/``: image_encoder.onnx, decoder_step.onnx, the word vocabulary,
manifest.json (with the ``image`` section: input size, normalisation, grid) and the model card.

The flow is the one of exporter/template.py, as for translation: the graphs are moved into place only when they pass
``onnx.checker`` and the parity check, here greedy captions identical to PyTorch on held-out images with attention
within the same tolerance. There are no int8 or fp16 variants of a captioner.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from exporter.caption_graphs import (
    STATE,
    decoder_inputs,
    decoder_outputs,
    encoder_inputs,
    encoder_outputs,
    export_graphs,
)
from exporter.card import bold
from exporter.parity import ParityReport, greedy_loop
from exporter.template import EXPORTER_VERSION, ExportOptions, ModelExporter, training_section
from exporter.template import ParityError as ParityError  # callers catch it from here
from server.artifacts import DecoderBinding, GraphSpec, Manifest
from server.artifacts.attention_maps import overlay, peak_box
from training import checkpoint
from training.caption_eval import MAX_CAPTION_TOKENS
from training.caption_train import CaptionTrainConfig
from training.data.captions import CaptionSet, checkpoint_split
from training.data.corpus import RESTORE_DATA
from training.folders import why_unwritable
from training.models.caption import ShowAttendTell, normalise


@dataclass
class CaptionExportOptions(ExportOptions):
    overlays: Path | None = None  # write two example overlays (and their input images) into this folder


@dataclass
class OnnxCaptioner:
    """Greedy captions through the exported graphs on ONNX Runtime's CPU provider, the way the server runs them."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    bos_id: int
    eos_id: int

    @classmethod
    def load(cls, encoder: Path, decoder: Path, bos_id: int, eos_id: int) -> OnnxCaptioner:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        return cls(ort.InferenceSession(str(encoder), options, providers=providers),
                   ort.InferenceSession(str(decoder), options, providers=providers), bos_id, eos_id)

    def __call__(self, images: np.ndarray) -> tuple[list[list[int]], list[np.ndarray]]:
        """images: (batch, 3, S, S) float32, normalised. Token ids without EOS; attention rows with EOS's."""
        features, keys, h, c = self.encoder.run(None, {"image": images})

        def step(token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal h, c
            log_probs, h, c, weights = self.decoder.run(
                None, {"prev_token": token, "h": h, "c": c, "features": features, "keys": keys})
            return log_probs, weights

        return greedy_loop(step, len(images), self.bos_id, self.eos_id, MAX_CAPTION_TOKENS)


def _normalised(model: ShowAttendTell, images: np.ndarray) -> torch.Tensor:
    return normalise(torch.from_numpy(images), model.cfg.mean, model.cfg.std)


def check(model: ShowAttendTell, onnx_model: OnnxCaptioner, images: np.ndarray, batch_size: int = 64) -> ParityReport:
    """Greedy-caption uint8 ``images`` (N, S, S, 3) with PyTorch and ONNX Runtime and compare."""
    report = ParityReport()
    model.eval()
    for start in range(0, len(images), batch_size):
        batch = _normalised(model, images[start : start + batch_size])
        torch_tokens, torch_rows = model.greedy(batch, MAX_CAPTION_TOKENS)
        onnx_tokens, onnx_rows = onnx_model(batch.numpy())
        for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens)):
            report.add(a, b, torch_rows[i].numpy(), onnx_rows[i], {"image": start + i})
    return report


def held_out_images(payload: dict[str, Any], count: int) -> CaptionSet:
    """The first ``count`` images of the checkpoint's own test split (refused if its data changed since training)."""
    return checkpoint_split(payload["data"], payload["train_config"], "test", count, remedy=RESTORE_DATA)


def training_command(train_config: dict[str, Any]) -> str:
    """The ``attn-train caption`` command line that reproduces a run (flags that differ from the defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CaptionTrainConfig)}
    flags = []
    for key, value in train_config.items():
        if key in defaults and value != defaults[key]:
            flag = "--" + key.replace("_", "-")
            shown = f"{value:g}" if isinstance(value, float) else value
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {shown}")
    return " ".join(["attn-train caption", *flags])


def caption_words(pieces: Sequence[str], rows: np.ndarray) -> list[str]:
    """The words an overlay labels ``rows`` with: the caption's pieces, then ``<eos>`` only when the caption ended
    with one (greedy decoding gives EOS's row too); a caption cut at the maximum length has one row per piece."""
    words = [piece.lstrip("▁") for piece in pieces]
    return words + ["<eos>"] if len(rows) > len(words) else words


class CaptionExporter(ModelExporter[ShowAttendTell]):
    kind = "captioning"
    encoder_file = "image_encoder.onnx"
    parity_inputs = "images (test split)"
    evaluation_keys = ("split", "images", "bleu1", "bleu2", "bleu3", "bleu4", "exact_match")  # the card's scores

    # Kept by the parity check for the card's examples.
    held_out: CaptionSet
    images: np.ndarray
    onnx_model: OnnxCaptioner
    # With --overlays, the card's pictures by path: drawn with the card, saved only once the export has succeeded,
    # so that a failed export leaves no picture behind.
    pictures: dict[Path, Image.Image]

    def __init__(self, checkpoint_path: Path, options: ExportOptions) -> None:
        if options.int8 or options.fp16:  # before the checkpoint is read: the options alone are wrong
            raise ValueError(f"--{'int8' if options.int8 else 'fp16'} is not supported for captioning models")
        super().__init__(checkpoint_path, options)

    def build_model(self, payload: dict[str, Any]) -> ShowAttendTell:
        return checkpoint.build_captioner(payload)

    def run(self, out: Path) -> Manifest:
        self.pictures = {}
        overlays = getattr(self.options, "overlays", None)
        if overlays is not None:  # before the export, not once the model is in place
            check_overlays_folder(Path(overlays))
        manifest = super().run(out)
        try:
            for path, picture in self.pictures.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path)
        except OSError as exc:  # the model is served already; say so, and which pictures its card lacks
            raise ValueError(f"{out} was exported, but its overlays could not be written to {overlays}: "
                             f"{exc.strerror or exc} ({exc.filename}); its card links to them") from exc
        return manifest

    def read_held_out(self) -> None:
        self.held_out = held_out_images(self.payload, self.options.parity_sentences)

    def write_graphs(self, encoder: Path, decoder: Path) -> None:
        export_graphs(self.model, str(encoder), str(decoder))

    def parity(self, encoder: Path, decoder: Path) -> ParityReport:
        self.images = self.held_out.images(range(len(self.held_out)))
        self.onnx_model = OnnxCaptioner.load(encoder, decoder, self.model.cfg.bos_id, self.model.cfg.eos_id)
        return check(self.model, self.onnx_model, self.images)

    def manifest(self, report: ParityReport) -> Manifest:
        model, options, payload = self.model, self.options, self.payload
        cfg = model.cfg
        rows, cols = model.grid()
        return Manifest(
            name=options.name,
            version=options.version,
            family="captioning",
            architecture="show-attend-tell",
            attention={"type": "soft", "uniform": False, "query": "previous LSTM state", "gate": "beta",
                       "over": "image grid"},
            languages={"source": "image", "target": options.target_language},
            tokenizer={"type": "sentencepiece", "file": "spm.model"},
            special_ids={"pad": cfg.pad_id, "unk": 1, "bos": cfg.bos_id, "eos": cfg.eos_id},
            vocab_size=cfg.vocab_size,
            encoder=GraphSpec(self.encoder_file, encoder_inputs(model), encoder_outputs(model)),
            decoder_step=GraphSpec(self.decoder_file, decoder_inputs(model), decoder_outputs(model)),
            decoder=DecoderBinding(
                token_input="prev_token", mask_input="", static_inputs=["features", "keys"], state=dict(STATE),
                log_probs_output="log_probs", attention_output="attention",
            ),
            limits={"max_source_tokens": rows * cols, "max_target_tokens": MAX_CAPTION_TOKENS},
            image={
                "input": "image", "size": [cfg.image_size, cfg.image_size], "channels": 3, "layout": "NCHW",
                "color": "RGB", "scale": 1 / 255, "mean": list(cfg.mean), "std": list(cfg.std), "resize": "stretch",
                "resample": "bilinear", "grid": [rows, cols],
            },
            training={**training_section(payload), "command": training_command(payload["train_config"])},
            parity=report.as_dict(),
            exporter_version=EXPORTER_VERSION,
        )

    def write_card(self, staging: Path, manifest: Manifest, out: Path) -> None:
        _card(staging, manifest, self.options.command, self._examples(manifest, out))

    def _examples(self, manifest: Manifest, out: Path, count: int = 2) -> list[dict[str, Any]]:
        """Captions of the first held-out images with two or more objects (or the first ones), their words' peak
        regions and, with ``--overlays``, the overlay pictures."""
        held_out, images = self.held_out, self.images
        order = [i for i, refs in enumerate(held_out.captions) if len(refs[0].split()) > 4] or list(range(len(images)))
        grid = manifest.image["grid"]
        size = self.model.cfg.image_size
        examples = []
        for k, i in enumerate(order[:count], 1):
            tokens, rows = self.onnx_model(_normalised(self.model, images[i : i + 1]).numpy())
            words = caption_words([self.sp.id_to_piece(t) for t in tokens[0]], rows[0])
            example: dict[str, Any] = {
                "caption": self.sp.decode(tokens[0]), "reference": held_out.captions[i][0],
                "regions": [(w, peak_box(r, grid, size, size)) for w, r in zip(words, rows[0])],
            }
            overlays = getattr(self.options, "overlays", None)
            if overlays is not None:
                folder = Path(overlays)
                picture = Image.fromarray(images[i])
                stem = f"{manifest.name}-example-{k}"
                self.pictures[folder / f"{stem}-input.png"] = picture
                self.pictures[folder / f"{stem}.png"] = overlay(picture, words, rows[0], grid, panel=128)
                example["overlay"] = os.path.relpath(folder / f"{stem}.png", out)
                example["input"] = os.path.relpath(folder / f"{stem}-input.png", out)
            examples.append(example)
        return examples


def check_overlays_folder(folder: Path) -> None:
    """ValueError unless the pictures can be written in ``folder`` (made if missing)."""
    reason = why_unwritable(folder)
    if reason is not None:
        raise ValueError(f"--overlays {folder} cannot be written: {reason}")


def export_captioner(checkpoint_path: Path, out: Path, options: ExportOptions) -> Manifest:
    return CaptionExporter(checkpoint_path, options).run(out)


def _correctness_rows(correctness: dict[str, Any]) -> list[str]:
    lines = ["| decoding | object words | attention correctness | uniform baseline | ratio |",
             "|---|---:|---:|---:|---:|"]
    for name in ("teacher_forced", "greedy"):
        c = correctness.get(name)
        if c:
            lines.append(f"| {name.replace('_', '-')} | {c['words']} | **{c['correctness']:.3f}** | "
                         f"{c['uniform_baseline']:.3f} | {c['ratio']}× |")
            for kind, k in c["by_word_kind"].items():
                lines.append(f"| — {kind} words | {k['words']} | {k['correctness']:.3f} | {k['uniform_baseline']:.3f} |"
                             f" {k['ratio']}× |")
    return lines


def _card(directory: Path, manifest: Manifest, command: str, examples: Sequence[dict[str, Any]]) -> None:
    t = manifest.training
    progress, data, mc = t["progress"], t["data"], t["model_config"]
    rows, cols = manifest.image["grid"]
    lines = [
        f"# {manifest.name} version {manifest.version}",
        "",
        f"Image captioning with soft attention (Show, Attend and Tell): a {mc['backbone']} CNN turns a "
        f"{mc['image_size']}×{mc['image_size']} image into a {rows}×{cols} grid of {mc['feature_dim']}-d annotation "
        f"vectors; an LSTM (hidden {mc['hidden_dim']}) attends over the grid at every word (additive attention, "
        f"gating scalar β, doubly stochastic regulariser λ = {t['config']['alpha_reg']}) with a vocabulary of "
        f"{manifest.vocab_size} words."
        + ("" if mc.get("lstm_reads_context", True) else " The context of a step feeds the output layer only (the "
           "LSTM reads the previous word), so every word has to look at the image itself."),
        "",
        "## How it was made",
        "",
        f"- Training command: `{t['command']}`",
        f"- Export command: `{command}`" if command else "- Exported with `attn-export`.",
        f"- Data: `{data['corpus']}`, hash `{data['hash']}`, splits {data['sizes']} (images).",
        f"- Training time: {progress['elapsed_s'] / 60:.1f} min, {progress['step']} steps, {progress['epoch']} full "
        f"epochs, on {t['hardware']}" + (f", {threads} torch thread(s)." if (threads := t['config'].get('threads'))
                                         else "."),
        f"- Best checkpoint (by {t['config'].get('best_by', 'valid_loss').replace('_', ' ')} on the validation "
        f"split): {t['best']}",
        "",
        "## Scores",
        "",
    ]
    evaluation = manifest.metrics.get("evaluation")
    if evaluation:
        lines += [f"Greedy captions of the {evaluation['split']} split ({evaluation['images']} images), measured by "
                  "`attn-train evaluate`:", "",
                  "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | exact match |", "|---:|---:|---:|---:|---:|",
                  f"| {evaluation['bleu1']} | {evaluation['bleu2']} | {evaluation['bleu3']} | **{evaluation['bleu4']}**"
                  f" | {evaluation['exact_match']:.1%} |", ""]
        if "attention_correctness" in evaluation:
            lines += ["Attention correctness: the share of an object word's attention inside its object's box, next "
                      "to the share a uniform map would put there (box area / image area). Teacher-forced: on the "
                      "reference captions; greedy: on the model's own captions, for phrases that name an object of "
                      "the image.", ""]
            lines += _correctness_rows(evaluation["attention_correctness"]) + [""]
    else:
        lines += ["No evaluation file was given to the exporter.", ""]
    p = manifest.parity
    lines += [f"Parity with PyTorch on {p['sentences']} held-out images: {p['identical_greedy_tokens']} identical "
              f"greedy captions, largest attention difference {p['max_attention_abs_diff']} (tolerance "
              f"{p['attention_tolerance']}).", "", "## Examples", ""]
    for e in examples:
        lines += [f"- {bold(e['caption'], 'caption')} (reference: {e['reference']})", ""]
        if "overlay" in e:
            lines += [f"  ![input]({e['input']}) ![attention of every word]({e['overlay']})", ""]
        lines += [f"  - `{w}`: peak at x {b[0]}–{b[2]}, y {b[1]}–{b[3]}" for w, b in e["regions"]]
        lines.append("")
    sizes = sorted((f.name, f.stat().st_size) for f in directory.iterdir() if f.is_file())
    lines += ["## Files", ""] + [f"- `{name}`: {size / 1e6:.2f} MB" for name, size in sizes]
    lines.append(f"- total: {sum(s for _, s in sizes) / 1e6:.2f} MB (the card adds a few kB)")
    (directory / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
