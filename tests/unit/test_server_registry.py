"""Model discovery and lookup (the loading of real models is covered by the integration tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.device import CPU, Device
from server.errors import ModelNotFound, NotReady, StartupError
from server.registry import LoadInterrupted, ModelLoadError, Registry, _folders, discover

CPU_DEVICE = Device("cpu", [CPU], "test")


class FakeModel:
    family = "translation"

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version

    def info(self) -> dict[str, Any]:
        return {}

    def warm_up(self) -> float:
        return 0.0


def test_discover_skips_hidden_folders_and_folders_without_manifest(tmp_path: Path) -> None:
    for folder in ("a/1", "a/.2.staging", ".b/1", "c/1"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("a/1", "a/.2.staging", ".b/1"):
        (tmp_path / folder / "manifest.json").write_text("{}")
    assert discover(tmp_path) == [tmp_path / "a" / "1"]


def test_missing_models_dir_and_invalid_manifest_stop_the_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        Registry(tmp_path / "nope", CPU_DEVICE).load()
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(StartupError, match=r"invalid model .*m/1.*not valid JSON"):
        Registry(tmp_path, CPU_DEVICE).load()


def test_empty_models_dir(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="no servable model"):
        Registry(tmp_path, CPU_DEVICE).load()


def test_a_pin_to_a_missing_version_is_named_when_nothing_loads(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "manifest.json").write_text("{}")
    with pytest.raises(StartupError, match=r"the pinned versions m=9 \(pinned_versions\) are not in it"):
        Registry(tmp_path, CPU_DEVICE, pins={"m": "9"}).load()


@pytest.mark.parametrize("pin", ["m=9", "n=1"], ids=["missing-version", "missing-model"])
def test_a_pin_to_a_missing_version_stops_the_start_while_other_models_load(tmp_path: Path, pin: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped pin must not start a server without that model (and a reload, or an engine restarted after a
    crash, goes on with what the folder holds)."""
    for name in ("m", "o"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "manifest.json").write_text("{}")
    name, version = pin.split("=")
    registry = Registry(tmp_path, CPU_DEVICE, pins={name: version})
    monkeypatch.setattr(registry, "_load_one", lambda directory: FakeModel(directory.parent.name, directory.name))
    monkeypatch.setattr("server.registry.Engine", lambda *_: object())
    with pytest.raises(StartupError, match=rf"the pinned versions {pin} \(pinned_versions\) are not in {tmp_path}"):
        registry.load()
    registry.load(strict=False)
    assert sorted((m.name, m.version) for m in registry.models()) == ([("o", "1")] if name == "m" else
                                                                        [("m", "1"), ("o", "1")])


def test_a_stop_while_the_models_load_ends_the_load_after_the_version_loading(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM during a start-up that loads many (or large) models: the process exits after the version it is
    loading, not after all of them; what was loaded is closed, never served."""
    for name in ("a", "b", "c"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "manifest.json").write_text("{}")
    registry = Registry(tmp_path, CPU_DEVICE)
    loaded: list[str] = []
    closed: list[str] = []

    class FakeEngine:
        def __init__(self, model: FakeModel, *_: object) -> None:
            self.name = model.name

        def close(self) -> None:
            closed.append(self.name)

    def load_then_get_stopped(directory: Path) -> FakeModel:
        loaded.append(directory.parent.name)
        registry.interrupt()  # what the SIGTERM handler does, while this version loads
        return FakeModel(directory.parent.name, directory.name)

    monkeypatch.setattr(registry, "_load_one", load_then_get_stopped)
    monkeypatch.setattr("server.registry.Engine", FakeEngine)
    with pytest.raises(LoadInterrupted):
        registry.load()
    assert loaded == ["a"] and closed == ["a"]
    assert not registry.ready and registry.models() == []
    assert registry.reload() == {"loaded": [], "refused": [], "retired": []} and loaded == ["a"]


def test_an_engine_restarted_without_its_default_model_serves_the_others(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model (ATTN_DEFAULT_MODEL, which make run sets) removed or broken on disk, then an engine crash:
    the restarted engine (not strict) serves the other models, as the reload that retired the default did, instead
    of failing every restart; only the start of the server insists on it."""
    (tmp_path / "other" / "1").mkdir(parents=True)
    (tmp_path / "other" / "1" / "manifest.json").write_text("{}")
    monkeypatch.setattr("server.registry.Engine", lambda *_: object())
    for strict in (True, False):
        registry = Registry(tmp_path, CPU_DEVICE, default_model="gone")
        monkeypatch.setattr(registry, "_load_one", lambda directory: FakeModel(directory.parent.name, directory.name))
        if strict:
            with pytest.raises(StartupError, match="default model 'gone' is not among the loaded models"):
                registry.load()
        else:
            registry.load(strict=False)
            assert registry.ready and [m.name for m in registry.models()] == ["other"]


def test_lookup_defaults_and_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path, CPU_DEVICE)
    with pytest.raises(NotReady):
        registry.get()
    for name, version in [("b", "2"), ("b", "10"), ("a", "1")]:
        registry._models[(name, version)] = FakeModel(name, version)
    registry.default_model = "b"
    registry._ready.set()
    assert (registry.get().name, registry.get().version) == ("b", "10")  # numeric order: 10 is newer than 2
    assert registry.get("b", "2").version == "2"
    assert registry.get("a").version == "1"
    with pytest.raises(ModelNotFound, match="model 'c' is not loaded; loaded models: a, b"):
        registry.get("c")
    with pytest.raises(ModelNotFound, match="model 'b' has no version '3'; loaded versions: 2, 10"):
        registry.get("b", "3")
    assert [(m.name, m.version) for m in registry.models()] == [("a", "1"), ("b", "2"), ("b", "10")]


def test_a_version_whose_files_change_while_it_fails_to_load_is_tried_again(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A version published file by file (``cp -r``) can fail to load on a file still being copied, and the copy can
    end before the refusal is recorded: the version is judged by its files as the failed attempt found them, so the
    finished copy is tried again at the next look (and a version unchanged since a refusal is not)."""
    version = tmp_path / "m" / "2"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    registry = Registry(tmp_path, CPU_DEVICE)
    attempts: list[Path] = []

    def fail_while_the_copy_ends(directory: Path) -> None:
        attempts.append(directory)
        if len(attempts) == 1:
            (directory / "decoder_step.onnx").write_bytes(b"the last file of the copy")
        raise ModelLoadError(f"invalid model {directory}")

    monkeypatch.setattr(registry, "_load_one", fail_while_the_copy_ends)
    assert registry.reload()["refused"] == ["m/2"]
    assert registry.reload()["refused"] == ["m/2"]  # its files changed after the first attempt began
    assert registry.reload()["refused"] == []  # unchanged since the second
    assert attempts == [version, version]


def test_a_version_deleted_while_a_reload_looks_is_treated_as_gone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``rm -rf`` of a version (or of a whole model) between the listing and the look at its files: the reload goes on
    without it instead of failing on the missing folder (an engine starting then would have crashed)."""
    for version in ("1", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "manifest.json").write_text("{}")
    registry = Registry(tmp_path, CPU_DEVICE)
    monkeypatch.setattr(registry, "_load_one", lambda directory: FakeModel("m", directory.name))
    monkeypatch.setattr("server.registry.Engine", lambda *_: object())
    listed = discover(tmp_path)
    for name in ("2", "1"):
        (tmp_path / "m" / name / "manifest.json").unlink()
        (tmp_path / "m" / name).rmdir()
    monkeypatch.setattr("server.registry.discover", lambda _: listed)
    assert registry.reload() == {"loaded": [], "refused": [], "retired": []}
    (tmp_path / "m").rmdir()
    assert _folders(tmp_path / "m") == []  # a model's folder gone between the two levels of discover()'s listing


def test_a_reload_that_cannot_read_the_folder_keeps_serving_and_says_why_once(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The models folder gone (a volume unmounted): every look (10 s apart) keeps the loaded versions; the failure
    is one line with its reason, not a traceback at every look, and the first reload that works again says so."""
    import logging

    models = tmp_path / "models"
    (models / "a" / "1").mkdir(parents=True)
    (models / "a" / "1" / "manifest.json").write_text("{}")
    monkeypatch.setattr("server.registry.Engine", lambda *_: object())
    registry = Registry(models, CPU_DEVICE)
    monkeypatch.setattr(registry, "_load_one", lambda directory: FakeModel(directory.parent.name, directory.name))
    registry.load()
    models.rename(tmp_path / "away")
    with caplog.at_level(logging.INFO, logger="attn.registry"):
        for _ in range(3):
            assert registry.reload_or_keep() == {"loaded": [], "refused": [], "retired": []}
            assert [m.name for m in registry.models()] == ["a"]
        (tmp_path / "away").rename(models)
        assert registry.reload_or_keep() == {"loaded": [], "refused": [], "retired": []}
    lines = [(r.getMessage(), bool(r.exc_info), getattr(r, "fields", {})) for r in caplog.records
             if r.getMessage().startswith("reload_")]
    assert lines == [("reload_failed", False, {"error": f"models directory {models} does not exist"}),
                     ("reload_recovered", False, {"models": 1})]
