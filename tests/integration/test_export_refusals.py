"""Exports of the tiny session models that must fail cleanly (nothing written, a message that says why) or that
used to crash: a manifest name other than the folder's, a bad --metrics, parity over nothing, captions cut at the
maximum length drawn as overlays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter import caption_export, cli
from exporter import export as export_module
from exporter.caption_export import CaptionExportOptions, export_captioner
from exporter.export import ExportOptions, ParityError, export
from exporter.parity import ParityReport
from server.artifacts import Manifest


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the export began although its options were wrong")


def test_the_cli_exports_under_the_folder_names_of_out_and_replaces_only_with_force(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "tiny" / "1"
    assert cli.main([str(tiny_checkpoint), "--out", str(out), "--parity-sentences", "4"]) == 0
    manifest = Manifest.load(out)
    assert (manifest.name, manifest.version) == ("tiny", "1")
    assert cli.main([str(tiny_checkpoint), "--out", str(out), "--parity-sentences", "4"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert cli.main([str(tiny_checkpoint), "--out", str(out), "--name", "tiny", "--parity-sentences", "4",
                     "--force"]) == 0


def test_a_name_or_version_other_than_the_folders_is_refused_before_anything_is_written(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "export_graphs", _never)
    with pytest.raises(ValueError, match="other/1 differ from the folders"):
        export(tiny_checkpoint, tmp_path / "m" / "1", ExportOptions(name="other", parity_sentences=4))
    with pytest.raises(ValueError, match="m/2 differ from the folders"):
        export(tiny_checkpoint, tmp_path / "m" / "1", ExportOptions(name="m", version="2", parity_sentences=4))
    assert not list(tmp_path.iterdir())


def test_a_bad_metrics_file_is_refused_before_the_export(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_module, "export_graphs", _never)
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=f"metrics file {missing}"):
        export(tiny_checkpoint, tmp_path / "m" / "1", ExportOptions(name="m", metrics_file=missing))
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("Hallo\tHello\n")
    assert cli.main([str(tiny_checkpoint), "--out", str(tmp_path / "m" / "1"), "--metrics", str(corpus)]) == 1
    assert f"metrics file {corpus} is not JSON" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_translation_parity_over_no_held_out_sentences_fails_the_export(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "held_out_pairs", lambda payload, count: [])  # a corpus without valid/test
    out = tmp_path / "m" / "1"
    with pytest.raises(ParityError, match="nothing to check: no held-out sentences"):
        export(tiny_checkpoint, out, ExportOptions(name="m", parity_sentences=5, int8=True, fp16=True))
    assert not (tmp_path / "m").exists()  # no version, no staging folder, no empty model folder


def test_caption_parity_over_no_held_out_images_fails_the_export(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(caption_export, "check", lambda *args, **kwargs: ParityReport())
    out = tmp_path / "m" / "1"
    with pytest.raises(ParityError, match="nothing to check: no held-out images"):
        export_captioner(tiny_captioner, out, CaptionExportOptions(name="m", parity_sentences=4))
    assert not out.exists()


def test_captions_cut_at_the_maximum_length_draw_their_overlays(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two words are fewer than any caption of the tiny model needs: every caption ends without EOS (and its row).
    monkeypatch.setattr(caption_export, "MAX_CAPTION_TOKENS", 2)
    out, pictures = tmp_path / "m" / "1", tmp_path / "docs"
    export_captioner(tiny_captioner, out, CaptionExportOptions(name="m", parity_sentences=4, overlays=pictures))
    card = (out / "README.md").read_text()
    assert card.count("![attention of every word]") == 2 and "`<eos>`" not in card
    assert sorted(p.name for p in pictures.iterdir()) == [
        "m-example-1-input.png", "m-example-1.png", "m-example-2-input.png", "m-example-2.png"]


def test_a_failed_caption_export_leaves_no_overlay_behind(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_card(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(caption_export, "_card", failing_card)
    out, pictures = tmp_path / "m" / "1", tmp_path / "docs"
    with pytest.raises(OSError, match="disk full"):
        export_captioner(tiny_captioner, out, CaptionExportOptions(name="m", parity_sentences=4, overlays=pictures))
    assert not out.exists() and not (pictures.exists() and list(pictures.iterdir()))


def test_metrics_reach_the_manifest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "eval.json"
    assert not (tmp_path / "m").exists()
    from training.cli import main as train_main

    assert train_main(["evaluate", str(tiny_checkpoint), "--split", "test", "--limit", "8", "--out", str(metrics)]) == 0
    manifest = export(tiny_checkpoint, tmp_path / "m" / "1", ExportOptions(name="m", parity_sentences=4,
                                                                           metrics_file=metrics))
    assert manifest.metrics["evaluation"] == json.loads(metrics.read_text())


def test_the_cli_reports_what_the_int8_variant_costs_in_bleu(tiny_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "tiny" / "1"
    assert cli.main([str(tiny_checkpoint), "--out", str(out), "--parity-sentences", "4", "--int8"]) == 0
    metrics = Manifest.load(out).metrics
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == (f"int8 variant: BLEU {metrics['parity_bleu_int8']} vs fp32 {metrics['parity_bleu_fp32']} "
                           f"on the parity sentences ({metrics['int8_bleu_delta']:+})")


def test_an_overlays_folder_that_cannot_be_written_is_refused_before_the_export(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(caption_export, "export_graphs", _never)
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "models" / "m" / "1"
    assert cli.main([str(tiny_captioner), "--out", str(out), "--overlays", str(tmp_path / "notes.txt" / "docs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attn-export: --overlays ") and "is not a folder" in err and err.count("\n") == 1, err
    assert not (tmp_path / "models").exists()


def test_overlays_that_fail_to_save_say_the_model_was_exported(
    tiny_captioner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def disk_full(self: object, path: object, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(caption_export.Image.Image, "save", disk_full)
    out = tmp_path / "models" / "m" / "1"
    assert cli.main([str(tiny_captioner), "--out", str(out), "--parity-sentences", "4", "--overlays",
                     str(tmp_path / "docs")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert f"{out} was exported" in err
    assert Manifest.load(out).name == "m"


def test_a_held_out_sentence_longer_than_the_source_limit_gets_its_card_example(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parity and the card's examples decode the first 127 tokens of a source (the manifest's 128 with EOS); the
    example's word alignment must read the same tokens, not the whole sentence's."""
    from training.data.corpus import Pair

    long = " ".join(["Der Hund schläft im Haus und die Katze schläft im Garten."] * 20)
    pairs = [Pair(long, "The dog sleeps.", sentence=True), Pair("Guten Morgen.", "Good morning.", sentence=True)]
    monkeypatch.setattr(export_module, "held_out_pairs", lambda payload, count: pairs)
    out = tmp_path / "m" / "1"
    export(tiny_checkpoint, out, ExportOptions(name="m", parity_sentences=2))
    card = (out / "README.md").read_text()
    assert f"- **{long}** → " in card and "- **Guten Morgen.** → " in card
