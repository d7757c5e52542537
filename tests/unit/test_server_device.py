"""Execution providers are chosen deliberately, with one log line saying which and why."""

from __future__ import annotations

import logging

import pytest

from server import device
from server.errors import StartupError


def test_cpu_when_asked() -> None:
    assert device.choose("cpu").providers == [device.CPU]


def test_auto_falls_back_to_cpu_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: "the CUDA libraries do not load (libcudart.so)")
    with caplog.at_level(logging.INFO, logger="attn.device"):
        chosen = device.choose("auto")
    assert (chosen.name, chosen.providers) == ("cpu", [device.CPU])
    [record] = caplog.records
    assert "libcudart" in record.fields["reason"]  # type: ignore[attr-defined]


def test_cuda_when_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: None)
    assert device.choose("auto").providers == [device.CUDA, device.CPU]


def test_cuda_demanded_but_missing_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: "no CUDA here")
    with pytest.raises(StartupError, match="no CUDA here"):
        device.choose("cuda")


def test_cuda_problem_is_a_reason_or_none() -> None:
    problem = device.cuda_problem()
    assert problem is None or isinstance(problem, str)
