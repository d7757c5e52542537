"""The server's lifecycle: bind, report NOT_SERVING, load and warm the models, report SERVING, drain on a signal.

:class:`AttentionServer` is what the tests drive (``start`` on port 0 → ``load`` → ``stop``); :func:`serve` is what
``attn-serve`` runs: the same plus signal handling and exit codes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from attention_pb.v1 import attention_pb2 as pb
from server import device, security, triton, wire
from server.engine import Limits
from server.errors import StartupError
from server.health import NOT_SERVING, SERVING, HealthServicer
from server.logs import event
from server.metrics import Metrics
from server.registry import Registry
from server.service import AttentionServicer
from server.settings import Settings, parse_pins

log = logging.getLogger("attn.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name


class AttentionServer:
    def __init__(self, settings: Settings, metrics_registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(metrics_registry if metrics_registry is not None else CollectorRegistry())
        # Threads that turn hypotheses into responses (and decode images) while the engines keep decoding.
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="attn-worker")
        self.health = HealthServicer()
        self.registry: Registry | None = None
        self.servicer: AttentionServicer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self.port = 0
        self.metrics_port: int | None = None
        self.shutting_down = False
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Binds and starts answering (health NOT_SERVING, Translate UNAVAILABLE until :meth:`load`)."""
        s = self.settings
        limits = Limits(max_batch_rows=s.max_batch_rows, max_batch_tokens=s.max_batch_tokens,
                        max_batch_requests=Limits.max_batch_requests if s.batching else 1,
                        max_queue_requests=s.max_queue_requests, max_queue_tokens=s.max_queue_tokens)
        chosen = device.choose(s.device, allow_spinning=s.ort_allow_spinning)
        if chosen.name == "cuda":
            self.metrics.watch_gpu()
        self.registry = Registry(Path(s.models_dir), chosen, s.default_model, s.variant, s.ort_threads, limits,
                                 self.metrics, s.version_policy, parse_pins(s.pinned_versions))
        credentials, interceptors = security.configure(s, self.metrics)
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", s.max_receive_bytes),
            ("grpc.max_send_message_length", s.max_send_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ])
        servicer = AttentionServicer(self.registry, self.pool, s, self.metrics, lambda: self.shutting_down)
        self.servicer = servicer
        wire.add_servicer(server, servicer, pb.DESCRIPTOR.services_by_name["AttentionService"])
        triton.add_to_server(servicer, server)  # the Triton / KServe V2 protocol on the same port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [SERVICE_NAME, triton.SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, server, pool=triton.reflection_pool(services))
        address = f"{s.host}:{s.port}"
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
        event(log, "listening", host=s.host, port=self.port, metrics_port=self.metrics_port)
        return self.port

    async def load(self) -> None:
        """Loads and warms every model off the event loop, then reports SERVING."""
        assert self.registry is not None, "start() first"
        await asyncio.to_thread(self.registry.load)
        await self._set_health(SERVING)
        event(log, "ready", models=[f"{m.name}/{m.version}" for m in self.registry.models()],
              default_model=self.registry.default_model)
        if self.settings.reload_interval > 0:
            self._watcher = asyncio.create_task(self._watch(self.settings.reload_interval))

    async def reload(self) -> dict[str, list[str]]:
        """Loads new versions beside the serving ones and swaps them in (SIGHUP, the watcher, tests)."""
        assert self.registry is not None and self.registry.ready, "load() first"
        async with self._reloading:
            try:
                return await asyncio.to_thread(self.registry.reload)
            except Exception:  # the folder vanished, a disk error: keep serving what is loaded
                event(log, "reload_failed", level=logging.ERROR, exc_info=True)
                return {"loaded": [], "refused": [], "retired": []}

    async def _watch(self, interval: float) -> None:
        while not self.shutting_down:
            await asyncio.sleep(interval)
            await self.reload()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace`` seconds, release everything."""
        self.shutting_down = True
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.shut_down()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM/SIGINT; returns the process exit code (0 after a clean drain, 1 if start-up failed)."""
    server = AttentionServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def hang_up() -> None:  # SIGHUP: look at the models folder now
        if server.registry is not None and server.registry.ready:
            task = asyncio.ensure_future(server.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hang_up)
    code = 0
    loading: asyncio.Task[None] | None = None
    try:
        await server.start()
        loading = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises what loading raised
        await stopping
    except Exception as exc:
        expected = isinstance(exc, StartupError)
        event(log, "startup_failed", level=logging.ERROR, exc_info=not expected, error=str(exc))
        code = 1
    if loading is not None and not loading.done():
        loading.cancel()  # the loading thread itself runs to its end; nothing waits for it
    event(log, "shutting_down", grace_seconds=settings.grace_seconds,
          inflight=server.servicer.inflight if server.servicer else 0)
    await server.stop(settings.grace_seconds)
    event(log, "stopped", exit_code=code)
    return code
