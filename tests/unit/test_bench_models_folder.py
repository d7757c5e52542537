"""The one-model folder the serving benchmarks start their servers on (runs/bench-models): it holds the model the
run's arguments name, whatever an earlier run left there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.loadgen import only_model  # noqa: E402


def _model(root: Path, name: str) -> Path:
    (root / name / "1").mkdir(parents=True)
    return root / name


def test_the_folder_serves_the_model_named_now_not_the_one_linked_before(tmp_path: Path) -> None:
    folder, old, new = tmp_path / "bench-models", tmp_path / "old", tmp_path / "new"
    only_model(folder, _model(old, "de-en-bahdanau"))
    only_model(folder, _model(old, "de-en-mixed"))  # serving.py --model de-en-mixed, another run
    assert only_model(folder, _model(new, "de-en-bahdanau")) == folder  # overhead.py --bundled NEW
    assert [(p.name, p.resolve()) for p in folder.iterdir()] == [("de-en-bahdanau", (new / "de-en-bahdanau"))]
    only_model(folder, new / "de-en-bahdanau")  # named again: the link stays
    assert [p.name for p in folder.iterdir()] == ["de-en-bahdanau"]


def test_a_model_folder_that_is_not_there_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model folder at .*de-en-bahdanau"):
        only_model(tmp_path / "bench-models", tmp_path / "de-en-bahdanau")


@pytest.mark.parametrize("tool", ["overhead", "one_client"])
def test_a_bundled_folder_without_the_model_is_refused_before_the_run(
        tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{tool}").main(["--bundled", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"error: --bundled {tmp_path}: no de-en-bahdanau folder in it"
                                         + (" (or --skip-bundled)" if tool == "overhead" else ""))
