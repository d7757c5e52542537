"""The parent of the server's processes: the port it holds for the front-ends, how many front-ends it starts, the
engines' share of the cores, and the signals a child starts with blocked."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from server.errors import StartupError
from server.processes import SOCKET_PATH_BYTES, check_socket_path, engine_settings, frontend_count, reserve_port
from server.settings import Settings


def _listener(port: int = 0, reuse: bool = False) -> socket.socket:
    sock = socket.socket()
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_held_port_is_shared_by_front_ends() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        assert port > 0
        first, second = _listener(port, reuse=True), _listener(port, reuse=True)  # two front-ends, one port
        first.close()
        second.close()
    finally:
        held.close()


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "another-servers-front-end"])
def test_a_port_in_use_is_refused(reuse: bool) -> None:
    """Another server on the port, even one whose front-ends share it with SO_REUSEPORT: start-up fails."""
    other = _listener(reuse=reuse)
    try:
        with pytest.raises(StartupError, match="cannot listen"):
            reserve_port("127.0.0.1", other.getsockname()[1]).close()
    finally:
        other.close()


def test_a_port_another_server_holds_while_it_starts_is_refused() -> None:
    """Before its front-ends listen, a server's port is only its held socket: a second server must fail there too."""
    first = reserve_port("127.0.0.1", 0)
    try:
        with pytest.raises(StartupError, match="cannot listen"):
            reserve_port("127.0.0.1", first.getsockname()[1]).close()
    finally:
        first.close()


@pytest.mark.parametrize("options", [(socket.SO_REUSEADDR, socket.SO_REUSEPORT), (socket.SO_REUSEADDR,)],
                         ids=["front-ends", "one-process-server"])
def test_a_port_whose_last_server_closed_connections_is_free_again(options: tuple[int, ...]) -> None:
    """The server closing a connection first leaves it in TIME-WAIT for a minute: a restart must still bind, after
    front-ends as after a server of ATTN_FRONTENDS=0 (whose gRPC listener has no SO_REUSEPORT)."""
    listener = socket.socket()
    for option in options:  # as gRPC's listeners have them
        listener.setsockopt(socket.SOL_SOCKET, option, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: its end waits in TIME-WAIT
    client.close()
    listener.close()
    time.sleep(0.05)
    reserve_port("127.0.0.1", port).close()


@pytest.mark.parametrize(("host", "address"), [("0.0.0.0", "0.0.0.0:50051"), ("::1", "[::1]:50051"),
                                                ("[::]", "[::]:50051"), ("::", "[::]:50051"),
                                                ("localhost", "localhost:50051")])
def test_the_grpc_address_of_a_host(host: str, address: str) -> None:
    """``--host ::1`` as the settings' help allows it (bare, as an operator types it): gRPC needs it in brackets."""
    from server.app import listen_address

    assert listen_address(host, 50051) == address


def test_front_ends_from_the_setting_or_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Settings()
    assert frontend_count(replace(base, frontends=0)) == 0
    assert frontend_count(replace(base, frontends=3)) == 3
    for cores, frontends in [(16, 8), (5, 2), (3, 2), (2, 2), (1, 1)]:
        monkeypatch.setattr("server.processes.available_cores", lambda cores=cores: cores)
        assert frontend_count(base) == frontends, cores


def test_engines_share_the_cores_onnx_runtime_would_get(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.processes.available_cores", lambda: 16)
    assert engine_settings(Settings()).ort_threads == 0  # one engine: ONNX Runtime's default, all cores but one
    assert engine_settings(Settings(engines=2)).ort_threads == 7
    assert engine_settings(Settings(engines=4)).ort_threads == 3
    assert engine_settings(Settings(engines=4, ort_threads=6)).ort_threads == 6  # asked for: as asked
    monkeypatch.setattr("server.processes.available_cores", lambda: 2)
    assert engine_settings(Settings(engines=2)).ort_threads == 1


def test_an_engine_socket_path_too_long_for_the_kernel_is_refused_up_front(tmp_path: Path) -> None:
    """The longest path check_socket_path lets through binds; one byte more is refused with the way out."""
    folder = tmp_path / "d"
    folder.mkdir()
    longest = str(folder / ("x" * (SOCKET_PATH_BYTES - len(str(folder)) - 1)))
    check_socket_path(longest)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(longest)
    with pytest.raises(StartupError, match="TMPDIR"):
        check_socket_path(longest + "x")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refused, pytest.raises(OSError):
        refused.bind(longest + "x")  # what the engine process would have met


@pytest.mark.parametrize("setting", ["tls_cert", "auth_token_file"])
def test_unusable_security_files_stop_the_server_before_any_process_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, setting: str) -> None:
    """Every front-end would read the same files: the parent refuses them once, in one line naming the setting,
    before it starts an engine that would load the models for nothing."""
    from server.processes import Supervisor

    missing = tmp_path / "missing.pem"
    settings = Settings(port=0, metrics_port=-1, frontends=2)
    settings = (replace(settings, tls_cert=str(missing), tls_key=str(missing)) if setting == "tls_cert"
                else replace(settings, auth_token_file=str(missing)))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # the Supervisor sets it: restored after the test
    supervisor = Supervisor(settings)

    def start(*_: object) -> None:
        raise AssertionError("no process may start")

    monkeypatch.setattr(supervisor, "_start", start)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with caplog.at_level(logging.INFO, logger="attn.server"):
            assert supervisor.run() == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    (failed,) = [r for r in caplog.records if r.getMessage() == "startup_failed"]
    assert f"cannot read {setting} {missing}" in failed.fields["error"]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.getMessage() == "listening"]


def test_the_gpu_gauges_are_the_parents_when_an_engine_runs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """With front-end processes /metrics is the parent's, so the parent reads NVML once an engine says it runs on
    CUDA (the engine's own registry is never scraped). NVML here is a stand-in with one GPU, half busy."""
    import multiprocessing
    import sys
    import types

    from prometheus_client import CollectorRegistry

    from server.processes import ENGINE, Child, Supervisor

    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=123.0),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # the Supervisor sets it: restored after the test
    supervisor = Supervisor(Settings())
    try:
        supervisor.metrics_registry = registry = CollectorRegistry()
        for device in ("cpu", "cuda", "cuda"):  # a restarted engine says it again: registered once
            receive, send = multiprocessing.Pipe(duplex=False)
            send.send(("ready", ["m/1"], "m", device))
            supervisor._message(Child(ENGINE, 0, multiprocessing.current_process(), receive, time.monotonic()))
            watched = registry.get_sample_value("attn_gpu_utilization_ratio", {"gpu": "0"})
            assert watched == (None if device == "cpu" else 0.5)
        assert registry.get_sample_value("attn_gpu_memory_used_bytes", {"gpu": "0"}) == 123.0
    finally:
        supervisor._cleanup()


def test_the_servers_cpu_counter_never_goes_down_when_a_child_exits_during_a_scrape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that died is reaped by whoever waits for it first: the supervisor, or the scrape itself, whose
    is_alive() waits for it. Its CPU time then moves from its /proc entry to the parent's RUSAGE_CHILDREN between
    two readings of one scrape, which read neither: attn_process_cpu_seconds_total dipped, and Prometheus reads a
    dip as a counter reset (rate() adds the whole total). Here the child's 5 s move while the scrape runs."""
    import resource
    import types

    from prometheus_client import CollectorRegistry

    import server.metrics as metrics
    import server.processes as processes

    reaped = {"seconds": 0.0}

    class Dying:
        pid, alive = 4242, True

        def is_alive(self) -> bool:
            if not self.alive:
                reaped["seconds"] = 5.0  # waitpid: the zombie is reaped, its time now the parent's children's
            return self.alive

    def getrusage(who: int) -> types.SimpleNamespace:
        own = who == resource.RUSAGE_SELF
        return types.SimpleNamespace(ru_utime=1.0 if own else reaped["seconds"], ru_stime=0.0)

    child = types.SimpleNamespace(process=Dying())
    supervisor = types.SimpleNamespace(children=[child], restarts={})
    monkeypatch.setattr(processes.resource, "getrusage", getrusage)
    monkeypatch.setattr(processes, "process_cpu_seconds", lambda pid: 5.0 if child.process.alive else 0.0)
    monkeypatch.setattr(metrics, "resident_bytes", lambda pid: 0.0)
    registry = CollectorRegistry()
    registry.register(processes.TreeCollector(supervisor))  # type: ignore[arg-type]
    totals = [registry.get_sample_value("attn_process_cpu_seconds_total")]
    child.process.alive = False  # it dies; the next scrape reaps it
    totals.append(registry.get_sample_value("attn_process_cpu_seconds_total"))
    supervisor.children.clear()  # the supervisor has seen it go
    totals.append(registry.get_sample_value("attn_process_cpu_seconds_total"))
    assert totals == sorted(totals) and totals[0] == 6.0, totals


_FIRST_CHILD = """
import multiprocessing, signal
from server.processes import start_with_signals_held

if __name__ == "__main__":
    # A fresh interpreter: no resource tracker runs yet, so this child is the one multiprocessing starts it with.
    child = multiprocessing.get_context("spawn").Process(target=signal.raise_signal, args=(signal.SIGTERM,))
    start_with_signals_held(child)
    child.join(60)
    print(child.exitcode)
"""


def test_a_processs_first_child_starts_with_the_handled_signals_blocked() -> None:
    """The child raises SIGTERM at once: blocked, it stays pending and the child exits 0; open, it kills the child
    (-15). It failed for the first child of a process, whose start also started multiprocessing's resource
    tracker."""
    result = subprocess.run([sys.executable, "-c", _FIRST_CHILD], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]
