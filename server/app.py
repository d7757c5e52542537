"""The server's lifecycle: bind, report NOT_SERVING, load and warm the models, report SERVING, drain on a signal.

:class:`AttentionServer` is what the tests drive (``start`` on port 0 → ``load`` → ``stop``); :func:`serve` is what
``attn-serve`` runs: the same plus signal handling and exit codes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from attention_pb.v1 import attention_pb2 as pb
from server import device, drain, logs, security, triton, wire
from server.engine import Limits
from server.errors import StartupError
from server.health import NOT_SERVING, SERVING, HealthServicer
from server.inflight import CallsInFlight
from server.ipc.remote_models import RemoteModels
from server.logs import event
from server.metrics import Metrics, watch_gpu
from server.models import Models
from server.processes import check_port_free, handle_signals
from server.registry import Registry
from server.service import AttentionServicer
from server.settings import Settings, parse_pins

log = logging.getLogger("attn.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name
REQUEST_WINDOW = 4 * 2**20  # bytes a stream may send unread: 80 MB/s over a 50 ms round trip
# A connection that has not finished its handshake (TLS, HTTP/2's preface) by then is closed. gRPC's stop waits for
# such connections, so with its default of 20 s one idle TCP connection (a port scanner, a stuck client) held every
# drain for 20 s, or the whole grace when shorter, with nothing in flight. A client's handshake takes milliseconds.
HANDSHAKE_SECONDS = 5.0


class StatusAfterTheCallEnded(logging.Filter):
    """gRPC's asyncio server logs an error with a traceback when a call's status cannot be sent because the call has
    already ended in gRPC's core: its deadline passed, or its client cancelled or went away, a moment before the
    server learnt of it (11 of 35,805 hostile calls, a seventh of them with a 1 ms deadline). Nothing failed on the
    server's side (the call's own ``rpc`` line has its code; answers too large to send are refused before this, in
    :mod:`server.service`), so such a record becomes an INFO ``rpc_status_undelivered`` line naming the method."""

    PREFIX = "ExecuteBatchError raised in core by servicer method ["

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            record.msg, record.args = "rpc_status_undelivered", None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
            record.fields = {"method": message[len(self.PREFIX):].rstrip("]")}
        return True


GRPC_AIO_LOGGER = logging.getLogger("grpc._cython.cygrpc")
UNDELIVERED = StatusAfterTheCallEnded()  # one instance: adding it again leaves one


def listen_address(host: str, port: int) -> str:
    """gRPC's ``host:port``: an IPv6 address goes in brackets (``::1`` as ``[::1]``), else its colons would be read as
    the port's (the parent process, which binds the port first, takes it either way)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build_registry(settings: Settings, metrics: Metrics) -> Registry:
    """The models on the chosen device with their engines (not loaded yet): this process's, or the engine
    process's."""
    s = settings
    limits = Limits(max_batch_rows=s.max_batch_rows, max_batch_tokens=s.max_batch_tokens,
                    max_batch_requests=Limits.max_batch_requests if s.batching else 1,
                    max_queue_requests=s.max_queue_requests, max_queue_tokens=s.max_queue_tokens,
                    mixed_lane_rows=s.mixed_lane_rows)
    chosen = device.choose(s.device, allow_spinning=s.ort_allow_spinning)
    if chosen.name == "cuda":
        watch_gpu(metrics.registry)
    return Registry(Path(s.models_dir), chosen, s.default_model, s.variant, s.ort_threads, limits, metrics,
                    s.version_policy, parse_pins(s.pinned_versions))


class AttentionServer:
    """The gRPC server. With ``engine_addresses`` it is one front-end process of several sharing the port, and its
    models run in the engine processes at those addresses (:class:`RemoteModels`); without, they run here."""

    def __init__(self, settings: Settings, metrics_registry: CollectorRegistry | None = None,
                 engine_addresses: Sequence[str] = (), inflight: CallsInFlight | None = None) -> None:
        """``inflight``: a front-end process's share of the server's count of calls (server/inflight.py)."""
        self.settings, self.engine_addresses = settings, list(engine_addresses)
        self.inflight = inflight
        self.metrics = Metrics(metrics_registry if metrics_registry is not None else CollectorRegistry())
        # Threads that turn hypotheses into responses (and decode images) while the engines keep decoding.
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="attn-worker")
        self.health = HealthServicer()
        self.registry: Registry | None = None  # the models, when they run in this process
        self.remote: RemoteModels | None = None  # ... when they run in the engine process
        self.servicer: AttentionServicer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()
        self.port = 0
        self.metrics_port: int | None = None
        self.shutting_down = False
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Binds and starts answering (health NOT_SERVING, Translate UNAVAILABLE until :meth:`load`)."""
        s = self.settings
        models: Models
        if not self.engine_addresses:
            models = self.registry = build_registry(s, self.metrics)
        else:
            models = self.remote = RemoteModels(self.engine_addresses, self._engine_changed)
            await self.remote.start()
        credentials, interceptors = security.configure(s, self.metrics)
        GRPC_AIO_LOGGER.addFilter(UNDELIVERED)
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", s.max_receive_bytes),
            ("grpc.max_send_message_length", s.max_send_bytes),
            # The server's own bandwidth-delay probe pings the client (and may resize its window with a SETTINGS
            # frame) as requests arrive; the client's answer to either, sent while it still reads an answer queued
            # ahead of them, can reach a connection that the age has closed meanwhile, and the reset drops the rest
            # of that answer (docs/serving-processes.md, "What the age costs"). A fixed window instead, large enough
            # for an image over a distant link.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", REQUEST_WINDOW),
            ("grpc.server_handshake_timeout_ms", int(1000 * HANDSHAKE_SECONDS)),
            # Alone, a second server on the same port must fail, not share it; front-ends share it on purpose
            # (the parent process made sure that no other server holds it).
            ("grpc.so_reuseport", 1 if self.engine_addresses else 0),
            # A connection stays with the front-end (and the replica) it reached first, and a client's calls all go
            # over one: asked to reconnect now and then (gRPC adds ±10 % jitter), clients spread again.
            *([("grpc.max_connection_age_ms", int(1000 * s.max_connection_age)),
               ("grpc.max_connection_age_grace_ms", int(1000 * s.grace_seconds))] if s.max_connection_age else []),
        ])
        servicer = AttentionServicer(models, self.pool, s, self.metrics, lambda: self.shutting_down,
                                     self.inflight)
        self.servicer = servicer
        wire.add_servicer(server, servicer, pb.DESCRIPTOR.services_by_name["AttentionService"])
        triton.add_to_server(servicer, server)  # the Triton / KServe V2 protocol on the same port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [SERVICE_NAME, triton.SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, server, pool=triton.reflection_pool(services))
        address = listen_address(s.host, s.port)
        if not self.engine_addresses:  # a front-end's port is the parent's, checked and held by it
            check_port_free(s.host, s.port)
        try:
            self.port = (server.add_insecure_port(address) if credentials is None
                         else server.add_secure_port(address, credentials))
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}")
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        if s.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {s.host}:{s.metrics_port}: {exc}") from exc
        event(log, self.role("listening"), host=s.host, port=self.port, metrics_port=self.metrics_port)
        return self.port

    async def load(self) -> None:
        """Loads and warms every model off the event loop (or waits for the engine process to have done so), then
        reports SERVING."""
        if self.remote is not None:
            await self.remote.wait_ready()
            models: Models = self.remote
        else:
            assert self.registry is not None, "start() first"
            await asyncio.to_thread(self.registry.load)
            models = self.registry
        await self._set_health(SERVING)
        event(log, self.role("ready"), models=[f"{m.name}/{m.version}" for m in models.models()],
              default_model=models.default_model)
        if self.registry is not None and self.settings.reload_interval > 0:
            self._watcher = asyncio.create_task(self._watch(self.settings.reload_interval))

    def role(self, name: str) -> str:
        """A front-end's lifecycle events are its own; the parent process announces the server's."""
        return f"frontend_{name}" if self.engine_addresses else name

    def _engine_changed(self, ready: bool) -> None:
        """Health follows the engine processes: NOT_SERVING while none is ready (all gone or loading)."""
        task = asyncio.ensure_future(self._set_health(SERVING if ready and not self.shutting_down else NOT_SERVING))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def reload(self) -> dict[str, list[str]]:
        """Loads new versions beside the serving ones and swaps them in (SIGHUP, the watcher, tests)."""
        assert self.registry is not None and self.registry.ready, "load() first"
        async with self._reloading:
            return await asyncio.to_thread(self.registry.reload_or_keep)

    async def _watch(self, interval: float) -> None:
        while not self.shutting_down:
            await asyncio.sleep(interval)
            await self.reload()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace`` seconds, release everything."""
        self.shutting_down = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.registry is not None:
            self.registry.interrupt()  # a load or reload in progress loads no further version
        await self.health.shut_down()
        if self.servicer is not None:
            self.servicer.streams_end.set()
        if self._server is not None:
            # gRPC's stop would close each connection once its answers are written, not yet delivered: a slow
            # client could lose them to a reset (server/drain.py). Let them arrive first, within the same grace.
            started = time.monotonic()
            if self.servicer is not None and not await drain.settle(self.servicer.unanswered, grace):
                event(log, self.role("drain_unsettled"), level=logging.WARNING, grace_seconds=grace,
                      unanswered=self.servicer.unanswered.count, unacknowledged_bytes=drain.unacknowledged_bytes())
            await self._server.stop(None if grace is None else max(grace - (time.monotonic() - started), 0.0))
            self._server = None
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)
        if self.remote is not None:
            await self.remote.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    async def _set_health(self, status: int) -> None:
        # The server and each inference service on the port: a probe may name the V2 one (reflection lists it).
        for service in ("", SERVICE_NAME, triton.SERVICE_NAME):
            await self.health.set(service, status)


async def serve(settings: Settings, engine_addresses: Sequence[str] = (),
                on_ready: Callable[[], None] | None = None, inflight: CallsInFlight | None = None) -> int:
    """Runs until SIGTERM/SIGINT; returns the process exit code (0 after a clean drain, 1 if start-up failed).
    ``engine_addresses``: serve as a front-end process of the engines there, counting calls into ``inflight``;
    ``on_ready`` is called once serving."""
    server = AttentionServer(settings, engine_addresses=engine_addresses, inflight=inflight)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    logs.gather_on(loop)  # the loop's log lines leave once per turn of it (if the server fails, at exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()
    hung_up_while_loading = False

    def hang_up() -> None:  # SIGHUP: look at the models folder now
        nonlocal hung_up_while_loading
        if server.engine_addresses:  # a front-end: the parent passes SIGHUP to the engine processes
            return
        if server.registry is None or not server.registry.ready:
            # The load may have read the folder before what the signal announces: look again once it is done
            hung_up_while_loading = True
            return
        task = asyncio.ensure_future(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hang_up)
    handle_signals()  # a front-end process starts with them blocked until here
    code = 0
    loading: asyncio.Task[None] | None = None
    try:
        await server.start()
        loading = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises what loading raised
            if on_ready is not None:
                on_ready()
            if hung_up_while_loading:
                hang_up()
        await stopping
    except Exception as exc:
        expected = isinstance(exc, StartupError)
        event(log, "startup_failed", level=logging.ERROR, exc_info=not expected, error=str(exc))
        code = 1
    if loading is not None and not loading.done():
        loading.cancel()  # its thread ends after the version it loads (stop() interrupts the registry)
    event(log, server.role("shutting_down"), grace_seconds=settings.grace_seconds,
          inflight=server.servicer.inflight.here if server.servicer else 0)
    await server.stop(settings.grace_seconds)
    event(log, server.role("stopped"), exit_code=code)
    logs.gather_on(None)
    return code
