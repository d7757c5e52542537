"""Hostile calls (bench/hostile.py) against the default processes: every call gets a code that says what was wrong,
nothing is logged as an error, every process stays up, a plain call still works and SIGTERM still exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.hostile import SERVER_FAULTS, Caller, run


def test_hostile_calls_get_client_codes_and_leave_the_server_whole(models_dir: Path, caption_models_dir: Path,
                                                                   tmp_path: Path) -> None:
    both = tmp_path / "models"
    both.mkdir()
    (both / "tiny-de-en").symlink_to(models_dir / "tiny-de-en")
    (both / "tiny-scenes").symlink_to(caption_models_dir / "tiny-scenes")
    result = run(both, seconds=5, clients=8, seed=1, frontends=2, reload_interval=0)
    assert result["faults"] == []
    assert result["models"] == {"translation": ["tiny-de-en"], "captioning": ["tiny-scenes"]}
    codes = {key.split(": ", 1)[1] for key in result["codes"]}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED"} <= codes
    assert not codes & set(SERVER_FAULTS)
    assert result["calls"] > 200 and result["exit_code"] == 0
    assert set(result["log_levels"]) <= {"debug", "info", "warning"}


def test_a_client_that_stops_on_an_error_of_its_own_fails_the_check(models_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, the thread ended silently and the check passed on the calls the other clients made.
    def broken(self: Caller) -> tuple[str, str]:
        raise ValueError("a request this script could not build")

    monkeypatch.setattr(Caller, "one", broken)
    result = run(models_dir, seconds=1, clients=2, seed=1, frontends=0, reload_interval=0)
    assert sorted(result["faults"]) == [f"client {n} stopped early: ValueError('a request this script could not build')"
                                for n in (0, 1)]
