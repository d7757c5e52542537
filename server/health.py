"""``grpc.health.v1.Health`` (Check and Watch) for ``grpc.aio``, with a drain that ends open Watch streams.

The stock asyncio servicer keeps every Watch stream open forever, so a load balancer watching the server would hold
a graceful shutdown for the whole grace period. Here :meth:`HealthServicer.shut_down` sends NOT_SERVING to every
watcher and then ends their streams with OK, so only real requests are waited for.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.errors import echo

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None  # created on the server's event loop, on first use
        self._shutting_down = False

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {echo(request.service)}")
        return health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]

    async def Watch(self, request: health_pb2.HealthCheckRequest,  # type: ignore[override]
                    context: grpc.aio.ServicerContext) -> None:
        condition = self._condition()
        last = None
        async with condition:
            while True:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))  # type: ignore[arg-type]
                    last = status
                if self._shutting_down:
                    return
                await condition.wait()

    async def set(self, service: str, status: int) -> None:
        if self._shutting_down:
            return
        async with self._condition():
            self._status[service] = status
            self._condition().notify_all()

    async def shut_down(self) -> None:
        """Every service NOT_SERVING for good; watchers get that status and their streams end."""
        async with self._condition():
            self._shutting_down = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._condition().notify_all()
