"""The engine's scheduler: the bounded queue, admission, deadlines and cancellation, and the lanes' turns."""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any, cast

import numpy as np

from server.engine.lanes import Lane, Owner
from server.errors import Cancelled, DeadlineExceeded, InvalidInput, Overloaded, ShuttingDown
from server.logs import event
from server.metrics import Metrics, observe_many
from server.runtime import DecoderRuntime
from server.search import Hypothesis, Search

log = logging.getLogger("attn.engine")

ADMISSION_WINDOW = 64  # queued requests looked at when filling a group by source length
# An RNN model's rows are kept in lanes by source length (tokens, upper bounds; longer ones share the last lane):
# a lane pads its sources to its own longest, not to the longest in flight, and the static inputs attended over at
# every step shrink with it.
LENGTH_BUCKETS = (16, 32, 64)
MIXED = -1  # the bucket of the lane every length up to LENGTH_BUCKETS[-1] shares under light load (Limits)
FLUSH_SECONDS = 0.25  # under load the engine's histograms reach /metrics at least this often
SEARCHES_KEPT = 64  # decoding settings remembered for sharing (a client can send a new length penalty every call)


@dataclass(frozen=True)
class Limits:
    max_batch_rows: int = 256  # hypotheses (sentences × beam) decoded together
    max_batch_tokens: int = 32768  # source positions over those hypotheses
    max_batch_requests: int = 1 << 30  # 1: batching off (one request at a time)
    max_queue_requests: int = 1024
    max_queue_tokens: int = 65536
    # While the engine holds at most this many rows, an RNN model's sources of up to LENGTH_BUCKETS[-1] tokens share
    # one lane instead of lanes by length: with few rows a decoder call's fixed cost outweighs attending over
    # padding, and lanes by length made two or three small calls per step (docs/benchmarks.md, "Lanes by length under
    # light load"). 0: always by length. The server's ATTN_MIXED_LANE_ROWS.
    mixed_lane_rows: int = 128


@dataclass(eq=False)
class Request:
    items: list[Any]
    options: Any
    search: Search
    selection: tuple[int, int] | None  # another layer's or head's attention than the manifest's default
    src_lens: list[int | None]
    costs: list[int]
    budgets: list[int]
    deadline: float | None
    enqueued: float
    future: Future[list[list[Hypothesis]]] = field(default_factory=Future)
    results: list[list[Hypothesis] | None] = field(default_factory=list)  # per item; None until it finishes
    pending: int = 0
    status: str = "queued"  # then "active", then "done"; "held": a later part, not queued yet
    placements: list[tuple[Lane, int, int]] = field(default_factory=list)  # (lane, group, slot) of each sentence
    next_part: Request | None = None  # of a request in parts (Engine.submit): queued once this one is decoded
    waited: float = 0.0  # in the queue, by the request's parts before this one

    @property
    def rows(self) -> int:
        return self.search.k * len(self.items)

    @property
    def tokens(self) -> int:
        return self.search.k * sum(self.costs)

    @property
    def length(self) -> float:
        return sum(self.costs) / len(self.costs)


def _whole(parts: list[Request]) -> Future[list[list[Hypothesis]]]:
    """The future of a request queued in parts: every part's results in order once all have them, or the first
    part's error, which cancels the others (so that they leave the queue and the batch); cancelling it cancels them
    all. It holds its parts' futures weakly (their requests hold them while the engine has them) and they gather
    into a list of their own: each holding the other made a cycle, so a finished request and its hypotheses waited
    for the garbage collector."""
    whole: Future[list[list[Hypothesis]]] = Future()
    futures = [weakref.ref(p.future) for p in parts]
    found: list[list[list[Hypothesis]] | None] = [None] * len(parts)  # each part's results, once it has them

    def part_done(index: int, part: Future[list[list[Hypothesis]]]) -> None:
        if whole.done() or part.cancelled():
            return
        try:
            if (error := part.exception()) is not None:
                whole.set_exception(error)  # whole_done cancels the other parts
                return
            found[index] = part.result()
            if all(f is not None for f in found):
                whole.set_result([items for f in found for items in f])  # type: ignore[union-attr]
        except InvalidStateError:  # the caller cancelled it meanwhile
            pass

    def whole_done(done: Future[list[list[Hypothesis]]]) -> None:
        if done.cancelled() or done.exception() is not None:
            for held in futures:
                if (future := held()) is not None:  # None: its part ended and was freed
                    future.cancel()

    whole.add_done_callback(whole_done)
    for index, part in enumerate(parts):
        part.future.add_done_callback(functools.partial(part_done, index))
    return whole


def _bucket(length: int | None) -> int:
    if length is None:
        return 0
    return next((i for i, bound in enumerate(LENGTH_BUCKETS) if length <= bound), len(LENGTH_BUCKETS))


class Engine:
    def __init__(self, model: DecoderRuntime, limits: Limits = Limits(), metrics: Metrics | None = None) -> None:
        self.model, self.limits, self.metrics = model, limits, metrics
        self._labels = (model.name, model.version)
        self._metric = _Children(metrics, self._labels, limits.max_queue_requests) if metrics else None
        self._lock = threading.Condition()
        self._queue: deque[Request] = deque()
        self._queued_tokens = 0  # of the requests queued and of the later parts not queued yet: all of them wait
        self._active: dict[int, Request] = {}
        self._lanes: list[Lane] = []
        self._rows = self._tokens = 0
        self._searches: OrderedDict[tuple[Any, ...], Search] = OrderedDict()
        self._gone: deque[Request] = deque()  # cancelled by their callers (appended from their threads)
        # A heap of weak references (see _cancelled_hook); finished requests' entries leave it lazily.
        self._deadlines: list[tuple[float, int, weakref.ref[Request]]] = []
        self._order = count()
        self._gauges_stale = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{model.name}-{model.version}", daemon=True)
        self._thread.start()

    # -- the caller's side (the event loop) ----------------------------------------------------------------------

    def submit(self, items: Sequence[Any], options: Any, timeout: float | None = None) -> Future[
            list[list[Hypothesis]]]:
        """Queues one request; its future gets each item's hypotheses (best first) or the error that stopped it.
        Cancelling the future takes the request out of the batch at the next step. Raises :class:`Overloaded` when
        the queue is full (a retry may fit), :class:`InvalidInput` when the request alone has more source tokens than
        the queue holds (a retry never fits), :class:`ShuttingDown` once the engine is closing.

        A request of more hypotheses than half of ``max_batch_rows`` is decoded in parts of at most that many, each
        part queued once the one before it is decoded: whole, it ran alone (nothing fits beside a batch's whole
        budget) and every call behind it waited the seconds it took (32 texts at beam 16 are 512 hypotheses). In
        parts it holds at most half the budget, so that calls arriving meanwhile fit beside it, and one place in the
        queue or the batch at a time, so that it counts as one request against the queue's limit and in the
        gauges."""
        model = self.model
        search = self._search_for(options)
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        selection = model.selection(options)
        per_part = self._part_items(search.k, len(items))
        parts = [Request(list(chunk), options, search, selection, [model.src_len(i) for i in chunk],
                         [model.cost(i) for i in chunk], [model.budget_for(i, options) for i in chunk], deadline, now)
                 for chunk in (items[at:at + per_part] for at in range(0, len(items), per_part))]
        for part, later in zip(parts, parts[1:]):
            part.next_part, later.status = later, "held"
        for part in parts:
            part.results, part.pending = [None] * len(part.items), len(part.items)
        request, limits, tokens = parts[0], self.limits, sum(sum(p.costs) for p in parts)
        if tokens > limits.max_queue_tokens:  # not even an empty queue takes it: a retry would be refused the same
            raise InvalidInput(f"the request has {tokens} source tokens (grid cells for images), more than the "
                               f"queue of model {model.name} holds (max_queue_tokens {limits.max_queue_tokens}); "
                               "send fewer or shorter texts, or fewer images, per call")
        with self._lock:
            if self._closed:
                raise ShuttingDown("the model is being unloaded; retry")
            queued = len(self._queue)
            if queued >= limits.max_queue_requests:
                raise Overloaded(f"the queue of model {model.name} holds {queued} requests, its limit "
                                 f"(max_queue_requests); retry later")
            if self._queued_tokens + tokens > limits.max_queue_tokens:
                raise Overloaded(f"the queue of model {model.name} holds {self._queued_tokens} source tokens; "
                                 f"{tokens} more would pass its limit of {limits.max_queue_tokens} "
                                 "(max_queue_tokens); retry later")
            self._queued_tokens += tokens  # every part's: a later one leaves the count when it leaves the queue
            self._enqueue(request)
            self._lock.notify()
        for part in parts:
            part.future.add_done_callback(self._cancelled_hook(part))
        return request.future if len(parts) == 1 else _whole(parts)

    def _part_items(self, k: int, items: int) -> int:
        """Items per part of a request of ``k`` hypotheses per item: half the row budget's worth, or all of them with
        batching off (one request at a time), where nothing is admitted beside a part."""
        limits = self.limits
        return max(1, limits.max_batch_rows // 2 // k if limits.max_batch_requests > 1 else items)

    def _enqueue(self, request: Request) -> None:
        """Called with the lock held; its tokens were counted when it was submitted."""
        self._queue.append(request)
        request.status = "queued"
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, next(self._order), weakref.ref(request)))
        self._gauges_stale = True

    def _cancelled_hook(self, request: Request) -> Callable[[Future[Any]], None]:
        """The future's callback that hands a cancelled request to the engine's thread. It holds the request weakly,
        as the deadline heap does: the request holds its future, and a strong reference back made a cycle that only
        the garbage collector frees, so every finished request waited for a collection (a cancelled one is still
        queued or active when its callback runs)."""
        held = weakref.ref(request)

        def hook(future: Future[Any]) -> None:
            if future.cancelled() and (cancelled := held()) is not None:
                self._gone.append(cancelled)

        return hook

    def _search_for(self, options: Any) -> Search:
        """One search object per setting, so that requests with the same setting advance in one vectorised call.
        Settings include a client's float length penalty, so only the most recently used are remembered: a request
        whose setting was forgotten gets a new object and advances in a call of its own."""
        search = self.model.search_for(options)
        shared = self._searches.setdefault(search.key, search)
        self._searches.move_to_end(search.key)
        if len(self._searches) > SEARCHES_KEPT:
            self._searches.popitem(last=False)
        return shared

    def close(self) -> None:
        """Stops the engine; what is still queued or decoding fails with ShuttingDown."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    # -- the engine's thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0  # turns in a row that ended in a failure of the engine's own code
        while True:
            expired: list[Request] = []
            try:
                with self._lock:
                    if self._gauges_stale:
                        self._gauges()
                    if self._metric and not self._queue and not self._lanes:
                        self._metric.flush()  # idle (a cancellation emptied the lanes): nothing tallied waits
                    while not self._closed and not self._queue and not self._lanes:
                        self._lock.wait()
                    if self._closed:
                        break
                    expired = self._expired()
                    group = self._admit()
                self._sweep(expired)
                if group:
                    self._join(group)
                for lane in list(self._lanes):
                    self._step(lane)
                failures = 0
            except Exception as exc:
                failures += 1
                self._recover(exc, expired, failures)
        stopped = ShuttingDown("the server is shutting down; retry on another instance")
        with self._lock:
            # (the later parts of a request not queued yet end with their whole, which the earlier parts fail)
            waiting, self._queue, self._queued_tokens = list(self._queue), deque(), 0
        for request in [*waiting, *self._active.values()]:
            self._fail(request, stopped)
        self._lanes.clear()
        self._gauges()
        if self._metric:
            self._metric.flush()

    def _recover(self, error: Exception, expired: list[Request], failures: int) -> None:
        """A failure outside the model's calls (theirs fail only the rows in the call) is a bug in the engine's own
        bookkeeping, after which what it holds cannot be trusted: every request it was decoding fails with the
        error (a generic INTERNAL for the caller) rather than wait for ever on a thread that died, and the engine
        goes on with an empty batch. The queue is kept, unless the turn before failed too: then something waiting
        may be what fails, and the queue fails as well, so that the engine holds nothing that can fail it again."""
        event(log, "engine_failed", level=logging.ERROR, exc_info=True, model=self.model.name,
              active=len(self._active), queued=len(self._queue), in_a_row=failures)
        with self._lock:
            held = [*expired, *self._active.values()]
            if failures > 1:
                for request in list(self._queue):
                    self._dequeue(request)
                    held.append(request)
        for request in held:
            self._fail(request, error)
        with self._lock:
            self._lanes.clear()
            self._active.clear()
            self._rows = self._tokens = 0
            self._gauges_stale = True
        if failures > 2:  # failing while holding nothing: not a request's doing; no hot loop filling the log
            time.sleep(min(1.0, 0.01 * 2 ** failures))

    def _expired(self) -> list[Request]:
        """Requests cancelled or past their deadline since the last step; the queued ones leave the queue. Called
        with the lock held."""
        now = time.monotonic()
        stopped = []
        while self._gone:
            stopped.append(self._gone.popleft())
        while self._deadlines and self._deadlines[0][0] < now:
            if (due := heapq.heappop(self._deadlines)[2]()) is not None:  # None: finished and freed
                stopped.append(due)
        if len(self._deadlines) > 2 * (len(self._queue) + len(self._active)) + 64:  # forget the finished ones
            self._deadlines = [d for d in self._deadlines if (r := d[2]()) is not None and r.status != "done"]
            heapq.heapify(self._deadlines)
        unique = {id(r): r for r in stopped if r.status != "done"}
        for request in unique.values():
            if request.status in ("queued", "held"):  # a held part leaves too: never queued after its whole ended
                self._dequeue(request)
        return list(unique.values())

    def _fits(self, request: Request, requests: int, rows: int, tokens: int) -> bool:
        limits = self.limits
        return (requests < limits.max_batch_requests and rows + request.rows <= limits.max_batch_rows
                and tokens + request.tokens <= limits.max_batch_tokens)

    def _admit(self) -> list[Request]:
        """Takes the oldest waiting request if the budget allows (or nothing is running), then the waiting ones
        closest to it in source length that still fit. Called with the lock held."""
        if not self._queue:
            return []
        now = time.monotonic()
        anchor = self._queue[0]
        requests, rows, tokens = len(self._active), self._rows, self._tokens
        if self._active and not self._fits(anchor, requests, rows, tokens):
            return []
        group = [anchor]
        requests, rows, tokens = requests + 1, rows + anchor.rows, tokens + anchor.tokens
        others = sorted(islice(self._queue, 1, ADMISSION_WINDOW), key=lambda r: abs(r.length - anchor.length))
        for request in others:
            if self._fits(request, requests, rows, tokens):
                group.append(request)
                requests, rows, tokens = requests + 1, rows + request.rows, tokens + request.tokens
        for request in group:
            self._dequeue(request)
            request.status = "active"
            self._active[id(request)] = request
            waited = request.waited + now - request.enqueued
            if request.next_part is not None:  # a request in parts is observed once, its parts' waits together
                request.next_part.waited = waited
            elif self._metric:
                self._metric.waits.append(waited)
        self._rows, self._tokens = rows, tokens
        self._gauges_stale = True
        return group

    def _join(self, group: list[Request]) -> None:
        """Encodes the admitted group in one call and adds its rows to the lanes."""
        model = self.model
        try:
            started = time.perf_counter()
            state, static = model.encode([item for r in group for item in r.items])
            if self._metric:
                self._metric.encodes.append(time.perf_counter() - started)
        except Exception as exc:
            event(log, "encoder_failed", level=logging.ERROR, exc_info=True, model=model.name, requests=len(group))
            for request in group:
                self._fail(request, exc)
            return
        entries: list[tuple[Owner, Search, int, int | None, tuple[int, int] | None]] = [
            ((r, i), r.search, r.budgets[i], r.src_lens[i], r.selection) for r in group for i in range(len(r.items))]
        ks = np.array([e[1].k for e in entries])
        repeat = np.repeat(np.arange(len(entries)), ks)  # a beam's k rows start from the same encoding
        parts: dict[int | None, np.ndarray] = {None: np.arange(len(entries))}
        if not model.growing_state:
            buckets = np.array([_bucket(e[3]) for e in entries])
            if self._rows <= self.limits.mixed_lane_rows:
                buckets[buckets < len(LENGTH_BUCKETS)] = MIXED
            parts = {int(b): np.flatnonzero(buckets == b) for b in np.unique(buckets)}
        for bucket, chosen in parts.items():
            if len(chosen) == len(entries) and len(repeat) == len(entries):  # one lane, one row each: as encoded
                part_state, part_static = state, static
            else:
                in_part = np.zeros(len(entries), dtype=bool)
                in_part[chosen] = True
                rows = repeat[in_part[repeat]]
                part_state = {n: v.take(rows, axis=0) for n, v in state.items()}
                part_static = {n: v.take(rows, axis=0) for n, v in static.items()}
            part_static = self._narrowed(part_static, [entries[j][3] for j in chosen])
            lane = next((lane for lane in self._lanes if bucket is not None and lane.bucket == bucket), None)
            if lane is None:
                lane = Lane(model, bucket)
                self._lanes.append(lane)
            for (owner, *_), placement in zip([entries[j] for j in chosen],
                                              lane.add([entries[j] for j in chosen], part_state, part_static)):
                owner[0].placements.append(placement)

    def _narrowed(self, static: dict[str, np.ndarray], lengths: list[int | None]) -> dict[str, np.ndarray]:
        """The source axes cut to the longest of ``lengths``: no attention over padding nobody needs."""
        axes = self.model.src_axes
        if not axes or None in lengths:
            return static
        width = max(int(n) for n in lengths if n is not None)
        return {n: v.take(np.arange(width), axis=axes[n]) if n in axes and v.shape[axes[n]] > width else v
                for n, v in static.items()}

    def _sweep(self, stopped: list[Request]) -> None:
        """Takes requests whose caller went away or whose deadline passed out of the batch (or the queue)."""
        for request in stopped:
            self._withdraw(request)
            self._stop(request)

    def _withdraw(self, request: Request) -> None:
        """Takes the sentences of ``request`` that are still decoding out of their lanes."""
        lanes: dict[int, tuple[Lane, list[tuple[int, int]]]] = {}
        for lane, gid, slot in request.placements:
            if lane.owns(gid, slot, request):
                lanes.setdefault(id(lane), (lane, []))[1].append((gid, slot))
        for lane, placements in lanes.values():
            lane.drop(placements)
            if lane.n == 0 and lane in self._lanes:
                self._lanes.remove(lane)

    def _step(self, lane: Lane) -> None:
        """One decoder call for every row of the lane, then one search step per setting in it."""
        model = self.model
        if lane.n == 0 or lane not in self._lanes:  # emptied by a failure in another lane
            return
        try:
            started = time.perf_counter()
            outputs = lane.compute()
            seconds = time.perf_counter() - started
        except Exception as exc:
            event(log, "decoder_failed", level=logging.ERROR, exc_info=True, model=model.name, rows=lane.n)
            self._lanes.remove(lane)
            for request, _ in list(lane.requests.values()):
                self._withdraw(request)  # its sentences in other lanes
                self._fail(request, exc)
            return
        if self._metric:
            self._metric.tally_step(seconds, len(lane.requests), lane.n)
        finished = lane.advance(outputs)
        if lane.n == 0:
            self._lanes.remove(lane)
        # The step metrics are written a few times a second, and before the answers of a step that leaves the
        # engine with nothing to decode: a caller that reads /metrics after its last answer sees its steps.
        if self._metric and (self._metric.due() or not self._lanes):
            self._metric.flush()
        for owner, hypotheses in finished:
            self._finish(owner, hypotheses)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _finish(self, owner: Owner, hypotheses: list[Hypothesis]) -> None:
        request, index = owner
        if request.status != "active":  # failed meanwhile
            return
        request.results[index] = hypotheses
        request.pending -= 1
        with self._lock:
            self._rows -= request.search.k
            self._tokens -= request.search.k * request.costs[index]
        if request.pending == 0:
            self._retire(request)
            try:
                request.future.set_result(cast(list[list[Hypothesis]], request.results))  # every item's now
            except InvalidStateError:  # cancelled meanwhile
                return
            if (part := request.next_part) is not None and part.status == "held" and not part.future.done():
                with self._lock:
                    part.enqueued = time.monotonic()  # its own wait in the queue, not its parts' before it
                    self._enqueue(part)

    def _retire(self, request: Request) -> None:
        """``request`` leaves the active set; the rows of its unfinished sentences are given back."""
        with self._lock:
            if self._active.pop(id(request), None) is not None:
                # the sentences still decoding (None): a finished one, which always has hypotheses, gave its rows
                # back when it ended
                unfinished = [i for i, r in enumerate(request.results) if r is None]
                self._rows -= request.search.k * len(unfinished)
                self._tokens -= request.search.k * sum(request.costs[i] for i in unfinished)
                request.pending = 0
                self._gauges_stale = True
            request.status = "done"

    def _stop(self, request: Request) -> None:
        """Ends a request whose caller went away or whose deadline passed."""
        passed = request.deadline is not None and request.deadline < time.monotonic()
        self._fail(request, DeadlineExceeded("the deadline passed before the request was complete") if passed
                   else Cancelled("the call was cancelled"))

    def _fail(self, request: Request, error: BaseException) -> None:
        self._retire(request)
        try:
            request.future.set_exception(error)
        except InvalidStateError:
            pass

    def _dequeue(self, request: Request) -> None:
        """Takes a request out of what waits: the queue, or the later parts of a request not queued yet."""
        if request.status == "queued":
            self._queue.remove(request)
        self._queued_tokens -= sum(request.costs)
        request.status = "dequeued"
        self._gauges_stale = True

    def _gauges(self) -> None:
        """Writes the queue and active gauges. What changes them (a submit, an admission, a retirement) only marks
        them stale; the engine's thread writes them once per turn of its loop, before it waits: in multiprocess
        mode each write is a lock and a shared-file update, and a request changed them four times."""
        self._gauges_stale = False
        if self._metric:
            self._metric.queue_requests.set(len(self._queue))
            self._metric.queue_tokens.set(self._queued_tokens)
            self._metric.active_requests.set(len(self._active))


class _Children:
    """The engine's metrics with its model's labels, looked up once (a label lookup costs more than the update).
    The histograms (three observed at every decoder step, a request's wait at its admission, an encoder call's time)
    are tallied and written by :meth:`flush` (:func:`observe_many`): in multiprocess mode each observation is two
    locked writes into a shared file."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str], queue_capacity: int) -> None:
        self.steps: list[tuple[float, int, int]] = []  # (decoder seconds, requests, rows) since the last flush
        self.waits: list[float] = []  # seconds each request admitted since the last flush waited in the queue
        self.encodes: list[float] = []  # seconds of each encoder call since the last flush
        self.flushed = time.monotonic()
        self.queue_time = metrics.queue_time.labels(*labels)
        self.encoder = metrics.compute_time.labels(*labels, "encoder")
        self.decoder = metrics.compute_time.labels(*labels, "decoder")
        self.batch_requests = metrics.batch_requests.labels(*labels)
        self.batch_rows = metrics.batch_rows.labels(*labels)
        self.queue_requests = metrics.queue_requests.labels(*labels)
        self.queue_tokens = metrics.queue_tokens.labels(*labels)
        self.active_requests = metrics.active_requests.labels(*labels)
        metrics.queue_capacity.labels(*labels).set(queue_capacity)

    def tally_step(self, seconds: float, requests: int, rows: int) -> None:
        self.steps.append((seconds, requests, rows))

    def due(self) -> bool:
        return time.monotonic() - self.flushed >= FLUSH_SECONDS

    def flush(self) -> None:
        if self.steps:
            seconds, requests, rows = zip(*self.steps)
            observe_many(self.decoder, seconds)
            observe_many(self.batch_requests, requests)
            observe_many(self.batch_rows, rows)
            self.steps.clear()
        for histogram, values in ((self.queue_time, self.waits), (self.encoder, self.encodes)):
            observe_many(histogram, values)
            values.clear()
        self.flushed = time.monotonic()
