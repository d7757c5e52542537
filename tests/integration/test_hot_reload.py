"""Model versions in production: a new version swaps in under load without failing a request, a corrupt one is
refused and counted while the old one keeps serving, the version policy and pins, and SIGHUP."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from attention_pb.v1 import attention_pb2 as pb
from tests.integration.serving import RunningServer, settings
from tests.integration.test_server_lifecycle import _attn_serve, _wait_for_event

NAME = "tiny-de-en"


def add_version(root: Path, source: Path, version: str) -> Path:
    """Copies ``source`` as ``version`` the way the exporter publishes: staged in a hidden folder, then renamed."""
    staging = root / NAME / f".{version}.staging"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest))
    target = root / NAME / version
    os.rename(staging, target)
    return target


@pytest.fixture()
def models_root(models_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(models_dir / NAME / "1", root / NAME / "1")
    return root


class Load:
    """Clients sending Translate one after another until stopped; every status code and served version counted."""

    def __init__(self, server: RunningServer, clients: int = 3) -> None:
        self.codes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(server,), daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, server: RunningServer) -> None:
        request = pb.TranslateRequest(texts=["Guten Morgen", "Das Haus ist groß."])
        while not self._stop.is_set():
            try:
                response = server.stub.Translate(request, timeout=60)
            except grpc.RpcError as error:
                self.codes[error.code().name] += 1
                continue
            self.codes["OK"] += 1
            self.versions[response.version] += 1

    def wait_for(self, version: str, more: int = 3) -> None:
        start = self.versions[version]
        for _ in range(1200):
            if self.versions[version] >= start + more:
                return
            time.sleep(0.05)
        raise AssertionError(f"no responses from version {version}: {dict(self.versions)}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_new_version_swaps_in_under_load_and_a_corrupt_one_is_refused(models_root: Path) -> None:
    server = RunningServer(settings(models_root, reload_interval=0.0))
    load = Load(server)
    try:
        load.wait_for("1")
        add_version(models_root, models_root / NAME / "1", "2")
        gc.unfreeze()
        report = server.call(server.server.reload())
        assert report == {"loaded": [f"{NAME}/2"], "refused": [], "retired": [f"{NAME}/1"]}
        assert gc.get_freeze_count() > 0  # what the process keeps is settled again (server/heap.py)
        # The retired version's gauges are gone with it; version 2's are there.
        sample = server.server.metrics.registry.get_sample_value
        for name in ("attn_model_load_duration_seconds", "attn_queue_capacity_requests", "attn_queue_requests",
                     "attn_active_requests"):
            assert sample(name, {"model": NAME, "version": "1"}) is None, name
        assert sample("attn_queue_capacity_requests", {"model": NAME, "version": "2"}) == 256
        assert sample("attn_model_load_duration_seconds", {"model": NAME, "version": "2"}) > 0
        load.wait_for("2")

        broken = add_version(models_root, models_root / NAME / "2", "3")
        graph = broken / "decoder_step.onnx"
        graph.write_bytes(graph.read_bytes()[:200])  # a truncated graph: ONNX Runtime cannot load it
        report = server.call(server.server.reload())
        assert report == {"loaded": [], "refused": [f"{NAME}/3"], "retired": []}
        load.wait_for("2")
        assert server.call(server.server.reload())["refused"] == []  # unchanged since: not tried again
        failures = server.server.metrics.registry.get_sample_value("attn_model_load_failures_total", {"model": NAME})
        assert failures == 1.0
        listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [(m.name, m.version) for m in listed] == [(NAME, "2")]
    finally:
        load.stop()
        server.close()
        gc.unfreeze()
    assert set(load.codes) == {"OK"}, f"requests failed during the reloads: {dict(load.codes)}"
    assert load.versions["1"] > 0 and load.versions["2"] > 0 and "3" not in load.versions


def test_a_served_version_changed_in_place_keeps_serving_and_says_so_once(models_root: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    server = RunningServer(settings(models_root, reload_interval=0.0))
    try:
        manifest = models_root / NAME / "1" / "manifest.json"
        later = time.time() + 5  # a new modification time, whatever the file system's clock resolution
        os.utime(manifest, (later, later))
        with caplog.at_level(logging.WARNING, logger="attn.server"):
            for _ in range(2):
                assert server.call(server.server.reload()) == {"loaded": [], "refused": [], "retired": []}
        said = [r for r in caplog.records if r.getMessage() == "model_changed_in_place"]
        assert len(said) == 1 and said[0].fields["version"] == "1"  # type: ignore[attr-defined]
        assert server.stub.Translate(pb.TranslateRequest(texts=["Hallo"]), timeout=30).version == "1"
    finally:
        server.close()


def test_policy_all_serves_every_version_and_a_pin_holds_one(models_root: Path) -> None:
    add_version(models_root, models_root / NAME / "1", "2")
    for overrides, served, default in [({"version_policy": "all"}, ["1", "2"], "2"),
                                       ({"pinned_versions": f"{NAME}=1"}, ["1"], "1")]:
        server = RunningServer(settings(models_root, reload_interval=0.0, **overrides))
        try:
            listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            assert [m.version for m in listed] == served
            assert [m.version for m in listed if m.is_default] == [default]  # the one a request naming none gets
            response = server.stub.Translate(pb.TranslateRequest(texts=["Hallo"]), timeout=30)
            assert response.version == default
            for version in served:
                named = server.stub.Translate(pb.TranslateRequest(texts=["Hallo"], version=version), timeout=30)
                assert named.version == version
        finally:
            server.close()


def test_sighup_and_the_watcher_load_a_new_version(models_root: Path) -> None:
    env = {**os.environ, "ATTN_MODELS_DIR": str(models_root), "ATTN_PORT": "0", "ATTN_METRICS_PORT": "-1",
           "ATTN_RELOAD_INTERVAL": "0"}
    process = subprocess.Popen([*_attn_serve(), "--host", "127.0.0.1", "--device", "cpu", "--ort-threads", "1"],
                               env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        _wait_for_event(process, "ready")
        add_version(models_root, models_root / NAME / "1", "2")
        process.send_signal(signal.SIGHUP)
        [synced] = _wait_for_event(process, "models_synced")
        assert synced["loaded"] == [f"{NAME}/2"] and synced["retired"] == [f"{NAME}/1"]
    finally:
        process.terminate()
        assert process.wait(60) == 0
        assert process.stderr is not None
        process.stderr.close()


# The server, its start held after the models folder was read and the models loaded, before it is ready: until a
# file exists. It says when it holds with a log line of its own.
HELD_START = """
import json, pathlib, sys, time
from server.registry import Registry
choose_default = Registry._choose_default
def held(self):
    gate = pathlib.Path(sys.argv[1])
    if not gate.exists():
        print(json.dumps({"event": "test_start_held"}), file=sys.stderr, flush=True)
    while not gate.exists():
        time.sleep(0.01)
    return choose_default(self)
Registry._choose_default = held
from server.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sighup_while_the_one_process_server_loads_is_a_reload_once_it_is_ready(models_root: Path,
                                                                                 tmp_path: Path) -> None:
    """Before, a SIGHUP that came while the models loaded was dropped, and with the watcher off (reload interval 0)
    a version published meanwhile waited for the next one."""
    gate = tmp_path / "go"
    env = {**os.environ, "ATTN_MODELS_DIR": str(models_root), "ATTN_PORT": "0", "ATTN_METRICS_PORT": "-1",
           "ATTN_RELOAD_INTERVAL": "0", "ATTN_FRONTENDS": "0"}
    process = subprocess.Popen([sys.executable, "-c", HELD_START, str(gate), "--host", "127.0.0.1", "--device", "cpu",
                                "--ort-threads", "1"],
                               env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    stuck = threading.Timer(120, process.terminate)  # a reload that never comes ends the wait below
    stuck.start()
    try:
        _wait_for_event(process, "test_start_held")
        add_version(models_root, models_root / NAME / "1", "2")
        process.send_signal(signal.SIGHUP)
        gate.touch()
        [ready] = _wait_for_event(process, "ready")
        assert ready["models"] == [f"{NAME}/1"]  # the folder as the load read it
        [synced] = _wait_for_event(process, "models_synced")
        assert synced["loaded"] == [f"{NAME}/2"] and synced["retired"] == [f"{NAME}/1"]
    finally:
        stuck.cancel()
        process.terminate()
        assert process.wait(60) == 0
        assert process.stderr is not None
        process.stderr.close()


@pytest.mark.parametrize("requested_default", ["", "tiny-a"])
def test_listing_the_models_survives_a_reload_that_removes_the_default_model(models_root: Path,
                                                                             requested_default: str) -> None:
    """Every version of the default model removed: ListModels still answers. With no default asked for, the default
    becomes the first model left, as at the start; a default asked for that is gone marks none (requests naming no
    model get their family's first model)."""
    other = models_root / "tiny-a" / "1"
    shutil.copytree(models_root / NAME / "1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "name": "tiny-a"}))
    server = RunningServer(settings(models_root, reload_interval=0.0, default_model=requested_default))
    try:
        listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [m.name for m in listed if m.is_default] == ["tiny-a"]
        shutil.rmtree(models_root / "tiny-a")
        assert server.call(server.server.reload())["retired"] == ["tiny-a/1"]
        listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [m.name for m in listed] == [NAME]
        assert [m.name for m in listed if m.is_default] == ([] if requested_default else [NAME])
        assert server.stub.Translate(pb.TranslateRequest(texts=["Hallo"]), timeout=30).model == NAME
    finally:
        server.close()
