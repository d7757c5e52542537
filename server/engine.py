"""Iteration-level batching: one engine per served model decodes the requests of all clients together.

Requests enter a bounded queue: beyond ``max_queue_requests`` requests or ``max_queue_tokens`` source tokens a
request is refused at once (RESOURCE_EXHAUSTED, naming the limit) rather than queueing without end. At every step
boundary the engine admits waiting requests under its budget (``max_batch_rows`` hypotheses, ``max_batch_tokens``
source positions over them): the oldest first, so nothing starves, then those whose source length is closest to it,
so the group pads little. The encoder runs once for the admitted group and its rows join the batch; every decoder
step then runs on all active hypotheses of all admitted requests in one ONNX Runtime call, and a sentence that
finishes leaves the batch at once. Deadlines and cancellations are checked while queued and before every step.
Beam search runs vectorised over requests × beams; the exported step takes its static inputs (encoder memory,
projected keys, mask) per row, so a beam's rows hold copies of one encoding, made once at admission: reordering a
beam through its back-pointers moves only the recurrent state, and static rows are copied only when sentences leave.

The engine is a thread of its own: ONNX Runtime releases the GIL, so the event loop keeps accepting and answering
calls while the device computes, and hypotheses become responses on other threads.

Rows at different steps can share a call only when the decoder state has a fixed size (RNN state). A Transformer's
key/value cache grows with the step and the exported step has no mask over cache positions, so for such models
every admitted group is a *lane* of its own: all lanes step in turn, each in one call, and no group joins a running
lane (finished sentences still leave it at once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from server.errors import Cancelled, DeadlineExceeded, Overloaded, ShuttingDown
from server.logs import event
from server.metrics import Metrics
from server.runtime import DecoderRuntime
from server.search import Hypothesis, Search, Sentence, State

log = logging.getLogger("attn.engine")

ADMISSION_WINDOW = 64  # queued requests looked at when filling a group by source length
# An RNN model's rows are kept in lanes by source length (tokens, upper bounds; longer ones share the last lane):
# a lane pads its sources to its own longest, not to the longest in flight, and the static inputs that are copied
# when rows join and leave, and attended over at every step, shrink with it.
LENGTH_BUCKETS = (16, 32, 64)
SEARCHES_KEPT = 64  # decoding settings remembered for sharing (a client can send a new length penalty every call)


@dataclass(frozen=True)
class Limits:
    max_batch_rows: int = 256  # hypotheses (sentences × beam) decoded together
    max_batch_tokens: int = 32768  # source positions over those hypotheses
    max_batch_requests: int = 1 << 30  # 1: batching off (one request at a time)
    max_queue_requests: int = 1024
    max_queue_tokens: int = 65536


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
    results: list[list[Hypothesis]] = field(default_factory=list)
    pending: int = 0

    @property
    def rows(self) -> int:
        return self.search.k * len(self.items)

    @property
    def tokens(self) -> int:
        return self.search.k * sum(self.costs)

    @property
    def length(self) -> float:
        return sum(self.costs) / len(self.costs)


@dataclass(eq=False)
class Entry:
    """One sentence of a request, occupying ``k`` consecutive rows of a lane."""

    request: Request
    index: int
    sentence: Sentence


class Lane:
    """Rows decoded by one call per step: the decoder state and static inputs of its entries, in entry order.
    ``bucket`` is its source-length bucket (``None``: a group of a growing-state model, joined by no other)."""

    def __init__(self, entries: list[Entry], state: State, static: State, tokens: np.ndarray,
                 bucket: int | None = None) -> None:
        self.entries, self.state, self.static, self.tokens = entries, state, static, tokens
        self.bucket = bucket

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([e.sentence.k for e in self.entries])])


def _bucket(length: int | None) -> int:
    if length is None:
        return 0
    return next((i for i, bound in enumerate(LENGTH_BUCKETS) if length <= bound), len(LENGTH_BUCKETS))


def _rows(ks: list[int], chosen: list[int]) -> np.ndarray:
    """Batch rows of the chosen entries, entry ``j`` holding ``ks[j]`` consecutive rows."""
    starts = np.cumsum([0, *ks])
    return np.concatenate([np.arange(starts[j], starts[j] + ks[j]) for j in chosen])


def _pad(value: np.ndarray, axis: int, width: int) -> np.ndarray:
    if value.shape[axis] == width:
        return value
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, width - value.shape[axis])
    return np.pad(value, pad)  # zeros: False in the mask, so padded positions get no attention


class Engine:
    def __init__(self, model: DecoderRuntime, limits: Limits = Limits(), metrics: Metrics | None = None) -> None:
        self.model, self.limits, self.metrics = model, limits, metrics
        self._labels = (model.name, model.version)
        self._lock = threading.Condition()
        self._queue: deque[Request] = deque()
        self._queued_tokens = 0
        self._active: list[Request] = []
        self._lanes: list[Lane] = []
        self._rows = self._tokens = 0
        self._searches: OrderedDict[tuple[Any, ...], Search] = OrderedDict()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{model.name}-{model.version}", daemon=True)
        self._thread.start()

    # -- the caller's side (the event loop) ----------------------------------------------------------------------

    def submit(self, items: Sequence[Any], options: Any, timeout: float | None = None) -> Future[
            list[list[Hypothesis]]]:
        """Queues one request; its future gets each item's hypotheses (best first) or the error that stopped it.
        Cancelling the future takes the request out of the batch at the next step. Raises :class:`Overloaded`."""
        model = self.model
        search = self._search_for(options)
        now = time.monotonic()
        request = Request(
            list(items), options, search, model.selection(options), [model.src_len(i) for i in items],
            [model.cost(i) for i in items], [model.budget_for(i, options) for i in items],
            None if timeout is None else now + timeout, now,
        )
        request.results, request.pending = [[] for _ in items], len(items)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the model is being unloaded; retry")
            limits, queued = self.limits, len(self._queue)
            if queued >= limits.max_queue_requests:
                raise Overloaded(f"the queue of model {model.name} holds {queued} requests, its limit "
                                 f"(max_queue_requests); retry later")
            if self._queued_tokens + sum(request.costs) > limits.max_queue_tokens:
                raise Overloaded(f"the queue of model {model.name} holds {self._queued_tokens} source tokens; "
                                 f"{sum(request.costs)} more would pass its limit of {limits.max_queue_tokens} "
                                 "(max_queue_tokens); retry later")
            self._queue.append(request)
            self._queued_tokens += sum(request.costs)
            self._gauges()
            self._lock.notify()
        return request.future

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
        while True:
            with self._lock:
                while not self._closed and not self._queue and not self._lanes:
                    self._lock.wait()
                if self._closed:
                    break
                group = self._admit()
            if group:
                self._join(group)
            self._sweep()
            for lane in list(self._lanes):
                self._step(lane)
        stopped = ShuttingDown("the server is shutting down; retry on another instance")
        with self._lock:
            waiting, self._queue = list(self._queue), deque()
        for request in [*waiting, *self._active]:
            self._fail(request, stopped)
        self._lanes.clear()

    def _fits(self, request: Request, requests: int, rows: int, tokens: int) -> bool:
        limits = self.limits
        return (requests < limits.max_batch_requests and rows + request.rows <= limits.max_batch_rows
                and tokens + request.tokens <= limits.max_batch_tokens)

    def _admit(self) -> list[Request]:
        """Takes the oldest waiting request if the budget allows (or nothing is running), then the waiting ones
        closest to it in source length that still fit. Called with the lock held."""
        now = time.monotonic()
        for request in [r for r in self._queue if r.future.cancelled() or (r.deadline and r.deadline < now)]:
            self._dequeue(request)
            self._stop(request)
        if not self._queue:
            return []
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
            if self.metrics:
                self.metrics.queue_time.labels(*self._labels).observe(now - request.enqueued)
        self._active.extend(group)
        self._rows, self._tokens = rows, tokens
        self._gauges()
        return group

    def _join(self, group: list[Request]) -> None:
        """Encodes the admitted group in one call and adds its rows to the batch."""
        model = self.model
        try:
            started = time.perf_counter()
            state, static = model.encode([item for r in group for item in r.items])
            self._observe("encoder", time.perf_counter() - started)
        except Exception as exc:
            event(log, "encoder_failed", level=logging.ERROR, exc_info=True, model=model.name, requests=len(group))
            for request in group:
                self._fail(request, exc)
            return
        entries = [Entry(r, i, r.search.start(r.budgets[i], r.src_lens[i])) for r in group for i in range(len(r.items))]
        ks = [e.sentence.k for e in entries]
        if max(ks) > 1:  # a beam's k rows start from the same encoding
            repeat = np.repeat(np.arange(len(entries)), ks)
            state = {n: v.take(repeat, axis=0) for n, v in state.items()}
            static = {n: v.take(repeat, axis=0) for n, v in static.items()}
        tokens = np.full(sum(ks), model.bos_id, dtype=np.int64)
        if model.growing_state:
            self._lanes.append(Lane(entries, state, static, tokens))
            return
        buckets = [_bucket(e.sentence.src_len) for e in entries]
        for bucket in sorted(set(buckets)):
            chosen = [j for j, b in enumerate(buckets) if b == bucket]
            if len(chosen) == len(entries):
                part = Lane(entries, state, static, tokens, bucket)
            else:
                rows = _rows(ks, chosen)
                part = Lane([entries[j] for j in chosen], {n: v.take(rows, axis=0) for n, v in state.items()},
                            {n: v.take(rows, axis=0) for n, v in static.items()}, tokens[rows], bucket)
                self._narrow(part)
            lane = next((lane for lane in self._lanes if lane.bucket == bucket), None)
            if lane is None:
                self._lanes.append(part)
                continue
            for name, axis in model.src_axes.items():  # pad both sides to the wider source
                width = max(lane.static[name].shape[axis], part.static[name].shape[axis])
                lane.static[name] = _pad(lane.static[name], axis, width)
                part.static[name] = _pad(part.static[name], axis, width)
            lane.entries.extend(part.entries)
            lane.state = {n: np.concatenate([v, part.state[n]]) for n, v in lane.state.items()}
            lane.static = {n: np.concatenate([v, part.static[n]]) for n, v in lane.static.items()}
            lane.tokens = np.concatenate([lane.tokens, part.tokens])

    def _sweep(self) -> None:
        """Takes requests whose caller went away or whose deadline passed out of the batch."""
        now = time.monotonic()
        gone = {id(r) for r in self._active if r.future.cancelled() or (r.deadline and r.deadline < now)}
        if not gone:
            return
        for lane in list(self._lanes):
            keep = [j for j, e in enumerate(lane.entries) if id(e.request) not in gone]
            if len(keep) < len(lane.entries):
                self._compact(lane, keep, np.arange(len(lane.tokens)), lane.tokens)
        for request in [r for r in self._active if id(r) in gone]:
            self._stop(request)

    def _step(self, lane: Lane) -> None:
        """One decoder call for every row of the lane, then one search step per sentence."""
        model, entries = self.model, lane.entries
        offsets = lane.offsets()
        all_heads = any(e.request.selection is not None for e in entries)
        try:
            started = time.perf_counter()
            log_probs, attention, state, every = model.step_rows(lane.tokens, lane.state, lane.static, all_heads)
            self._observe("decoder", time.perf_counter() - started)
        except Exception as exc:
            event(log, "decoder_failed", level=logging.ERROR, exc_info=True, model=model.name, rows=len(lane.tokens))
            self._lanes.remove(lane)
            for request in {id(e.request): e.request for e in entries}.values():
                self._fail(request, exc)
            return
        if self.metrics:
            self.metrics.batch_requests.labels(*self._labels).observe(len({id(e.request) for e in entries}))
            self.metrics.batch_rows.labels(*self._labels).observe(len(lane.tokens))
        if every is not None:
            attention = attention.copy()
            for j, e in enumerate(entries):
                if e.request.selection is not None:
                    span = slice(offsets[j], offsets[j + 1])
                    attention[span] = model.select(every[span], e.request.selection)
        lane.state = state
        parents = np.arange(len(lane.tokens))
        tokens = lane.tokens.copy()
        groups: dict[int, list[int]] = {}
        for j, e in enumerate(entries):
            groups.setdefault(id(e.request.search), []).append(j)
        for members in groups.values():
            search = entries[members[0]].request.search
            sentences = [entries[j].sentence for j in members]
            if len(members) == len(entries):  # the usual case: one setting for the whole batch, no copies
                parents, tokens = search.advance(sentences, log_probs, attention)
                continue
            rows = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in members])
            group_parents, group_tokens = search.advance(sentences, log_probs[rows], attention[rows])
            parents[rows], tokens[rows] = rows[group_parents], group_tokens
        keep = []
        for j, e in enumerate(entries):
            if e.sentence.done:
                self._finish(e)
            else:
                keep.append(j)
        self._compact(lane, keep, parents, tokens)

    def _compact(self, lane: Lane, keep: list[int], parents: np.ndarray, tokens: np.ndarray) -> None:
        """The lane's next rows: the kept entries' rows, state gathered through the back-pointers; static only
        loses the rows of entries that left (a beam's rows share one encoding, so reordering them needs no copy)."""
        if not keep:
            self._lanes.remove(lane)
            return
        if len(keep) < len(lane.entries):
            rows = _rows([e.sentence.k for e in lane.entries], keep)
            parents, tokens = parents[rows], tokens[rows]
            lane.entries = [lane.entries[j] for j in keep]
            lane.static = {n: v.take(rows, axis=0) for n, v in lane.static.items()}
            self._narrow(lane)
        lane.state = {n: v.take(parents, axis=0) for n, v in lane.state.items()}
        lane.tokens = tokens

    def _narrow(self, lane: Lane) -> None:
        """Cuts the lane's source axes to its longest source: no attention over padding nobody needs."""
        lengths = [e.sentence.src_len for e in lane.entries]
        if not self.model.src_axes or None in lengths:
            return
        width = max(int(n) for n in lengths if n is not None)
        lane.static = {n: v.take(np.arange(width), axis=self.model.src_axes[n])
                       if n in self.model.src_axes and v.shape[self.model.src_axes[n]] > width else v
                       for n, v in lane.static.items()}

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _finish(self, entry: Entry) -> None:
        request = entry.request
        request.results[entry.index] = entry.sentence.best(request.search.nbest)
        request.pending -= 1
        self._release(request, entry)
        if request.pending == 0:
            self._retire(request)
            try:
                request.future.set_result(request.results)
            except InvalidStateError:  # cancelled meanwhile
                pass

    def _release(self, request: Request, entry: Entry) -> None:
        with self._lock:
            self._rows -= entry.sentence.k
            self._tokens -= entry.sentence.k * request.costs[entry.index]

    def _retire(self, request: Request) -> None:
        """``request`` leaves the active set; the rows of its unfinished sentences are given back."""
        with self._lock:
            if request in self._active:
                self._active.remove(request)
                unfinished = [i for i, r in enumerate(request.results) if not r]
                self._rows -= request.search.k * len(unfinished)
                self._tokens -= request.search.k * sum(request.costs[i] for i in unfinished)
                request.pending = 0
                self._gauges()

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
        self._queue.remove(request)
        self._queued_tokens -= sum(request.costs)
        self._gauges()

    def _observe(self, stage: str, seconds: float) -> None:
        if self.metrics:
            self.metrics.compute_time.labels(*self._labels, stage).observe(seconds)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_requests.labels(*self._labels).set(len(self._queue))
            self.metrics.queue_tokens.labels(*self._labels).set(self._queued_tokens)
            self.metrics.active_requests.labels(*self._labels).set(len(self._active))
