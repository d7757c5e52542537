"""Train → evaluate → export on the Ding fixture, as `make models` does on the full corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from exporter import export as export_module
from exporter.export import ExportOptions, ParityError, export
from exporter.parity import ParityReport
from server.artifacts import Manifest
from tests.conftest import DING_SAMPLE
from training import checkpoint
from training.cli import main as train_main

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_holds_state_dict_config_and_tokenizer(tiny_checkpoint: Path) -> None:
    payload = checkpoint.load(tiny_checkpoint)
    assert set(payload) >= {"model", "model_config", "train_config", "tokenizer", "data", "progress"}
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())
    assert payload["model_config"]["vocab_size"] > 0
    assert payload["data"]["hash"] and payload["data"]["sizes"]["test"] > 0
    model = checkpoint.build_model(payload)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_export_writes_a_valid_manifest_and_passes_parity(models_dir: Path) -> None:
    directory = models_dir / "tiny-de-en" / "1"
    manifest = Manifest.load(directory)
    assert manifest.family == "translation" and manifest.attention["type"] == "bahdanau"
    assert manifest.parity["passed"] and manifest.parity["sentences"] > 0
    assert manifest.parity["identical_greedy_tokens"] == manifest.parity["sentences"]
    assert manifest.parity["max_attention_abs_diff"] <= 1e-4
    assert manifest.training["data"]["hash"]
    assert "int8_bleu_delta" in manifest.metrics and "int8" in manifest.variants
    for name in ("encoder.onnx", "decoder_step.onnx", "encoder.int8.onnx", "decoder_step.int8.onnx"):
        onnx.checker.check_model(str(directory / name))
    graph = onnx.load(str(directory / "decoder_step.onnx")).graph
    assert [o.name for o in graph.output] == ["log_probs", "next_state", "attention"]
    # Dynamic batch and length axes.
    mask = next(i for i in graph.input if i.name == "src_mask")
    assert [d.dim_param for d in mask.type.tensor_type.shape.dim] == ["batch", "src_len"]
    assert (directory / "README.md").read_text().count("←") >= 1


def test_export_refuses_to_write_when_parity_fails(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> ParityReport:
        return ParityReport(sentences=3, identical_tokens=2, max_attention_diff=0.5)

    monkeypatch.setattr(export_module, "check", failing)
    out = tmp_path / "m" / "1"
    with pytest.raises(ParityError):
        export(tiny_checkpoint, out, ExportOptions(name="m", parity_sentences=5))
    assert not (tmp_path / "m").exists()  # no version, no staging folder, no empty model folder


def test_manifest_validation_names_the_problem(models_dir: Path, tmp_path: Path) -> None:
    data = json.loads((models_dir / "tiny-de-en" / "1" / "manifest.json").read_text())
    data["decoder"]["state"] = {"state": "no_such_output"}
    from server.artifacts import ManifestError

    with pytest.raises(ManifestError, match="no_such_output"):
        Manifest.from_dict(data)


def test_evaluate_command_writes_buckets(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert train_main(["evaluate", str(tiny_checkpoint), "--split", "test", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"all", "sentences", "phrases", "by_source_words"} <= set(result)
    assert list(result["by_source_words"]) == ["1-3", "4-7", "8-12", "13-20", "21+"]
    assert result["all"]["count"] == result["sentences"]["count"] + result["phrases"]["count"] > 0
    assert 0 <= result["all"]["bleu"] <= 100 and 0 <= result["all"]["chrf"] <= 100


def test_resume_continues_from_the_last_checkpoint(tiny_checkpoint: Path) -> None:
    last = tiny_checkpoint.parent / "last.pt"
    before = checkpoint.load(last)["progress"]["step"]
    assert train_main(["translation", "--resume", str(last), "--max-steps", str(before + 5)]) == 0
    after = checkpoint.load(last)
    assert after["progress"]["step"] == before + 5
    assert len(after["history"]) == len(checkpoint.load(last)["history"])


def test_a_run_resumed_into_another_folder_decays_its_learning_rate_there(tiny_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    last = tiny_checkpoint.parent / "last.pt"
    saved = checkpoint.load(last)
    before = saved["progress"]["step"]
    out = tmp_path / "cooldown"
    assert train_main(["translation", "--resume", str(last), "--out", str(out), "--max-steps", str(before + 4),
                       "--cooldown-steps", "4", "--repeat", "ding-sentences=2", "--lr", "2e-3"]) == 0
    after = checkpoint.load(out / "last.pt")
    assert after["progress"]["step"] == before + 4
    assert (after["train_config"]["cooldown_steps"], after["train_config"]["repeat"]) == (4, "ding-sentences=2")
    assert after["train_config"]["hidden_dim"] == saved["train_config"]["hidden_dim"]
    # The last step ran at a quarter of the new rate; the first run's folder is untouched.
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3 / 4)
    assert checkpoint.load(last)["progress"]["step"] == before
    assert after["data"]["train_examples"] > saved["data"]["train_examples"]  # the sentences twice


def test_a_resumed_run_in_a_new_folder_is_a_whole_run(tiny_checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    last = tiny_checkpoint.parent / "last.pt"
    out = tmp_path / "more"
    step = checkpoint.load(last)["progress"]["step"]
    assert train_main(["translation", "--resume", str(last), "--out", str(out), "--max-steps", str(step + 1)]) == 0
    assert (out / "spm.model").read_bytes() == (tiny_checkpoint.parent / "spm.model").read_bytes()
    assert f"best checkpoint: {out / 'best.pt'}" in capsys.readouterr().out and (out / "best.pt").exists()


TINY = ["--vocab-size", "400", "--emb-dim", "16", "--hidden-dim", "16", "--attn-dim", "16", "--device", "cpu",
        "--threads", "1", "--valid-bleu-sample", "5", "--max-tokens", "1000"]


def test_a_checkpoint_reads_its_own_corpus_from_anywhere_and_refuses_a_changed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.data.corpus import load_corpus

    ours, elsewhere = tmp_path / "ours", tmp_path / "elsewhere"
    ours.mkdir()
    elsewhere.mkdir()
    pairs = load_corpus(f"ding:{DING_SAMPLE}")
    (ours / "corpus.tsv").write_text("".join(f"{p.source}\t{p.target}\n" for p in pairs), encoding="utf-8")
    (elsewhere / "corpus.tsv").write_text("".join(f"{p.source}\t{p.target} (other)\n" for p in pairs),
                                          encoding="utf-8")
    monkeypatch.chdir(ours)
    assert train_main(["translation", "--data", "corpus.tsv", "--out", "run", "--max-steps", "2", *TINY]) == 0
    payload = checkpoint.load(ours / "run" / "best.pt")
    assert payload["data"]["corpus"] == payload["train_config"]["data"] == str(ours / "corpus.tsv")

    # From another directory holding another corpus.tsv: the run's own corpus is scored.
    monkeypatch.chdir(elsewhere)
    assert train_main(["evaluate", str(ours / "run" / "best.pt"), "--split", "test", "--out", "eval.json"]) == 0
    assert "(other)" not in (elsewhere / "eval.json").read_text()
    capsys.readouterr()
    # The corpus changed since: evaluate and resume refuse it, in one line.
    with (ours / "corpus.tsv").open("a", encoding="utf-8") as f:
        f.write("Neu\tnew\n")
    assert train_main(["evaluate", str(ours / "run" / "best.pt")]) == 1
    assert "the checkpoint was trained on data hashing to" in capsys.readouterr().err
    assert train_main(["translation", "--resume", str(ours / "run" / "last.pt"), "--max-steps", "3"]) == 1
    assert "cannot resume: data" in capsys.readouterr().err
    # The export refuses it before it spends its minutes exporting graphs.
    monkeypatch.setattr(export_module.TranslationExporter, "write_graphs",
                        lambda *_: pytest.fail("graphs exported before the data was checked"))
    with pytest.raises(ValueError, match="hashes to"):
        export(ours / "run" / "best.pt", tmp_path / "models" / "m" / "1", ExportOptions(name="m", version="1"))
    assert not (tmp_path / "models").exists()


def test_two_process_torchrun_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.cli", "translation", "--data", f"ding:{DING_SAMPLE}", "--out", str(out),
        "--vocab-size", "400", "--emb-dim", "16", "--hidden-dim", "16", "--attn-dim", "16",
        "--max-steps", "6", "--valid-every", "1000", "--valid-bleu-sample", "10", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = checkpoint.load(out / "last.pt")
    assert payload["progress"]["step"] == 6
    assert payload["hardware"].startswith("2x cpu")
    # Each step consumed one batch per process.
    assert payload["progress"]["batch_in_epoch"] == 12
    # Rank 0 writes the checkpoints, so it alone names the best one.
    assert result.stdout.count("best checkpoint") == 1, result.stdout
