"""attn-export refuses what it cannot export before it touches anything: an --out that is not models/NAME/VERSION, a
--name the server would refuse, a folder that is not a model version, a bad --metrics or checkpoint, a parity check
over nothing. No model is trained here: every refusal comes before the checkpoint would be used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporter import cli
from exporter.caption_export import caption_words, held_out_images
from exporter.export import held_out_pairs
from exporter.parity import ParityReport
from exporter.template import ExportOptions, model_folder_names, read_metrics, staged
from server.artifacts.attention_maps import overlay
from training.config import InputError
from training.data.corpus import checkpoint_corpus


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "usage: attn-export" in err
    return err


def _failure(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's own error convention: exit status 1 and one line ``attn-export: ...``."""
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("attn-export: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory with a file in it that no refused export may remove."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize("out", [".", "..", "v1", "/", "../v1", "models/m/..", "models/.hidden/1", "models/m/.1"])
def test_an_out_that_is_not_models_name_version_is_a_usage_error(
    out: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(["missing.pt", "--out", out, "--force"], capsys)
    assert "models/NAME/VERSION" in err
    assert (workdir / "keep.txt").read_text() == "mine" and sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


def test_model_folder_names_are_the_folders_the_server_discovers() -> None:
    assert model_folder_names(Path("models/tiny-de-en/1")) == ("tiny-de-en", "1")
    assert model_folder_names(Path("/srv/models/tiny/20240101/")) == ("tiny", "20240101")
    with pytest.raises(ValueError, match="NAME would be ''"):
        model_folder_names(Path("v1"))


@pytest.mark.parametrize("name", ["other", "../evil", ""])
def test_a_name_other_than_the_folder_of_out_is_a_usage_error(
    name: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(["missing.pt", "--out", "models/m/1", "--name", name], capsys)
    assert f"--name {name!r} differs" in err and "server" in err
    assert not (workdir / "models").exists()


@pytest.mark.parametrize("count", ["0", "-5"])
def test_parity_sentences_must_be_at_least_one(count: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["missing.pt", "--out", "models/m/1", "--parity-sentences", count], capsys)
    assert "--parity-sentences: must be at least 1" in err


def test_export_options_refuse_a_parity_check_over_nothing() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ExportOptions(name="m", parity_sentences=0)


def test_a_parity_report_over_nothing_does_not_pass() -> None:
    assert not ParityReport().passed
    assert ParityReport(sentences=1, identical_tokens=1).passed


def test_a_folder_that_is_not_a_model_version_is_never_replaced(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--out ~` or `--out .` spelled as a path that does look like NAME/VERSION: home/user, tmp/work...
    err = _failure(["missing.pt", "--out", str(workdir), "--force"], capsys)
    assert "is not a model version folder" in err
    assert (workdir / "keep.txt").read_text() == "mine"


def test_ctrl_c_during_an_export_says_the_folder_was_not_written(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.checkpoint, "load", lambda *_, **__: {"kind": "translation"})
    monkeypatch.setattr(cli, "export", interrupted)
    assert cli.main(["run/best.pt", "--out", "models/m/1"]) == 130
    assert capsys.readouterr().err == "attn-export: interrupted; models/m/1 was not written\n"


def test_ctrl_c_while_the_checkpoint_loads_is_one_line_too(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.checkpoint, "load", interrupted)
    assert cli.main(["run/best.pt", "--out", "models/m/1"]) == 130
    assert capsys.readouterr().err == "attn-export: interrupted; models/m/1 was not written\n"


def test_a_disk_that_fills_during_the_export_is_a_one_line_error(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device", "models/m/.1.staging/encoder.onnx")

    monkeypatch.setattr(cli.checkpoint, "load", lambda *_, **__: {"kind": "translation"})
    monkeypatch.setattr(cli, "export", disk_full)
    err = _failure(["run/best.pt", "--out", "models/m/1"], capsys)
    assert err == ("attn-export: models/m/1 was not written: No space left on device "
                   "(models/m/.1.staging/encoder.onnx)\n")


def test_staging_refuses_to_replace_a_folder_without_a_manifest_even_with_force(tmp_path: Path) -> None:
    out = tmp_path / "home" / "user"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model version folder"), staged(out, force=True) as staging:
        (staging / "manifest.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["user"]  # no staging folder left behind


def test_staging_replaces_a_model_version_folder_with_force(tmp_path: Path) -> None:
    out = tmp_path / "m" / "1"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="pass --force"), staged(out, force=False):
        pass
    with staged(out, force=True) as staging:
        (staging / "new.onnx").write_bytes(b"")
    assert sorted(p.name for p in out.iterdir()) == ["new.onnx"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["1"]  # nothing left beside it


def test_a_replaced_version_is_removed_only_once_the_new_one_holds_its_name(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A server looking at the models folder while --force replaces a version must always find one there: the old
    files go only after the new folder took the name (removing a large model's files takes a while)."""
    import exporter.template

    out = tmp_path / "m" / "1"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text('{"old": true}')
    seen: list[str] = []
    remove = shutil.rmtree

    def observed(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).exists():
            seen.append((out / "manifest.json").read_text() if out.exists() else "no version")
        remove(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(exporter.template.shutil, "rmtree", observed)
    with staged(out, force=True) as staging:
        seen.clear()  # from here on the version is being replaced
        (staging / "manifest.json").write_text('{"new": true}')
    assert seen and set(seen) == {'{"new": true}'}, seen


@pytest.mark.parametrize("failure", [OSError(16, "Device or resource busy"), KeyboardInterrupt()])
def test_a_version_whose_replacement_fails_to_take_its_name_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """The old version is renamed aside before the new one takes its name: when that second rename fails (or
    Ctrl-C lands between the two), the old one gets its name back instead of being removed with the new one."""
    out = tmp_path / "m" / "1"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text('{"old": true}')
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:
        if self.name == ".1.staging":
            raise failure
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(type(failure)), staged(out, force=True) as staging:
        (staging / "manifest.json").write_text('{"new": true}')
    assert (out / "manifest.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["1"]  # no staging or replaced folder left


class _ExportFailed(Exception):
    pass


def _fail_in_staging(out: Path) -> None:
    with pytest.raises(_ExportFailed), staged(out, force=False) as staging:
        (staging / "encoder.onnx").write_bytes(b"")
        raise _ExportFailed  # parity, the checker, anything


def test_a_failed_first_export_of_a_model_leaves_no_model_folder(tmp_path: Path) -> None:
    """A server scanning the models folder would otherwise find a model NAME with no versions."""
    models = tmp_path / "models"
    models.mkdir()
    _fail_in_staging(models / "m" / "1")
    assert list(models.iterdir()) == []
    _fail_in_staging(tmp_path / "new" / "models" / "m" / "1")  # folders above NAME it made go too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_failed_export_keeps_a_model_folder_that_was_there(tmp_path: Path) -> None:
    empty, served = tmp_path / "models" / "empty", tmp_path / "models" / "served"
    empty.mkdir(parents=True)
    (served / "1").mkdir(parents=True)
    (served / "1" / "manifest.json").write_text("{}")
    _fail_in_staging(empty / "1")
    _fail_in_staging(served / "2")
    assert list(empty.iterdir()) == []
    assert sorted(p.name for p in served.iterdir()) == ["1"] and (served / "1" / "manifest.json").is_file()


def test_an_export_made_into_a_new_model_folder_stays(tmp_path: Path) -> None:
    out = tmp_path / "models" / "m" / "1"
    with staged(out, force=False) as staging:
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.parent.iterdir()) == ["1"]


def test_metrics_are_checked_before_the_checkpoint_and_named(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _failure(["missing.pt", "--out", "models/m/1", "--metrics", "missing.json"], capsys)
    assert "metrics file missing.json" in err
    (workdir / "corpus.tsv").write_text("Hallo\tHello\n")
    err = _failure(["missing.pt", "--out", "models/m/1", "--metrics", "corpus.tsv"], capsys)
    assert "metrics file corpus.tsv is not JSON" in err
    assert not (workdir / "models").exists()


def test_read_metrics_wants_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=f"metrics file {path} is not a JSON object"):
        read_metrics(path)
    path.write_text(json.dumps({"split": "test"}))
    assert read_metrics(path) == {"split": "test"}


def _checkpoints(folder: Path) -> dict[str, Path]:
    """Files that are not checkpoints of attn-train, in the ways a tester finds them."""
    torch.save({"kind": "translation", "model": {"w": torch.zeros(4096)}}, folder / "whole.pt")
    whole = (folder / "whole.pt").read_bytes()
    files = {"truncated": folder / "truncated.pt", "text": folder / "corpus.tsv", "tensor": folder / "tensor.pt",
             "directory": folder / "run", "missing": folder / "missing.pt"}
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["text"].write_text("Hallo\tHello\n")
    torch.save(torch.zeros(3), files["tensor"])
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("what", ["missing", "directory", "truncated", "text", "tensor"])
def test_a_missing_or_corrupt_checkpoint_is_a_one_line_error_naming_it(
    what: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _checkpoints(workdir)[what]
    err = _failure([str(path), "--out", "models/m/1"], capsys)
    assert str(path) in err and "Traceback" not in err
    assert not (workdir / "models").exists()


def test_caption_words_have_an_eos_only_when_the_caption_has_its_row() -> None:
    rows = np.full((3, 4), 0.25)
    assert caption_words(["▁a", "▁red", "▁disc"], rows) == ["a", "red", "disc"]  # cut at the maximum length
    assert caption_words(["▁a", "▁disc"], rows) == ["a", "disc", "<eos>"]


def test_overlay_draws_a_caption_without_eos_and_names_a_missing_row() -> None:
    grid = (2, 2)
    rows = np.full((2, 4), 0.25)
    sheet = overlay(Image.new("RGB", (32, 32)), ["a", "disc"], rows, grid, panel=32)
    assert sheet.size == (3 * 32, 32 + 32 // 6)
    with pytest.raises(ValueError, match="3 words but 2 attention rows"):
        overlay(Image.new("RGB", (32, 32)), ["a", "disc", "<eos>"], rows, grid, panel=32)


def _changed_corpus(tmp_path: Path) -> dict[str, str]:
    """The ``data`` section of a checkpoint whose corpus was edited after training (the hash no longer matches)."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("Hallo\tHello\nDanke\tThanks\n", encoding="utf-8")
    return {"corpus": str(corpus), "hash": "0" * 16}


def test_a_changed_corpus_is_refused_without_pointing_at_a_data_flag_the_export_lacks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="hashes to") as refused:
        held_out_pairs({"data": _changed_corpus(tmp_path)}, 4)
    assert "--data" not in str(refused.value) and "as it was at training" in str(refused.value)
    assert "--data" not in cli.build_parser().format_help()  # what the message must not offer


def test_changed_captions_are_refused_without_pointing_at_a_data_flag_the_export_lacks() -> None:
    config = {"image_size": 16, "scene_seed": 0, "train_images": 2, "valid_images": 1, "test_images": 1}
    with pytest.raises(InputError, match="hashes to") as refused:
        held_out_images({"data": {"corpus": "scenes", "hash": "0" * 16}, "train_config": config}, 1)
    assert "--data" not in str(refused.value) and "as it was at training" in str(refused.value)


def test_evaluate_still_offers_its_data_flag_for_a_changed_corpus(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="or give --data"):
        checkpoint_corpus(_changed_corpus(tmp_path))


def test_overlays_for_a_translation_checkpoint_are_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"kind": "translation"}, workdir / "last.pt")
    err = _failure(["last.pt", "--out", "models/m/1", "--overlays", "docs"], capsys)
    assert err == ("attn-export: --overlays draws a captioning model's attention; last.pt is a translation checkpoint "
                   "(its model card shows its alignments)\n")
    assert not (workdir / "models").exists() and not (workdir / "docs").exists()


def test_an_out_under_a_file_is_a_one_line_error(workdir: Path) -> None:
    with pytest.raises(ValueError) as refused, staged(workdir / "keep.txt" / "m" / "1", force=False):
        pytest.fail("nothing is exported into a folder that cannot be made")
    assert str(refused.value) == (f"cannot write the model version folder {workdir / 'keep.txt' / 'm' / '1'}: Not a "
                                  f"directory ({workdir / 'keep.txt' / 'm' / '.1.staging'})")
    assert (workdir / "keep.txt").read_text() == "mine"


def test_metrics_must_be_what_attn_train_evaluate_writes_for_the_family(tmp_path: Path) -> None:
    from exporter.caption_export import CaptionExporter
    from exporter.export import TranslationExporter

    repo = Path(__file__).resolve().parents[2]
    for family, model in ((TranslationExporter, "de-en-bahdanau/1"), (CaptionExporter, "scenes-sat/1")):
        evaluation = json.loads((repo / "models" / model / "manifest.json").read_text())["metrics"]["evaluation"]
        (tmp_path / f"{family.kind}.json").write_text(json.dumps(evaluation), encoding="utf-8")
        assert read_metrics(tmp_path / f"{family.kind}.json", family.evaluation_keys) == evaluation
    # One family's scores for the other's card: refused before the export, not a KeyError when the card is written.
    with pytest.raises(ValueError, match=r"captioning.json has no pairs, all, sentences, phrases, by_source_words;"):
        read_metrics(tmp_path / "captioning.json", TranslationExporter.evaluation_keys)
    with pytest.raises(ValueError, match=r"translation.json has no images, bleu1, bleu2, bleu3, bleu4, exact_match;"):
        read_metrics(tmp_path / "translation.json", CaptionExporter.evaluation_keys)
    (tmp_path / "nan.json").write_text('{"split": "test", "bleu": NaN}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nan.json is not JSON \(NaN is not a JSON number\)"):
        read_metrics(tmp_path / "nan.json")
