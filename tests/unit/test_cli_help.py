"""Every flag of attn-train, attn-export and attn-serve explains itself; bad values are usage errors, not tracebacks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from exporter import cli as export_cli
from server.settings import Settings
from training import cli as train_cli
from training.models.rnn import ATTENTIONS


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = train_cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "usage: attn-train" in err
    return err


@pytest.mark.parametrize("command", ["translation", "caption"])
def test_every_training_flag_has_help_with_its_default(command: str) -> None:
    parser = _subcommand(command)
    flags = _flags(parser)
    assert len(flags) > 30
    for name, action in flags.items():
        assert action.help and action.help.strip(), f"attn-train {command} {name} has no help"
    text = parser.format_help()  # formats every help string: a stray % would raise here
    assert "(default: auto)" in text and "--amp, --no-amp" in text


def test_training_flags_offer_their_choices() -> None:
    translation = _flags(_subcommand("translation"))
    assert tuple(translation["--arch"].choices) == ("rnn", "transformer")
    assert set(translation["--attention"].choices) == {*ATTENTIONS, "multihead"}
    assert tuple(translation["--device"].choices) == ("auto", "cpu", "cuda")
    caption = _flags(_subcommand("caption"))
    assert tuple(caption["--init-state"].choices) == ("mean", "learned")
    assert "valid_attention_correctness" in caption["--best-by"].choices
    assert {"word", "unigram"} <= set(caption["--tokenizer"].choices)


def test_an_unknown_arch_is_a_usage_error_naming_the_choices(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["translation", "--arch", "foo", "--out", str(tmp_path)], capsys)
    assert "invalid choice: 'foo'" in err and "'rnn'" in err and "'transformer'" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--max-steps", "-1"], "--max-steps must not be negative"),
    (["--heads", "0"], "--heads must be positive"),
    (["--arch", "transformer", "--attention", "luong-dot"], "multi-head attention, not 'luong-dot'"),
    (["--arch", "rnn", "--attention", "multihead"], "--arch rnn has no 'multihead' attention"),
    (["--arch", "transformer", "--emb-dim", "30", "--heads", "4"], "not divisible by 4 heads"),
    (["--attention", "luong-general", "--hidden-dim", "33"], "even hidden_dim"),
])
def test_invalid_translation_values_are_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A corpus that does not exist: without the check the run would stop there, with a traceback.
    err = _usage_error(["translation", "--data", str(tmp_path / "none.tsv"), "--out", str(tmp_path), *argv], capsys)
    assert message in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--init-state", "zero"], "invalid choice: 'zero'"),
    (["--backbone", "vgg"], "--backbone 'vgg'"),
    (["--data", "flickr8k"], "--data 'flickr8k'"),
    (["--context-dropout", "1"], "--context-dropout must be in [0, 1)"),
    # Real data has no object boxes: best.pt was silently the last validation's
    (["--data", "flickr8k:f8k", "--best-by", "valid_attention_correctness"],
     "--best-by valid_attention_correctness needs --data scenes"),
])
def test_invalid_caption_values_are_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Tiny scene splits: without the check the run would fail (or train) quickly, not exit with a usage error.
    small = ["--train-images", "2", "--valid-images", "1", "--test-images", "1", "--max-steps", "1", "--device", "cpu"]
    err = _usage_error(["caption", "--out", str(tmp_path), *small, *argv], capsys)
    assert message in err


def test_every_export_flag_has_help() -> None:
    parser = export_cli.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and action.help.strip(), f"attn-export {action.dest} has no help"
    assert "(default: 500)" in parser.format_help()


def test_serve_help_shows_boolean_pairs_and_variant_choices() -> None:
    text = Settings.parser().format_help()
    assert "--batching, --no-batching" in text and "--ort-allow-spinning, --no-ort-allow-spinning" in text
    assert "--batching BATCHING" not in text
    assert "--variant {,int8,fp16}" in text


@pytest.mark.parametrize(("argv", "env", "batching"), [
    (["--no-batching"], {}, False),
    (["--batching"], {"ATTN_BATCHING": "false"}, True),  # the flag wins over the environment
    (["--no-batching"], {"ATTN_BATCHING": "true"}, False),
])
def test_boolean_flags(argv: list[str], env: dict[str, str], batching: bool) -> None:
    assert Settings.from_sources(argv, environ=env).batching is batching


def test_the_environment_decides_when_no_flag_is_given() -> None:
    assert Settings.from_sources([], environ={"ATTN_BATCHING": "false"}).batching is False
    assert Settings.from_sources([], environ={}).batching is True
    s = Settings.from_sources(["--ort-allow-spinning"], environ={"ATTN_ORT_ALLOW_SPINNING": "false",
                                                                  "ATTN_BATCHING": "no"})
    assert (s.ort_allow_spinning, s.batching) == (True, False)


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--variant", "int4"], {}, "invalid choice: 'int4'"),
    ([], {"ATTN_VARIANT": "int4"}, "variant must be one of"),
    (["--batching", "false"], {}, "unrecognized arguments: false"),
])
def test_bad_serve_values_are_usage_errors(argv: list[str], env: dict[str, str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Settings.from_sources(argv, environ=env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
