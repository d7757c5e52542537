"""``attn-serve`` as several processes: an engine process that owns the ONNX Runtime sessions and does only
scheduling and model steps (``ATTN_ENGINES`` of them, one by default), ``N`` front-end processes that serve gRPC on
one port (validation, tokenization, auth, health, reflection, the V2 protocol, response building), and this parent,
which starts them, restarts any that dies, serves the one ``/metrics`` endpoint (every process's metrics summed),
forwards SIGHUP to the engines and, on SIGTERM, drains the front-ends (calls in flight finish) before it stops the
engines.

Why: one process's Python (tokenizing on the event loop, building responses, the engine's bookkeeping) serialised by
the interpreter lock was the ceiling on any hardware; front-ends spread that work over cores, and the engine's loop
no longer shares its interpreter with it.

The children are spawned (not forked: gRPC and ONNX Runtime threads do not survive a fork) in process groups of their
own, so a terminal's Ctrl-C reaches only this parent, which then drains them in order; a child whose parent is gone
stops by itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing import reduction, resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NoReturn

from server import logs
from server.errors import StartupError
from server.inflight import CallsInFlight
from server.logs import event
from server.settings import Settings

log = logging.getLogger("attn.server")

ENGINE, FRONTEND = "engine", "frontend"
PARENT_CHECK_SECONDS = 0.5
# A child is restarted at once, unless it is the second or later in a row to die within STABLE_SECONDS of its
# start: then after RESTART_DELAY_SECONDS, doubling with each such death up to RESTART_DELAY_MAX_SECONDS, so that a
# cause that outlives restarts (a model file broken on disk, memory short) costs a log line now and then, not a core.
STABLE_SECONDS, RESTART_DELAY_SECONDS, RESTART_DELAY_MAX_SECONDS = 30.0, 0.5, 30.0
# Blocked in a child from its start until it has its handlers (the parent starts it with them blocked), so that a
# SIGHUP or SIGTERM sent while it starts waits for them instead of killing it.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path on Linux, less its terminating zero


def available_cores() -> int:
    """The cores this process may run on (a cpuset's, where one applies), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


def frontend_count(settings: Settings) -> int:
    """``ATTN_FRONTENDS``, or when it is -1 one per two cores, and two on two or three cores (one on one): a front-end's
    event loop is one core at most, and on two cores one front-end was what limited the server under load
    (docs/serving-processes.md)."""
    if settings.frontends >= 0:
        return settings.frontends
    cores = available_cores()
    return max(min(2, cores), cores // 2)


def engine_settings(settings: Settings) -> Settings:
    """An engine process's settings. With several engines and ``ort_threads`` 0, the cores ONNX Runtime would get in
    one engine (all but one) are shared out between them, instead of every engine starting a pool that large."""
    if settings.engines == 1 or settings.ort_threads:
        return settings
    return replace(settings, ort_threads=max(1, (available_cores() - 1) // settings.engines))


# -- the children ----------------------------------------------------------------------------------------------------


class Stderr:
    """The stream the parent's log lines go to, handed to a child as its stderr (pickling it while a child is spawned
    passes the descriptor along). In JSON mode the parent's own file descriptor 2 is a pipe that its reader thread
    wraps into JSON lines; a child's lines, JSON already, would pay that hop (a read, a parse, a write and a thread
    wake-up per access-log line), so they go straight out instead."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _stderr_in_child, (reduction.DupFd(self.fd),)


def _stderr_in_child(duplicate: Any) -> Stderr:
    return Stderr(duplicate.detach())


def _become_child(parent: int, settings: Settings, stderr: Stderr, runtime_dir: Path | None = None) -> None:
    """``runtime_dir``: the parent's private folder, removed by this child if the parent dies without removing it
    (the engine's, the last process to use its socket)."""
    os.setpgrp()  # Ctrl-C in a terminal goes to the parent only; it drains the children in order
    if stderr.fd != 2:
        os.dup2(stderr.fd, 2)
        os.close(stderr.fd)
    name = multiprocessing.current_process().name  # attn-engine-0, attn-frontend-1
    logs.configure(settings.log_level, settings.log_format, process=name.removeprefix("attn-"))
    try:  # what ps, top and /proc/PID/comm show instead of "python"
        Path("/proc/self/comm").write_text(name[:15])
    except OSError:  # not Linux
        pass

    def orphaned() -> None:  # the parent was killed: nothing would drain or restart us
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="attn-parent-watch", daemon=True).start()


def restart_delay(quick: int) -> float:
    """Seconds before a child is restarted that is the ``quick``-th in a row to die within STABLE_SECONDS of its
    start (0: it lived longer)."""
    return 0.0 if quick < 2 else min(RESTART_DELAY_SECONDS * 2 ** (quick - 2), RESTART_DELAY_MAX_SECONDS)


def start_with_signals_held(process: BaseProcess) -> None:
    """Starts ``process`` with :data:`HANDLED_SIGNALS` blocked; it inherits the mask and lets them in once it has
    handlers (:func:`handle_signals`).

    multiprocessing starts its resource tracker with the first child, blocking SIGINT and SIGTERM around the
    tracker's start and then unblocking them in this process (not restoring the mask it found). Inside the window
    below that let the first child (the engine) start with SIGTERM open: one sent in its first half second, while it
    imported, killed it, and the server stopped with exit 1 instead of draining. So the tracker is started first."""
    resource_tracker.ensure_running()
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)


def handle_signals() -> None:
    """Lets the signals in that :func:`start_with_signals_held` blocked: call it once they have handlers."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def run_engine(settings: Settings, address: str, parent: int, status: Connection, stderr: Stderr,
               strict: bool = True, counts_refusals: bool = True) -> None:
    """The engine process: loads the models, serves them at ``address``, reloads on SIGHUP and every
    ``reload_interval`` seconds, stops on SIGTERM (what is still queued fails with UNAVAILABLE). ``strict``: any
    model that fails to load stops it (the server's start); else such a version is refused and skipped, as a reload
    does (an engine restarted after a crash, which comes back with what was served). ``counts_refusals``: this
    engine counts the versions it refuses in attn_model_load_failures_total (the first engine does)."""
    _become_child(parent, settings, stderr, runtime_dir=Path(address).parent)
    from prometheus_client import CollectorRegistry

    from server.app import build_registry
    from server.ipc.engine_endpoint import EngineEndpoint
    from server.metrics import Metrics
    from server.registry import CountedRefusals, LoadInterrupted

    try:
        registry = build_registry(settings, Metrics(CollectorRegistry()))
    except StartupError as exc:  # a device asked for that is not usable here
        _cannot_start(exc, strict)

    def state() -> dict[str, Any]:
        return {"ready": registry.ready, "default_model": registry.default_model, "pid": os.getpid(),
                "device": registry.device.name}

    endpoint = EngineEndpoint(registry, address, state)
    stop, reload_now, endpoint_stop = threading.Event(), threading.Event(), threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        registry.interrupt()  # a SIGTERM while the models load: the versions not loaded yet are not

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGHUP, lambda *_: reload_now.set())
    handle_signals()
    thread = threading.Thread(target=endpoint.run, args=(endpoint_stop,), name="attn-ipc", daemon=True)
    thread.start()
    # Every engine loads every model from the same folder and refuses the same versions: engine 0 alone counts them
    # (attn_model_load_failures_total counts versions, not processes), and what it counted is kept in the server's
    # private folder: restarted after a crash, it refuses again what its predecessor refused, counted once.
    registry.count_refusals = counts_refusals
    registry.counted = CountedRefusals(Path(address).parent / "refusals-counted.jsonl")
    try:
        registry.load(strict)
    except StartupError as exc:
        _cannot_start(exc, strict)
    except LoadInterrupted:  # a SIGTERM while loading: nothing to serve, and the loop below ends at once
        pass
    if registry.ready:
        endpoint.publish()
        status.send(("ready", [f"{m.name}/{m.version}" for m in registry.models()], registry.default_model,
                     registry.device.name))
    next_look = time.monotonic() + settings.reload_interval
    while not stop.wait(0.2):
        if not thread.is_alive():  # the IPC thread failed (logged): exit, and the parent restarts this process
            raise SystemExit(1)
        due = settings.reload_interval > 0 and time.monotonic() >= next_look
        if reload_now.is_set() or due:
            reload_now.clear()
            registry.reload_or_keep()
            endpoint.publish()
            next_look = time.monotonic() + settings.reload_interval
    registry.close()  # anything still queued or decoding fails with ShuttingDown; the endpoint sends those replies
    endpoint_stop.set()
    thread.join(5)
    endpoint.close()
    event(log, "engine_stopped")


def _cannot_start(exc: StartupError, strict: bool) -> NoReturn:
    """The engine process cannot start: one line naming why (not a traceback), and exit status 1. At the server's
    start (``strict``) that stops the server (``startup_failed``); an engine restarted after a crash is tried again
    while the front-ends go on answering UNAVAILABLE (``restart_failed``: the server did start)."""
    event(log, "startup_failed" if strict else "restart_failed", level=logging.ERROR, error=str(exc))
    raise SystemExit(1) from None


def run_frontend(settings: Settings, addresses: list[str], inflight: CallsInFlight, parent: int, status: Connection,
                 stderr: Stderr) -> None:
    """A front-end process: the gRPC server on the shared port, its models in the engine processes; ``inflight``
    its slot of the calls every front-end handles (``max_inflight`` bounds the whole server)."""
    import asyncio

    from server.app import serve

    _become_child(parent, settings, stderr)
    code = asyncio.run(serve(settings, engine_addresses=addresses, on_ready=lambda: status.send(("ready",)),
                             inflight=inflight))
    raise SystemExit(code)


# -- the parent ------------------------------------------------------------------------------------------------------


@dataclass
class Child:
    role: str
    index: int
    process: BaseProcess
    status: Connection
    started: float  # time.monotonic()
    ready: bool = False


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the gRPC port, held for as long as the server runs: it picks the port when
    ``port`` is 0, and keeps it ours while front-ends restart. Binding once without SO_REUSEPORT first makes a
    second server on a port in use fail instead of joining it; with SO_REUSEADDR, so that the connections a server
    just closed (TIME-WAIT, a minute on Linux) do not keep it from starting again on its port."""
    family, address = _family_and_address(host)
    check_port_free(host, port)
    try:
        return _bound(family, address, port, socket.SO_REUSEPORT)
    except OSError:
        pass
    # The probe found the port free, so what is in the way is a connection closed by a server without SO_REUSEPORT
    # (one of ATTN_FRONTENDS=0), in a TIME-WAIT that only SO_REUSEADDR binds beside. Not set at the first try: while
    # this server's front-ends start, its held socket alone is what a second server's probe must fail on.
    try:
        return _bound(family, address, port, socket.SO_REUSEPORT, socket.SO_REUSEADDR)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc


def _bound(family: socket.AddressFamily, address: str, port: int, *options: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    for option in options:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _family_and_address(host: str) -> tuple[socket.AddressFamily, str]:
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), host.strip("[]")


def check_port_free(host: str, port: int) -> None:
    """Raises StartupError with the system's reason (``Address already in use``) when ``port`` cannot be bound:
    gRPC's own failure to bind names none. Port 0 (any free one) always can."""
    if not port:
        return
    family, address = _family_and_address(host)
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((address, port))
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc
    finally:
        probe.close()


def check_socket_path(path: str) -> None:
    """A Unix socket's path must fit the kernel's 108-byte ``sun_path`` (with its terminating zero); raises
    StartupError naming the way out rather than letting the engine process fail to bind."""
    if len(os.fsencode(path)) > SOCKET_PATH_BYTES:
        raise StartupError(f"the engine's socket path {path} is longer than the {SOCKET_PATH_BYTES} bytes a Unix "
                           "socket allows; point TMPDIR at a shorter folder")


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.frontends = frontend_count(settings)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="attn-serve-"))  # private (0700): the IPC sockets live here
        self.addresses = [str(self.runtime_dir / f"engine-{i}.sock") for i in range(settings.engines)]
        self.metrics_dir = self.runtime_dir / "metrics"
        self.metrics_dir.mkdir()
        # Read by prometheus_client when the children import it: their metrics go to files this parent sums.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self.context = multiprocessing.get_context("spawn")
        # One count of calls in flight per front-end, in shared memory: max_inflight bounds their sum.
        self.inflight = self.context.RawArray("q", max(1, self.frontends))
        self.children: list[Child] = []
        self.restarts = {ENGINE: 0, FRONTEND: 0}
        self.quick_deaths: dict[tuple[str, int], int] = {}  # in a row, each within STABLE_SECONDS of its start
        self.delayed: list[tuple[float, str, int]] = []  # restarts waiting for their time: (due, role, index)
        self.signals: list[int] = []
        self.announced = False
        self.metrics_registry: Any = None  # what /metrics serves, once it is served
        self.gpu_watched = False
        self.models: list[str] = []
        self.default_model = ""

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda number, _: self.signals.append(number))
        s = self.settings
        metrics_server: Any = None
        try:
            for address in self.addresses:
                check_socket_path(address)
            from server import security  # imported where used, as this module's other server imports are

            security.check(s)  # every front-end reads the same files: refused once, here, before any starts
            held = reserve_port(s.host, s.port)
            port = held.getsockname()[1]
            child_settings = replace(s, port=port, metrics_port=-1)
            metrics_port = None
            if s.metrics_port >= 0:
                metrics_server, metrics_port = self._serve_metrics()
        except StartupError as exc:
            event(log, "startup_failed", level=logging.ERROR, error=str(exc))
            self._cleanup()
            return 1
        event(log, "listening", host=s.host, port=port, metrics_port=metrics_port, frontends=self.frontends,
              engines=self.addresses)
        self.children = [self._start(ENGINE, i, child_settings) for i in range(s.engines)]
        self.children += [self._start(FRONTEND, i, child_settings) for i in range(self.frontends)]
        code = self._supervise(child_settings)
        held.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        self._cleanup()
        event(log, "stopped", exit_code=code)
        return code

    def _start(self, role: str, index: int, settings: Settings) -> Child:
        receive, send = self.context.Pipe(duplex=False)
        target: Callable[..., None] = run_engine if role == ENGINE else run_frontend
        args: tuple[Any, ...] = (os.getpid(), send, Stderr(logs.stderr_fileno()))
        if role == ENGINE:  # once the server has served, a restarted engine skips a version that fails to load
            args = (engine_settings(settings), self.addresses[index], *args, not self.announced, index == 0)
        else:
            args = (settings, self.addresses, CallsInFlight(self.inflight, index), *args)
        process = self.context.Process(target=target, args=args, name=f"attn-{role}-{index}", daemon=False)
        start_with_signals_held(process)
        send.close()
        event(log, "process_started", role=role, index=index, pid=process.pid)
        return Child(role, index, process, receive, time.monotonic())

    def _supervise(self, settings: Settings) -> int:
        while True:
            while self.signals:
                number = self.signals.pop(0)
                if number == signal.SIGHUP:
                    for engine in self._of(ENGINE):
                        if engine.process.pid:
                            os.kill(engine.process.pid, signal.SIGHUP)
                else:
                    return self._drain()
            now = time.monotonic()
            for due, role, index in [d for d in self.delayed if d[0] <= now]:
                self.delayed.remove((due, role, index))
                self.children.append(self._start(role, index, settings))
            objects: list[Any] = [c.process.sentinel for c in self.children] + [c.status for c in self.children]
            for ready in wait(objects, timeout=0.2):
                for child in list(self.children):
                    if ready is child.status:
                        self._message(child)
                    elif ready == child.process.sentinel:
                        failed = self._exited(child, settings)
                        if failed is not None:
                            return failed

    def _message(self, child: Child) -> None:
        try:
            message = child.status.recv()
        except (EOFError, OSError):
            return
        if message[0] != "ready":
            return
        child.ready = True
        if child.role == ENGINE:
            self.models, self.default_model = message[1], message[2]
            if message[3] == "cuda" and not self.gpu_watched and self.metrics_registry is not None:
                # The engines' own registries are never scraped: /metrics is this parent's, which reads NVML itself.
                from server.metrics import watch_gpu

                self.gpu_watched = True
                watch_gpu(self.metrics_registry)
        if not self.announced and all(c.ready for c in self.children):
            self.announced = True
            event(log, "ready", models=self.models, default_model=self.default_model, frontends=self.frontends,
                  engines=self.settings.engines)

    def _exited(self, child: Child, settings: Settings) -> int | None:
        """A child died on its own: restart it. Before the server was ever ready that is a start-up failure (a model
        that does not load, a certificate that does not parse, a port in use): the server stops with exit 1."""
        child.process.join()
        code = child.process.exitcode
        self._mark_dead(child)
        if not self.announced:
            event(log, "startup_failed", level=logging.ERROR,
                  error=f"the {child.role} process exited with code {code} before the server was ready")
            self._terminate([c for c in self.children if c is not child], 10.0)
            return 1
        self.restarts[child.role] += 1
        slot = (child.role, child.index)
        quick = self.quick_deaths.get(slot, 0) + 1 if time.monotonic() - child.started < STABLE_SECONDS else 0
        self.quick_deaths[slot] = quick
        delay = restart_delay(quick)
        event(log, "process_exited", level=logging.ERROR, role=child.role, index=child.index, pid=child.process.pid,
              exit_code=code, restarts=self.restarts[child.role], restart_in_seconds=delay)
        self.children.remove(child)
        if delay:
            self.delayed.append((time.monotonic() + delay, child.role, child.index))
        else:
            self.children.append(self._start(child.role, child.index, settings))
        return None

    def _drain(self) -> int:
        """Front-ends first (they finish what they accepted, which needs the engine), then the engine."""
        event(log, "shutting_down", grace_seconds=self.settings.grace_seconds)
        ok = self._terminate(self._of(FRONTEND), self.settings.grace_seconds + 10.0)
        ok = self._terminate(self._of(ENGINE), 30.0) and ok
        return 0 if ok else 1

    def _terminate(self, children: list[Child], timeout: float) -> bool:
        """SIGTERM, then up to ``timeout`` seconds to exit; True when every one exited 0."""
        for child in children:
            if child.process.is_alive() and child.process.pid:
                os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        ok = True
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                event(log, "process_killed", level=logging.ERROR, role=child.role, pid=child.process.pid)
                child.process.kill()
                child.process.join()
            code = child.process.exitcode
            # A child that crashed while draining (a negative code: the signal that ended it) says so here.
            event(log, "process_stopped", level=logging.INFO if code == 0 else logging.ERROR, role=child.role,
                  index=child.index, pid=child.process.pid, exit_code=code)
            ok = ok and code == 0
            self._mark_dead(child)
        return ok

    def _of(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role]

    def _mark_dead(self, child: Child) -> None:
        from prometheus_client import multiprocess

        if child.role == FRONTEND:  # its calls ended with it; its restart may come only later (restart_delay)
            self.inflight[child.index] = 0
        if child.process.pid:
            multiprocess.mark_process_dead(child.process.pid, str(self.metrics_dir))

    def _serve_metrics(self) -> tuple[Any, int]:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        from server.metrics import LoadedVersionsOnly

        registry = self.metrics_registry = CollectorRegistry()
        registry.register(LoadedVersionsOnly(multiprocess.MultiProcessCollector(None, path=str(self.metrics_dir))))
        registry.register(TreeCollector(self))
        try:
            server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host.strip("[]"),
                                          registry=registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port}: "
                               f"{exc}") from exc
        return server, int(server.server_port)

    def _cleanup(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


class TreeCollector:
    """CPU time and memory of the whole server (this parent and every child, the exited ones' CPU included) and the
    restarts, collected at scrape time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._cpu, self._lock = 0.0, threading.Lock()  # the most CPU time reported: the counter never goes down

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        from server.metrics import help_of, process_usage, resident_bytes

        cpu, memory = 0.0, resident_bytes(os.getpid())
        for child in self.supervisor.children:
            if child.process.pid and child.process.is_alive():
                cpu += process_cpu_seconds(child.process.pid)
                memory += resident_bytes(child.process.pid)
        # After the children: is_alive() reaps one that died, whose time then is the parent's children's. A child
        # reaped by the supervisor between its /proc reading and this one counts twice in this scrape: the next
        # ones report no less, lest Prometheus take the dip for a counter reset.
        own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
        with self._lock:
            cpu = self._cpu = max(cpu, self._cpu)
        yield from process_usage(cpu, memory)
        restarts = CounterMetricFamily("attn_process_restarts", help_of("attn_process_restarts"), labels=["role"])
        for role, count in self.supervisor.restarts.items():
            restarts.add_metric([role], count)
        yield restarts


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds of a live process (every thread; not its children), from /proc; 0 once it has exited
    (the benchmarks read their servers' processes with it too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()
