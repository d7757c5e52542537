"""Runs model work on a bounded pool of worker threads, off the event loop, with admission control and deadlines.

ONNX Runtime releases the GIL while it computes, so a few threads keep the cores busy while the event loop keeps
answering health checks and new calls. Admission is bounded (``max_inflight``): beyond it a call is refused with
RESOURCE_EXHAUSTED at once instead of queueing without limit. Work checks its deadline and its caller between
decoder steps, so an expired or cancelled call stops computing. (Batching requests together is a later issue.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.errors import Cancelled, DeadlineExceeded, Overloaded

T = TypeVar("T")


class Ticket:
    """What a running job polls between steps: its deadline and whether its caller went away."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancelled = threading.Event()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the call was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the deadline passed before the translation was complete")


class Scheduler:
    def __init__(self, workers: int, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attn-worker")

    async def run(self, fn: Callable[[Ticket], T], timeout: float | None = None) -> T:
        """Runs ``fn(ticket)`` on a worker; raises :class:`Overloaded` when ``max_inflight`` calls are admitted."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"{self.inflight} requests are in flight (the limit); retry later")
        ticket = Ticket(timeout)
        ticket.check()
        self.inflight += 1
        try:
            context = contextvars.copy_context()  # the request id follows the work into the thread
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, context.run, fn, ticket)
        except asyncio.CancelledError:
            ticket.cancelled.set()
            raise
        finally:
            self.inflight -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
