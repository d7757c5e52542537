"""Server fixtures: one shared server on port 0 over the tiny exported model (tests that need their own settings or
lifecycle start their own)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.slow_reader import ban_end_of_sentence
from tests.integration.serving import RunningServer, ServerProcess, settings


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    ServerProcess.started.clear()  # from here on: the servers this test starts, its fixtures' included
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the log of each server process it used (what every one of its processes
    did, which the client's error alone does not say), whether its fixtures or its body started them."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    used = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, ServerProcess)]
    for server in dict.fromkeys([*used, *ServerProcess.started]):
        report.sections.append((f"server log, pid {server.process.pid}", server.log_tail()))


@pytest.fixture(scope="session")
def running(models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir))
    yield server
    server.close()


@pytest.fixture(scope="session")
def slow_models_dir(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with end-of-sentence made impossible, so every search runs to its full length budget:
    requests that stay in flight long enough to be caught by a SIGTERM, whatever the machine's speed."""
    root = tmp_path_factory.mktemp("slow-models")
    target = root / "tiny-de-en" / "1"
    shutil.copytree(models_dir / "tiny-de-en" / "1", target)
    ban_end_of_sentence(target)
    return root
