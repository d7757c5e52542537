"""attn-train's edges: corpora read as the user wrote them, checkpoints tied to their data, resumed options given
anew, and one-line errors (no tracebacks) for mistakes in data, checkpoints, options and the machine."""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import DING_SAMPLE
from training import checkpoint, loop
from training import cli as train_cli
from training.caption_train import CaptionTrainConfig
from training.config import InputError
from training.data.corpus import (
    Pair,
    absolute_spec,
    checkpoint_corpus,
    data_hash,
    load_corpus,
    read_parallel,
    read_tsv,
)
from training.evaluate import write_json
from training.loop import Progress, Step, resumed_config, train_epochs
from training.recipe import carry_run_files
from training.train import TrainConfig

TINY = ["--vocab-size", "400", "--emb-dim", "16", "--hidden-dim", "16", "--attn-dim", "16", "--device", "cpu",
        "--threads", "1", "--valid-bleu-sample", "5"]


def _input_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run attn-train, expect exit 1 and return its single stderr line."""
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("attn-train: error: ")]
    return line


# -- 2: lines are '\n'-separated, BOM-free ------------------------------------------------------------------------


def test_two_file_corpora_split_lines_on_newline_only(tmp_path: Path) -> None:
    src, tgt = tmp_path / "a.de", tmp_path / "a.en"
    # U+2028, a form feed and NEL inside a sentence: str.splitlines() would split there and shift the pairs.
    src.write_bytes("eins\u2028zwei\r\ndrei\x0cvier\nfünf\x85sechs\n".encode())
    tgt.write_bytes(b"one two\r\nthree four\nfive six\n")
    assert [(p.source, p.target) for p in read_parallel(src, tgt)] == [
        ("eins\u2028zwei", "one two"), ("drei\x0cvier", "three four"), ("fünf\x85sechs", "five six")]


def test_a_byte_order_mark_is_not_part_of_the_first_source(tmp_path: Path) -> None:
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes("\ufeffHaus\thouse\r\nBaum\ttree\n".encode())
    assert read_tsv(tsv) == [Pair("Haus", "house"), Pair("Baum", "tree")]
    src, tgt = tmp_path / "b.de", tmp_path / "b.en"
    src.write_bytes("\ufeffHaus\n".encode())
    tgt.write_bytes("\ufeffhouse\n".encode())
    assert read_parallel(src, tgt) == [Pair("Haus", "house")]


# -- 1: a checkpoint names its corpus absolutely and refuses other data ------------------------------------------


def test_corpus_specs_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("corpus.tsv") == str(tmp_path / "corpus.tsv")
    assert absolute_spec("a.de,a.en") == f"{tmp_path / 'a.de'},{tmp_path / 'a.en'}"
    assert absolute_spec("ding:sample.txt") == f"ding:{tmp_path / 'sample.txt'}"
    assert absolute_spec("mixed:build") == f"mixed:{tmp_path / 'build'}"
    assert (absolute_spec("ding"), absolute_spec("mixed")) == ("ding", "mixed")


def test_a_checkpoints_corpus_must_hash_as_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, word in ((ours, "Haus\thouse\n"), (theirs, "Katze\tcat\n")):
        folder.mkdir()
        (folder / "corpus.tsv").write_text(word, encoding="utf-8")
    # An old checkpoint: a relative path, read from its own directory, still works.
    data = {"corpus": "corpus.tsv", "hash": data_hash([Pair("Haus", "house")])}
    monkeypatch.chdir(ours)
    assert checkpoint_corpus(data) == [Pair("Haus", "house")]
    # From another directory holding another corpus.tsv: refused, not silently scored.
    monkeypatch.chdir(theirs)
    with pytest.raises(InputError, match="corpus.tsv' hashes to .* trained on data hashing to"):
        checkpoint_corpus(data)
    # --data given anew is the user's choice: read as it is.
    assert checkpoint_corpus(data, "corpus.tsv") == [Pair("Katze", "cat")]


# -- 7: mistakes in data and checkpoints are one-line errors -----------------------------------------------------


def test_unreadable_corpora_are_input_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No such file or directory: '.*missing.tsv'"):
        load_corpus(str(tmp_path / "missing.tsv"))
    with pytest.raises(InputError, match="nope.txt") as no_ding:
        load_corpus(f"ding:{tmp_path / 'nope.txt'}")
    assert "trans-de-en" not in str(no_ding.value)  # the package's hint is for its own path, not one typed here
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("Haus\thouse\nMädchen\tgirl\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.tsv:2: not UTF-8 text \(byte 0xe4\)"):
        load_corpus(str(latin1))
    src, tgt = tmp_path / "c.de", tmp_path / "c.en"
    src.write_text("eins\nzwei\n", encoding="utf-8")
    tgt.write_text("one\n", encoding="utf-8")
    with pytest.raises(InputError, match="c.de has 2 lines but .*c.en has 1"):
        load_corpus(f"{src},{tgt}")
    (tmp_path / "notab.tsv").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(InputError, match="notab.tsv:1: expected 'source<TAB>target'"):
        load_corpus(str(tmp_path / "notab.tsv"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "{tmp}/missing.tsv"], "corpus '{tmp}/missing.tsv': No such file or directory"),
    (["--data", "ding:{tmp}/nope.txt"], "nope.txt not found"),
    (["--data", "{tmp}/empty.tsv"], "empty.tsv': no training pairs (0 pairs in all)"),
    (["--data", "ding:{ding}", "--vocab-size", "5"], "--vocab-size 5 is too small for this corpus"),
    (["--data", "ding:{ding}", "--max-source-tokens", "1"], "every source is longer than --max-source-tokens 1"),
    (["--resume", "{tmp}/missing.pt"], "cannot read checkpoint {tmp}/missing.pt: No such file or directory"),
    (["--resume", "{tmp}"], "cannot read checkpoint {tmp}: Is a directory"),
    (["--resume", "{tmp}/empty.tsv"], "empty.tsv is not a checkpoint (not a torch.save archive, or truncated)"),
    (["--resume", "{tmp}/truncated.pt"], "truncated.pt is not a checkpoint"),
    (["--resume", "{tmp}/caption.pt"], "caption.pt is not a translation checkpoint (kind='captioning')"),
])
def test_training_mistakes_are_one_line_errors(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    torch.save({"kind": "captioning"}, tmp_path / "caption.pt")
    whole = (tmp_path / "caption.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    argv = [a.format(tmp=tmp_path, ding=DING_SAMPLE) for a in argv]
    line = _input_error(["translation", "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1", *argv], capsys)
    assert message.format(tmp=tmp_path) in line


@pytest.mark.parametrize(("data", "message"), [
    ("flickr8k:{tmp}/nowhere", "{tmp}/nowhere has neither captions.txt nor Flickr8k.token.txt (there is no such"),
    ("flickr8k:{tmp}/notes.json", "notes.json has neither captions.txt nor Flickr8k.token.txt (it is a file: give "
                                  "the folder that holds the captions and images)"),  # it said "no such folder"
    ("flickr8k:{tmp}/wrong-header", "captions.txt: expected a header line 'image,caption'"),
    ("coco:{tmp}/missing.json", "captioning data 'coco:{tmp}/missing.json': No such file or directory"),
    ("coco:{tmp}/notes.json", "notes.json: not JSON"),
    ("coco:{tmp}/other.json", "other.json: not COCO captions (KeyError: 'annotations'"),
    ("coco:{tmp}/latin1.json", "not UTF-8 text (byte 0xe4)"),
    ("coco:{tmp}/lost.json", "1 of the captioned images are not in {tmp} (the first: lost.jpg)"),
    # Each caption longer than the decoding budget: there is nothing to train on (a ValueError's traceback before).
    ("flickr8k:{tmp}/long", "no training captions left from 'flickr8k:{tmp}/long': each of its 37 training captions "
                            "is empty or longer than 31 tokens"),  # 37 of the 40 images are in the train split
])
def test_captioning_data_mistakes_are_one_line_errors(data: str, message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    (tmp_path / "long" / "Images").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(40):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "long" / "Images" / f"{i}.png")
        lines.append(f"{i}.png," + " ".join(["a red square"] * 11))  # 33 words
    (tmp_path / "long" / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "wrong-header").mkdir()
    (tmp_path / "wrong-header" / "captions.txt").write_text("file,text\na.jpg,a cat\n", encoding="utf-8")
    (tmp_path / "notes.json").write_text("not json", encoding="utf-8")
    (tmp_path / "other.json").write_text('{"images": []}', encoding="utf-8")
    (tmp_path / "latin1.json").write_bytes('{"images": [], "annotations": [], "note": "Mädchen"}'.encode("latin-1"))
    (tmp_path / "lost.json").write_text('{"images": [{"id": 1, "file_name": "lost.jpg"}], '
                                        '"annotations": [{"image_id": 1, "caption": "a cat"}]}', encoding="utf-8")
    line = _input_error(["caption", "--data", data.format(tmp=tmp_path), "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--max-steps", "1"], capsys)
    assert message.format(tmp=tmp_path) in line


def test_an_unreadable_training_image_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    (tmp_path / "Images").mkdir()
    lines = ["image,caption"]
    for i in range(40):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "Images" / f"{i}.png")
        lines.append(f"{i}.png,a red square")
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i in range(40):  # whichever image the first batch reads
        (tmp_path / "Images" / f"{i}.png").write_bytes(b"not a PNG after all")
    assert train_cli.main(["caption", "--data", f"flickr8k:{tmp_path}", "--out", str(tmp_path / "run"), "--device",
                           "cpu", "--image-size", "16", "--stages", "2", "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The progress bar had begun: the message starts a line of its own all the same.
    (line,) = [line for line in err.splitlines() if line.startswith("attn-train: error: ")]
    assert f"cannot read image {tmp_path / 'Images'}/" in line and "cannot identify image file" in line


def _interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C at the ``step``-th training batch (1-based) of the next run."""
    from training.train import TranslationRecipe

    calls = []
    loss = TranslationRecipe.loss

    def interrupted(self: TranslationRecipe, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return loss(self, *args)

    monkeypatch.setattr(TranslationRecipe, "loss", interrupted)


def test_ctrl_c_ends_a_run_with_the_checkpoint_that_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["translation", "--data", f"ding:{DING_SAMPLE}", "--out", str(run), *TINY, "--max-tokens", "500"]
    # Before the first validation nothing resumes the run, and its last.pt is not named as if it did.
    _interrupt_at_step(monkeypatch, 3)
    assert train_cli.main([*argv, "--valid-every", "1000"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (run / "last.pt").exists()
    assert err.splitlines()[-1] == ("attn-train: interrupted before its first validation (every --valid-every 1000 "
                                    "steps) wrote a checkpoint; there is nothing to resume")
    # After one, the last.pt it wrote does.
    _interrupt_at_step(monkeypatch, 4)
    assert train_cli.main([*argv, "--valid-every", "2"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"attn-train: interrupted; {run / 'last.pt'} (written at every validation) resumes it with --resume")
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 2
    # A resumed run writes to the saved run's folder, not to --out's default: before it writes there, the checkpoint
    # it resumed from is what still resumes it.
    (run / "last.pt").rename(tmp_path / "step2.pt")
    _interrupt_at_step(monkeypatch, 1)
    assert train_cli.main(["translation", "--resume", str(tmp_path / "step2.pt")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"attn-train: interrupted before its first validation wrote a checkpoint; {tmp_path / 'step2.pt'} still "
        "resumes it with --resume")
    _interrupt_at_step(monkeypatch, 3)
    assert train_cli.main(["translation", "--resume", str(tmp_path / "step2.pt")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"attn-train: interrupted; {run / 'last.pt'} (written at every validation) resumes it with --resume")
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 4


def test_evaluating_a_non_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint", encoding="utf-8")
    assert "notes.txt is not a checkpoint" in _input_error(["evaluate", str(tmp_path / "notes.txt")], capsys)


# -- 6: no CUDA --------------------------------------------------------------------------------------------------


def test_cuda_without_a_device_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: no CUDA device is available"):
        loop.device_for("cuda", 0)
    assert loop.device_for("auto", 0) == torch.device("cpu")


# -- 4: an option given on resume replaces the saved one, even with the default's value ---------------------------


def _parsed(argv: list[str]) -> dict[str, Any]:
    args = train_cli.build_parser().parse_args(argv)
    return train_cli._given_fields(args.config, args)


def test_flags_given_with_their_default_value_count_as_given() -> None:
    assert _parsed(["translation", "--lr", "0.001", "--max-steps", "0", "--no-amp"]) == {
        "lr": 0.001, "max_steps": 0, "amp": False}
    assert _parsed(["translation"]) == {}
    saved = asdict(TrainConfig(lr=0.5, max_steps=12, threads=1))
    given = _parsed(["translation", "--lr", "0.001", "--max-steps", "0"])
    cfg = resumed_config(TrainConfig, TrainConfig(**given), saved, set(given))
    assert (cfg.lr, cfg.max_steps, cfg.threads) == (0.001, 0, 1)


def test_help_still_names_each_default() -> None:
    parser = train_cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["translation"].format_help().split())
    assert "(default: 0.001)" in text and "(default: True)" in text


# -- 5: --limit; NaN is never written as JSON ------------------------------------------------------------------


def test_a_negative_limit_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["evaluate", str(tmp_path / "best.pt"), "--limit", "-3"])
    assert exit_info.value.code == 2
    assert "--limit: must be 0 (all) or more, not -3" in capsys.readouterr().err


def test_json_results_never_hold_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        write_json({"exact_match": math.nan}, tmp_path / "out.json")


# -- 3: the best checkpoint named is one that exists --------------------------------------------------------------


def test_a_missing_best_checkpoint_is_not_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_cli._report_best(tmp_path / "best.pt")
    assert capsys.readouterr().out.startswith(f"no best checkpoint in {tmp_path}")
    (tmp_path / "best.pt").write_bytes(b"")
    train_cli._report_best(tmp_path / "best.pt")
    assert capsys.readouterr().out == f"best checkpoint: {tmp_path / 'best.pt'}\n"


def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(tmp_path: Path) -> None:
    # Dropout draws from torch's generator: a resumed run must go on from its state, not from the seed.
    argv = ["translation", "--data", f"ding:{DING_SAMPLE}", *TINY, "--max-tokens", "500", "--dropout", "0.3",
            "--valid-every", "3"]
    assert train_cli.main([*argv, "--out", str(tmp_path / "whole"), "--max-steps", "6"]) == 0
    assert train_cli.main([*argv, "--out", str(tmp_path / "halves"), "--max-steps", "3"]) == 0
    assert train_cli.main(["translation", "--resume", str(tmp_path / "halves" / "last.pt"), "--max-steps", "6"]) == 0
    whole, halves = (checkpoint.load(tmp_path / run / "last.pt") for run in ("whole", "halves"))
    assert halves["progress"]["step"] == whole["progress"]["step"] == 6
    for name, weight in whole["model"].items():
        assert torch.equal(weight, halves["model"][name]), name


def test_a_new_run_does_not_replace_another_runs_checkpoints(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["translation", "--data", f"ding:{DING_SAMPLE}", "--out", str(run), *TINY, "--max-tokens", "500"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "spm.model")}
    # The same command again (--resume forgotten, or another run meant for another folder): refused, folder untouched.
    line = _input_error([*argv, "--max-steps", "4", "--seed", "2"], capsys)
    assert line == (f"attn-train: error: --out {run} holds another run's last.pt and best.pt: continue that run with "
                    f"--resume {run / 'last.pt'}, or start this one in another --out (or remove the folder)")
    assert {name: (run / name).read_bytes() for name in before} == before
    # Nor does a run resumed into that folder: it would keep that run's best.pt as its own.
    assert train_cli.main([*argv[:4], str(tmp_path / "other"), *argv[5:], "--max-steps", "2", "--seed", "2"]) == 0
    line = _input_error(["translation", "--resume", str(tmp_path / "other" / "last.pt"), "--out", str(run),
                         "--max-steps", "3"], capsys)
    assert line.startswith(f"attn-train: error: --out {run} holds another run's last.pt and best.pt")
    assert {name: (run / name).read_bytes() for name in before} == before
    # What it points to works.
    assert train_cli.main(["translation", "--resume", str(run / "last.pt"), "--max-steps", "4"]) == 0
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 4


def test_a_resumed_run_refuses_options_it_cannot_take(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.tsv").write_text("Haus\thouse\n", encoding="utf-8")
    argv = ["translation", "--data", f"ding:{DING_SAMPLE}", "--out", "run", *TINY, "--max-tokens", "500"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    # Another corpus or another attention would be ignored: the saved run's config is kept.
    line = _input_error(["translation", "--resume", "run/last.pt", "--data", "other.tsv", "--attention", "luong-dot",
                         "--max-steps", "3"], capsys)
    assert line.startswith("attn-train: error: --resume run/last.pt keeps the config the run was trained with, so "
                           f"it cannot take --data 'other.tsv' (it has 'ding:{DING_SAMPLE}'), --attention 'luong-dot' "
                           "(it has 'bahdanau'); only --out, ")
    assert checkpoint.load(tmp_path / "run" / "last.pt")["progress"]["step"] == 2
    # The first command again with --resume (its corpus relative, its options the same) is no change.
    relative = f"ding:{Path('..') / DING_SAMPLE.relative_to(DING_SAMPLE.parents[1])}"
    monkeypatch.chdir(DING_SAMPLE.parent)
    assert train_cli.main([*argv[:2], relative, "--out", str(tmp_path / "run"), *argv[5:], "--max-steps", "3",
                           "--resume", str(tmp_path / "run" / "last.pt")]) == 0
    assert checkpoint.load(tmp_path / "run" / "last.pt")["progress"]["step"] == 3


def test_a_run_that_spent_its_epochs_resumes_with_more_of_them(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "small.tsv").write_text("".join(f"{p.source}\t{p.target}\n" for p in
                                                load_corpus(f"ding:{DING_SAMPLE}")[:300]), encoding="utf-8")
    run = tmp_path / "run"
    assert train_cli.main(["translation", "--data", str(tmp_path / "small.tsv"), "--out", str(run), *TINY,
                           "--epochs", "1"]) == 0
    one_epoch = checkpoint.load(run / "last.pt")["progress"]
    assert one_epoch["epoch"] == 1
    # Another budget cannot reach past the spent --epochs: said in one line, nothing rewritten.
    line = _input_error(["translation", "--resume", str(run / "last.pt"), "--max-steps", "50"], capsys)
    assert line == (f"attn-train: error: --resume {run / 'last.pt'}: nothing left to train, the run has spent its "
                    "--epochs 1 (epoch 1) budget; give a larger one with --resume (--epochs and --max-* budgets given "
                    "anew extend it)")
    assert checkpoint.load(run / "last.pt")["progress"] == one_epoch
    # A larger --epochs extends it.
    assert train_cli.main(["translation", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    two_epochs = checkpoint.load(run / "last.pt")
    assert (two_epochs["progress"]["epoch"], two_epochs["progress"]["step"]) == (2, 2 * one_epoch["step"])
    assert two_epochs["train_config"]["epochs"] == 2


def test_an_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    for out, reason in ((tmp_path / "notes.txt", "File exists"), (tmp_path / "notes.txt" / "run", "Not a directory")):
        line = _input_error(["translation", "--data", f"ding:{DING_SAMPLE}", "--out", str(out), *TINY,
                             "--max-steps", "1"], capsys)
        assert line == f"attn-train: error: --out {out}: cannot create the run folder ({reason})"
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize(("files", "message"), [
    ({"manifest.json": "nope"}, "manifest.json: not JSON (Expecting value: line 1 column 1 (char 0)); rebuild"),
    ({"manifest.json": "{}"}, "manifest.json: no 'hash' of the corpus; rebuild the corpus with 'make data'"),
    ({"manifest.json": '{"hash": "x"}', "train.tsv": "src\ttgt\n"}, "train.tsv: expected the header source<TAB>"),
    ({"manifest.json": '{"hash": "x"}', **{f"{name}.tsv": "source\ttarget\tdomain\tgroup\tsentence\n"
                                           for name in ("train", "valid", "test")}}, "the manifest says x"),
])
def test_a_broken_corpus_build_is_a_one_line_error(files: dict[str, str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "built").mkdir()
    for name, text in files.items():
        (tmp_path / "built" / name).write_text(text, encoding="utf-8")
    line = _input_error(["translation", "--data", str(tmp_path / "built"), "--out", str(tmp_path / "run"), *TINY,
                         "--max-steps", "1"], capsys)
    assert line.startswith(f"attn-train: error: {tmp_path / 'built'}") and message in line


def test_an_evaluation_out_that_cannot_be_written_is_refused_before_evaluating(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    monkeypatch.setattr(checkpoint, "load", lambda *_, **__: pytest.fail("the checkpoint was read first"))
    line = _input_error(["evaluate", "best.pt", "--out", str(tmp_path)], capsys)
    assert line == f"attn-train: error: --out {tmp_path} is a folder; give the JSON file to write, such as " \
                   f"{tmp_path / 'eval.json'}"
    line = _input_error(["evaluate", "best.pt", "--out", str(tmp_path / "notes.txt" / "eval.json")], capsys)
    assert line == f"attn-train: error: --out {tmp_path / 'notes.txt' / 'eval.json'}: cannot create its folder " \
                   f"{tmp_path / 'notes.txt'} " \
                   "(File exists)"
    with pytest.raises(InputError, match=f"cannot write {tmp_path}: Is a directory"):
        write_json({}, tmp_path)


# -- 8: minor --------------------------------------------------------------------------------------------------------


def test_a_budget_ending_on_a_validation_step_validates_it_once() -> None:
    cfg = SimpleNamespace(max_steps=4, valid_every=2, max_target_tokens=0, max_minutes=0.0, epochs=10)
    validated: list[int] = []
    progress = Progress()
    train_epochs(cfg, progress, 0, 1, lambda epoch: [[0]] * 10, lambda batch: Step(1, 1),
                 lambda: validated.append(progress.step), items="sent")
    assert validated == [2, 4]
    validated.clear()
    cfg.max_steps = 5  # a budget off the validation grid is still validated at its end
    train_epochs(cfg, Progress(), 0, 1, lambda epoch: [[0]] * 10, lambda batch: Step(1, 1),
                 lambda: validated.append(-1), items="sent")
    assert len(validated) == 3


def test_nan_budgets_and_gridless_images_are_refused() -> None:
    with pytest.raises(ValueError, match="--max-minutes must not be negative, not nan"):
        TrainConfig(max_minutes=math.nan)
    with pytest.raises(ValueError, match="--max-minutes"):
        CaptionTrainConfig(max_minutes=math.nan)
    with pytest.raises(ValueError, match="--image-size 32 leaves no grid cell after --stages 10"):
        CaptionTrainConfig(image_size=32, stages=10)
    assert CaptionTrainConfig(image_size=32, stages=5).stages == 5  # a 1 × 1 grid


def test_checkpoint_load_still_reads_real_checkpoints(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "c.pt", {"kind": "translation", "x": torch.zeros(1)})
    assert checkpoint.load(tmp_path / "c.pt")["kind"] == "translation"


def test_a_run_resumed_into_a_new_folder_starts_with_its_tokenizer_and_best(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (first / "best.pt").write_bytes(b"the restored best")
    resume = {"tokenizer": b"spm bytes"}
    carry_run_files(first / "last.pt", resume, second)
    assert (second / "spm.model").read_bytes() == b"spm bytes"
    assert (second / "best.pt").read_bytes() == b"the restored best"
    (second / "best.pt").write_bytes(b"a newer best")  # a folder that has its own best keeps it
    carry_run_files(first / "last.pt", resume, second)
    assert (second / "best.pt").read_bytes() == b"a newer best"


def test_the_evaluation_module_says_a_mistake_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "training.evaluate", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("python -m training.evaluate: error: ") and "missing.pt" in done.stderr


def test_the_evaluation_module_points_a_captioning_checkpoint_to_attn_train_evaluate(tmp_path: Path) -> None:
    from training import evaluate

    torch.save({"kind": "captioning"}, tmp_path / "caption.pt")
    with pytest.raises(InputError, match="caption.pt is a captioning checkpoint; .* attn-train evaluate"):
        evaluate.main([str(tmp_path / "caption.pt")])


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["attn_train", "attn_export"])
def test_ctrl_c_while_the_command_imports_torch_ends_it_in_one_line(command: str) -> None:
    """The console scripts' entry points (pyproject.toml) import the command inside the handler: a Ctrl-C during
    the second or more that torch's import takes ends it as one during the run does."""
    program = command.replace("_", "-")
    assert f'{program} = "training.launch:{command}"' in (REPO / "pyproject.toml").read_text()
    # torch's import is held until the signal comes (a warm cache makes it quick enough for the command to end
    # first): the child says when it has begun, and the signal arrives inside it, wherever a Ctrl-C would.
    held_import = f"""
import builtins, sys, time
real_import = builtins.__import__
def held(name, *args, **kwargs):
    if name.split(".")[0] == "torch":
        builtins.__import__ = real_import
        print("importing torch", flush=True)
        time.sleep(60)
    return real_import(name, *args, **kwargs)
builtins.__import__ = held
from training.launch import {command}
sys.exit({command}(["--help"]))
"""
    started = subprocess.Popen([sys.executable, "-c", held_import], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert started.stdout is not None and started.stdout.readline() == "importing torch\n"
    started.send_signal(signal.SIGINT)
    _, err = started.communicate(timeout=60)
    assert started.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"{program}: interrupted")
