"""The benchmarks refuse bad arguments as usage errors (one line, exit status 2) while parsing them, before any model
is trained or server started: a run of no seconds or no clients would measure nothing or never end."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class Parsed(Exception):
    """Raised in place of the benchmark's work once its arguments are parsed: these tests never run one."""


@pytest.fixture
def parse_only(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parse(self, *args, **kwargs)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def _main(tool: str) -> Any:
    return importlib.import_module(f"bench.{tool}").main


REFUSED = [
    ("serving", ["--seconds", "0"]), ("serving", ["--sentences", "-1"]), ("serving", ["--soak-requests", "0"]),
    ("overhead", ["--seconds", "0"]), ("overhead", ["--client-processes", "0"]), ("overhead", ["--frontends", "-1"]),
    ("overhead", ["--texts-per-call", "0"]), ("one_client", ["--rounds", "0"]), ("one_client", ["--seconds", "-1"]),
    ("first_call", ["--calls", "1"]), ("first_call", ["--starts", "0"]), ("grpc_floor", ["--concurrency", "0"]),
    ("grpc_floor", ["--seconds", "nan"]), ("engine_ceiling", ["--window", "0"]),
    ("engine_ceiling", ["--submitters", "2", "0"]), ("engine_micro", ["--concurrency", "0"]),
    ("engine_micro", ["--repeat", "0"]), ("soak", ["--chunk", "0"]), ("soak", ["--requests", "-5"]),
    ("soak", ["--concurrency", "0"]), ("connection_age", ["--seconds", "0"]), ("hostile", ["--clients", "0"]),
    ("hostile", ["--seconds", "0"]), ("decoding_quality", ["models/de-en-mixed/2", "--beams", "0"]),
    ("attention_variants", ["--budget-tokens", "0"]), ("gpu", ["--seconds", "0"]),
    ("gpu", ["--client-processes", "0"]), ("gpu", ["--clients", "ten"]),
]


@pytest.mark.parametrize(("tool", "argv"), REFUSED, ids=[f"{t} {' '.join(a)}" for t, a in REFUSED])
def test_a_count_or_duration_that_measures_nothing_is_a_usage_error(
        tool: str, argv: list[str], parse_only: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _main(tool)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]], err
    assert argv[-1] in err  # names the value it refuses


@pytest.mark.parametrize(("tool", "argv"), [
    ("overhead", ["--seconds", "0.5", "--client-processes", "1", "--frontends", "1", "2"]),
    ("first_call", ["--calls", "2", "--starts", "1"]), ("soak", ["--requests", "10", "--chunk", "5"]),
    ("engine_micro", ["--threads", "0", "--mixed-lane-rows", "0", "128"]), ("serving", ["--sentences", "0"]),
])
def test_the_smallest_values_that_measure_something_are_taken(tool: str, argv: list[str], parse_only: None) -> None:
    with pytest.raises(Parsed):
        _main(tool)(argv)


def _not_a_checkout(tmp_path: Path) -> dict[str, Path]:
    """Folders a --baseline could wrongly name: none there, another project, a copy of this one outside git."""
    other, copy = tmp_path / "other", tmp_path / "copy"
    for folder in (other, copy):
        (folder / "server").mkdir(parents=True)
        (folder / "server" / "__main__.py").write_text("")
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    (copy / "pyproject.toml").write_text('[project]\nname = "attention-serving"\n')
    return {"not a folder": tmp_path / "missing", "is not a checkout of": other, "not a git checkout": copy}


@pytest.mark.parametrize("tool", ["overhead", "one_client", "first_call", "connection_age"])
def test_a_baseline_that_is_not_a_checkout_of_this_project_is_refused(
        tool: str, tmp_path: Path, parse_only: None, capsys: pytest.CaptureFixture[str]) -> None:
    for reason, folder in _not_a_checkout(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            _main(tool)(["--baseline", str(folder)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert f"--baseline: {folder} " in err and reason in err, err
    with pytest.raises(Parsed):  # this checkout is one
        _main(tool)(["--baseline", str(Path(__file__).resolve().parents[2])])


OUTPUTS = [("serving", "--out", []), ("overhead", "--out", []), ("overhead", "--report", []),
           ("one_client", "--out", []), ("one_client", "--report", []), ("first_call", "--out", []),
           ("first_call", "--report", []), ("grpc_floor", "--out", []), ("engine_ceiling", "--out", []),
           ("engine_micro", "--json", []), ("soak", "--out", []), ("soak", "--report", []),
           ("connection_age", "--out", []), ("hostile", "--json", []), ("hostile", "--report", []),
           ("decoding_quality", "--out", ["models/de-en-mixed/2"]), ("attention_variants", "--out", []),
           ("attention_variants", "--work", []), ("gpu", "--out", []), ("gpu", "--report", []),
           ("gpu", "--work", []), ("gpu", "--write-sentences", [])]


@pytest.mark.parametrize(("tool", "flag", "argv"), OUTPUTS, ids=[f"{t} {f}" for t, f, _ in OUTPUTS])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(
        tool: str, flag: str, argv: list[str], tmp_path: Path, parse_only: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "results"  # below a file: no one can make that folder, root included
    with pytest.raises(SystemExit) as exit_info:
        _main(tool)([*argv, flag, str(unwritable)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert f"cannot write {unwritable}" in err and "is not a folder" in err, err
    with pytest.raises(Parsed):  # a folder still to be made is fine
        _main(tool)([*argv, flag, str(tmp_path / "new" / "results.json")])


def _one_line_usage_error(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_corpus_not_built_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"ding:{tmp_path / 'not-built.txt'}"  # as data/de-en is for --data mixed before 'make data'
    line = _one_line_usage_error(_main("attention_variants"), [
        "--data", missing, "--variants", "none", "--work", str(tmp_path / "work"), "--out", str(tmp_path)], capsys)
    assert ": error: --data " in line and "not-built.txt not found" in line
    line = _one_line_usage_error(_main("decoding_quality"), ["models/de-en-bahdanau/1", "--data", missing], capsys)
    assert ": error: --data " in line and "not-built.txt not found" in line


def test_a_model_folder_without_a_manifest_is_refused_before_the_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_usage_error(_main("decoding_quality"), [str(tmp_path)], capsys)
    assert ": error: model " in line and "manifest.json not found" in line
    line = _one_line_usage_error(_main("attention_variants"), ["--reference", str(tmp_path), "--variants", "none",
                                                              "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                                 capsys)
    assert ": error: --reference " in line and "manifest.json not found" in line


@pytest.mark.parametrize(("tool", "flags"), [
    ("serving", ["models_dir", "checkpoint", "out"]), ("soak", ["models_dir", "out", "report"]),
    ("attention_variants", ["work", "out"])])
def test_the_default_paths_are_the_checkouts_from_any_folder(
        tool: str, flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[argparse.Namespace] = []
    parse = argparse.ArgumentParser.parse_args

    def keep_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parsed.append(parse(self, *args, **kwargs))
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep_then_stop)
    monkeypatch.chdir(tmp_path)  # as `cd bench && python soak.py` would
    with pytest.raises(Parsed):
        _main(tool)([])
    root = Path(__file__).resolve().parents[2]
    for flag in flags:
        assert Path(getattr(parsed[0], flag)).is_relative_to(root), (flag, getattr(parsed[0], flag))
