"""Train → evaluate → export → serve-side runtime for the captioner on generated scenes, as `make models` does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from exporter import caption_export
from exporter.caption_export import CaptionExportOptions, export_captioner
from exporter.parity import ParityReport
from server.artifacts import Manifest
from training import checkpoint
from training.caption_eval import MAX_CAPTION_TOKENS
from training.cli import main as train_main
from training.data.scenes import render, scenes
from training.models.caption import normalise

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_holds_state_dict_config_and_vocabulary(tiny_captioner: Path) -> None:
    payload = checkpoint.load(tiny_captioner, kind="captioning")
    assert payload["kind"] == "captioning"
    assert set(payload) >= {"model", "model_config", "train_config", "tokenizer", "data", "progress", "hardware"}
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())
    assert payload["train_config"]["data"] == "scenes" and payload["data"]["sizes"]["test"] == 30
    model = checkpoint.build_captioner(payload)
    assert model.grid() == (12, 12)
    with pytest.raises(ValueError, match="not a translation checkpoint"):
        checkpoint.load(tiny_captioner)


def test_evaluate_reports_bleu_and_attention_correctness(tiny_captioner: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert train_main(["evaluate", str(tiny_captioner), "--split", "test", "--limit", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 12 and {"bleu1", "bleu2", "bleu3", "bleu4"} <= set(result)
    correctness = result["attention_correctness"]
    forced = correctness["teacher_forced"]
    assert forced["words"] > 12 and 0 <= forced["correctness"] <= 1 and 0 < forced["uniform_baseline"] < 1
    assert set(forced["by_word_kind"]) == {"size", "colour", "shape"}
    assert correctness["grid"] == [12, 12]


def test_export_writes_the_image_contract_and_passes_parity(caption_models_dir: Path) -> None:
    directory = caption_models_dir / "tiny-scenes" / "1"
    manifest = Manifest.load(directory)
    assert manifest.family == "captioning" and manifest.decoder.mask_input == ""
    assert manifest.image["size"] == [96, 96] and manifest.image["grid"] == [12, 12]
    assert manifest.image["resize"] == "stretch" and len(manifest.image["mean"]) == 3
    assert manifest.parity["passed"] and manifest.parity["identical_greedy_tokens"] == manifest.parity["sentences"]
    assert manifest.parity["max_attention_abs_diff"] <= 1e-4
    assert manifest.training["command"].startswith("attn-train caption ")
    encoder = onnx.load(str(directory / "image_encoder.onnx")).graph
    assert [o.name for o in encoder.output] == ["features", "keys", "h", "c"]
    decoder = onnx.load(str(directory / "decoder_step.onnx")).graph
    assert [o.name for o in decoder.output] == ["log_probs", "next_h", "next_c", "attention"]
    card = (directory / "README.md").read_text()
    assert "Parity with PyTorch on 20 held-out images" in card and "![attention of every word]" in card


def test_export_refuses_to_write_when_parity_fails(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> ParityReport:
        return ParityReport(sentences=3, identical_tokens=3, max_attention_diff=0.01)

    monkeypatch.setattr(caption_export, "check", failing)
    out = tmp_path / "m" / "1"
    with pytest.raises(caption_export.ParityError):
        export_captioner(tiny_captioner, out, CaptionExportOptions(name="m", parity_sentences=4))
    assert not (tmp_path / "m").exists()  # no version, no staging folder, no empty model folder


def test_server_runtime_captions_as_pytorch_does(caption_models_dir: Path, tiny_captioner: Path) -> None:
    """Bytes → server decoding and preparation → ONNX Runtime → numpy search gives PyTorch's greedy caption."""
    from server.captioning import CaptionModel
    from server.device import choose
    from server.imaging import decode
    from server.translation import DecodeOptions

    directory = caption_models_dir / "tiny-scenes" / "1"
    runtime = CaptionModel(directory, Manifest.load(directory), choose("cpu"))
    model = checkpoint.build_captioner(checkpoint.load(tiny_captioner, kind="captioning"))
    pictures = [render(s) for s in scenes("test", 6)]
    buffers = []
    for picture in pictures:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        buffers.append(decode(buffer.getvalue()))
    results = runtime.caption(buffers, DecodeOptions(beam_size=1))
    batch = normalise(torch.from_numpy(np.stack([np.asarray(p) for p in pictures])), model.cfg.mean, model.cfg.std)
    tokens, rows = model.greedy(batch, MAX_CAPTION_TOKENS)
    for result, ids, attention in zip(results, tokens, rows):
        best = result.hypotheses[0]
        if len(ids) < MAX_CAPTION_TOKENS:
            assert [t.id for t in best.tokens] == [*ids, model.cfg.eos_id]
        else:  # the tiny model may not stop: the server forces EOS into its last step, PyTorch's loop just ends
            assert best.truncated and [t.id for t in best.tokens][:-1] == ids[: MAX_CAPTION_TOKENS - 1]
        n = min(len(best.attention), len(attention))
        np.testing.assert_allclose(best.attention[:n], attention.numpy()[:n], atol=1e-4)
        np.testing.assert_allclose(best.attention.sum(1), 1.0, atol=1e-5)
        assert result.grid == (12, 12) and (result.width, result.height) == (96, 96)
        assert len(best.peak_boxes) == len(best.tokens)
        assert all(0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 for x0, y0, x1, y1 in best.peak_boxes)
    beams = runtime.caption(buffers[:2], DecodeOptions(beam_size=3, nbest=2))
    for result in beams:
        assert len(result.hypotheses) == 2
        for hyp in result.hypotheses:
            assert hyp.attention.shape == (len(hyp.tokens), 144)
            np.testing.assert_allclose(hyp.attention.sum(1), 1.0, atol=1e-5)
    stretched = Image.fromarray(np.asarray(pictures[0])).resize((192, 144))
    buffer = io.BytesIO()
    stretched.save(buffer, "JPEG")
    wide = runtime.caption([decode(buffer.getvalue())], DecodeOptions(beam_size=1))[0]
    assert (wide.width, wide.height) == (192, 144)
    assert all(x1 <= 192 and y1 <= 144 for _, _, x1, y1 in wide.hypotheses[0].peak_boxes)


def test_resume_continues_from_the_last_checkpoint(tiny_captioner: Path) -> None:
    last = tiny_captioner.parent / "last.pt"
    before = checkpoint.load(last, kind="captioning")["progress"]["step"]
    assert train_main(["caption", "--resume", str(last), "--max-steps", str(before + 3)]) == 0
    after = checkpoint.load(last, kind="captioning")
    assert after["progress"]["step"] == before + 3
    assert after["train_config"]["hidden_dim"] == 32  # the run's own config, not the defaults


def test_two_process_torchrun_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        # --standalone: a rendezvous on a free local port (--master-port 0 hangs in torch 2.13's static rendezvous)
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.cli", "caption", "--out", str(out), "--train-images", "64", "--valid-images", "8",
        "--test-images", "8", "--width", "4", "--feature-dim", "8", "--emb-dim", "8", "--hidden-dim", "8",
        "--attn-dim", "8", "--batch-size", "8", "--max-steps", "3", "--valid-every", "1000", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = checkpoint.load(out / "last.pt", kind="captioning")
    assert payload["progress"]["step"] == 3
    assert payload["hardware"].startswith("2x cpu")
    assert payload["progress"]["batch_in_epoch"] == 6
    # Rank 0 writes the checkpoints, so it alone names the best one.
    assert result.stdout.count("best checkpoint") == 1, result.stdout
