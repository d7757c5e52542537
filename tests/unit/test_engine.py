"""The serving engine over a fake numpy model: iteration-level joins, the queue's limits, deadlines, cancellation.

The fake's step can be gated, so a test decides how many steps run before the next request arrives; no timing
asserts, only waits with generous bounds.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import CancelledError
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.device import CPU, Device
from server.engine import Engine, Limits
from server.engine.lanes import Lane
from server.errors import DeadlineExceeded, InvalidInput, Overloaded
from server.metrics import Metrics
from server.reductions import Reduction
from server.search import Hypothesis, State, run_search
from tests.unit.engine_fakes import EngineHooks, Options, wait_until

BOS, EOS, VOCAB, HIDDEN = 0, 1, 9, 6


class FakeModel(EngineHooks):
    """A recurrent decoder with masked dot-product attention, shaped like an exported step graph: a source is a
    list of ints, its memory rows come from a fixed table, so an item's encoding is the same in any batch."""

    name, version = "fake", "1"

    def __init__(self, growing_state: bool = False, endless: bool = False) -> None:
        rng = np.random.default_rng(7)
        self.table = rng.normal(size=(50, HIDDEN))
        self.embed = rng.normal(size=(VOCAB, HIDDEN))
        self.recur = rng.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)
        self.out = rng.normal(size=(2 * HIDDEN, VOCAB)) * 1.5
        self.growing_state, self.endless = growing_state, endless
        self.gate: threading.Semaphore | None = None  # when set, every step takes one permit
        self.steps: list[int] = []  # rows of every step call
        self.encoded: list[int] = []  # items of every encoder call
        self.memory: list[tuple[int, tuple[int, ...]]] = []  # where each step's static memory was, and its shape

    def encode(self, items: list[list[int]]) -> tuple[State, State]:
        self.encoded.append(len(items))
        width = max(len(i) for i in items)
        memory = np.zeros((len(items), width, HIDDEN))
        mask = np.zeros((len(items), width), dtype=bool)
        for row, item in enumerate(items):
            memory[row, : len(item)] = self.table[item]
            mask[row, : len(item)] = True
        h = np.stack([self.table[item].mean(0) for item in items])
        state = {"h": h, "t": np.zeros((len(items), 0, 1))} if self.growing_state else {"h": h}
        return state, {"memory": memory, "mask": mask}

    def step(self, tokens: np.ndarray, state: State, static: State) -> tuple[np.ndarray, np.ndarray, State]:
        h = np.tanh(state["h"] @ self.recur + self.embed[tokens])
        scores = np.where(static["mask"], np.einsum("rh,rsh->rs", h, static["memory"]), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("rs,rsh->rh", weights, static["memory"])
        logits = np.concatenate([h, context], -1) @ self.out
        if self.endless:
            logits[:, EOS] = -1e9
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        new_state = {"h": h}
        if self.growing_state:  # a cache that grows by one position per step, like a Transformer's
            new_state["t"] = np.concatenate([state["t"], np.ones((len(tokens), 1, 1))], axis=1)
        return log_probs.astype(np.float32), weights.astype(np.float32), new_state

    def step_rows(self, tokens: np.ndarray, state: State, static: State, all_heads: bool) -> Any:
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never released this step"
        self.steps.append(len(tokens))
        self.memory.append((static["memory"].__array_interface__["data"][0], static["memory"].shape))
        if self.growing_state:  # rows at different steps must never share a call
            assert len({state["t"].shape[1]}) == 1
        return (*self.step(tokens, state, static), None)

    def alone(self, item: list[int], options: Options) -> list[Hypothesis]:
        """What the item decodes to by itself, without any engine."""
        state, static = self.encode([item])
        self.encoded.pop()
        [hyps] = run_search(self.step, state, static, self.search_for(options), bos=BOS,
                            max_steps=[options.max_steps], src_lens=[len(item)])
        return hyps


@pytest.fixture()
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def start(engines: list[Engine], model: FakeModel, **limits: int) -> Engine:
    engine = Engine(model, Limits(**limits))  # type: ignore[arg-type]
    engines.append(engine)
    return engine


def same(found: list[Hypothesis], expected: list[Hypothesis]) -> None:
    assert [h.tokens for h in found] == [h.tokens for h in expected]
    for f, e in zip(found, expected):
        assert f.log_prob == pytest.approx(e.log_prob, abs=1e-5)
        np.testing.assert_allclose(f.attention, e.attention, atol=1e-6)


SOURCES = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]


@pytest.mark.parametrize("growing_state", [False, True])
@pytest.mark.parametrize("beam", [1, 3])
def test_a_request_joining_mid_flight_gets_what_it_gets_alone(engines: list[Engine], growing_state: bool,
                                                              beam: int) -> None:
    model = FakeModel(growing_state)
    model.gate = threading.Semaphore(0)
    engine = start(engines, model)
    options = Options(beam_size=beam, nbest=beam)
    first = engine.submit(SOURCES[:2], Options(beam_size=1, max_steps=30))
    model.gate.release(3)
    wait_until(lambda: len(model.steps) == 3, "three steps of the first request")
    second = engine.submit(SOURCES[2:], options)  # joins at the next step boundary
    model.gate.release(10_000)
    found = second.result(timeout=30)
    first.result(timeout=30)
    for item, hyps in zip(SOURCES[2:], found):
        same(hyps, model.alone(item, options))
    if growing_state:  # a lane of its own: no call ever held rows of both requests
        assert max(model.steps) <= max(2, 2 * beam)
    else:  # iteration-level batching: the steps after the join held both requests' rows
        assert max(model.steps) == 2 + 2 * beam


def test_requests_of_different_settings_share_steps_and_keep_their_outputs(engines: list[Engine]) -> None:
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model)
    settings = [Options(), Options(beam_size=2, nbest=2), Options(beam_size=4, length_penalty=0.0), Options()]
    futures = [engine.submit([item], options) for item, options in zip(SOURCES, settings)]
    model.gate.release(10_000)
    for item, options, future in zip(SOURCES, settings, futures):
        [hyps] = future.result(timeout=30)
        same(hyps, model.alone(item, options))
    assert model.encoded[0] == 4  # admitted together: one encoder call
    assert model.steps[0] == 1 + 2 + 4 + 1


def test_full_queue_is_refused_at_once_naming_the_limit(engines: list[Engine]) -> None:
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_queue_requests=1, max_queue_tokens=8, max_batch_requests=1)
    running = engine.submit([SOURCES[0]], Options())
    wait_until(lambda: engine.active == 1, "the first request's admission")
    waiting = engine.submit([SOURCES[2]], Options())
    with pytest.raises(Overloaded, match="max_queue_requests"):
        engine.submit([SOURCES[2]], Options())
    model.gate.release(10_000)
    running.result(timeout=30), waiting.result(timeout=30)


def test_a_request_over_the_queues_tokens_is_refused_by_tokens_waiting_or_as_invalid_alone(
        engines: list[Engine]) -> None:
    """Over max_queue_tokens with what waits: RESOURCE_EXHAUSTED, retry later. Over it alone: no retry could pass,
    so it is invalid (a client such as attn batch retries RESOURCE_EXHAUSTED, and stopped its whole job on it)."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_queue_requests=4, max_queue_tokens=8, max_batch_requests=1)
    running = engine.submit([SOURCES[0]], Options())
    wait_until(lambda: engine.active == 1, "admission")
    waiting = engine.submit([SOURCES[1]], Options())  # 7 of the 8 tokens
    with pytest.raises(Overloaded, match="max_queue_tokens"):
        engine.submit([SOURCES[2]], Options())  # 2 more
    with pytest.raises(InvalidInput, match=r"9 source tokens .* \(max_queue_tokens 8\)"):
        engine.submit([[1] * 4, [1] * 5], Options())  # 9 source tokens, the limit is 8
    model.gate.release(10_000)
    running.result(timeout=30), waiting.result(timeout=30)
    with pytest.raises(InvalidInput, match="max_queue_tokens"):  # an empty queue does not take it either
        engine.submit([[1] * 9], Options())
    assert engine.submit([[1] * 8], Options()).result(timeout=30)


def test_admission_respects_the_row_budget_and_takes_the_oldest_first(engines: list[Engine]) -> None:
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_rows=4)
    first = engine.submit([SOURCES[0]], Options(beam_size=4))
    wait_until(lambda: engine.active == 1, "admission")
    later = [engine.submit([item], Options()) for item in SOURCES[1:]]
    assert engine.queued == 3  # four rows are in use: nothing more fits until the beam is done
    model.gate.release(10_000)
    first.result(timeout=30)
    for future in later:
        future.result(timeout=30)
    assert max(model.steps) <= 4


def test_deadline_expires_in_the_queue(engines: list[Engine]) -> None:
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_requests=1)
    running = engine.submit([SOURCES[0]], Options())
    wait_until(lambda: engine.active == 1, "admission")
    expiring = engine.submit([SOURCES[1]], Options(), timeout=0.05)
    time.sleep(0.1)
    model.gate.release(10_000)
    running.result(timeout=30)
    with pytest.raises(DeadlineExceeded):
        expiring.result(timeout=30)
    assert model.encoded == [1]  # the expired request was never encoded


def test_deadline_expires_mid_decode_and_the_request_leaves_the_batch(engines: list[Engine]) -> None:
    model = FakeModel(endless=True)
    engine = start(engines, model)
    options = Options(max_steps=10**6)
    expiring = engine.submit([SOURCES[0]], options, timeout=0.2)
    with pytest.raises(DeadlineExceeded):
        expiring.result(timeout=30)
    wait_until(lambda: engine.active == 0, "the expired request to leave")
    steps = len(model.steps)
    time.sleep(0.05)
    assert len(model.steps) == steps  # nothing decodes any more


def test_cancellation_frees_the_slot_for_the_next_request(engines: list[Engine]) -> None:
    model = FakeModel(endless=True)
    engine = start(engines, model, max_batch_requests=1)
    endless = engine.submit([SOURCES[0]], Options(max_steps=10**6))
    wait_until(lambda: len(model.steps) > 3, "the endless request to decode")
    model.endless = False
    waiting = engine.submit([SOURCES[1]], Options())
    assert engine.queued == 1  # batching off: it waits for the slot
    assert endless.cancel()
    [hyps] = waiting.result(timeout=30)
    same(hyps, model.alone(SOURCES[1], Options()))
    with pytest.raises(CancelledError):
        endless.result()
    wait_until(lambda: engine.active == 0, "the engine to be idle")


@pytest.mark.parametrize("rows", [256, 2])  # 2: parts of one item, whose future and its parts' hold each other one way
def test_a_finished_request_is_freed_without_the_garbage_collector(engines: list[Engine], rows: int) -> None:
    """Nothing the engine keeps (the deadline heap, the cancel callback) holds a finished request strongly or in a
    reference cycle: once the caller drops its future, reference counting frees it, with the collector off."""
    engine = start(engines, FakeModel(), max_batch_rows=rows)
    gc.disable()
    try:
        future = engine.submit([SOURCES[0], SOURCES[1], SOURCES[2]], Options(), timeout=60)
        future.result(timeout=30)
        freed = weakref.ref(future)
        del future
        wait_until(lambda: freed() is None, "the finished request to be freed")
    finally:
        gc.enable()


@pytest.mark.parametrize("rows", [256, 2])  # 2: the request decodes in two parts, one encoder call each
def test_the_engines_histograms_are_written_before_the_answer_that_leaves_it_idle(engines: list[Engine],
                                                                                  rows: int) -> None:
    # The engine tallies its histograms and writes them a few times a second; a caller that reads /metrics after its
    # answer (the engine then has nothing left to decode) sees its wait, its encoder calls and its steps. A request
    # in parts waited once, its parts' waits together: one observation, as every request has.
    registry = CollectorRegistry()
    model = FakeModel()
    engine = Engine(model, Limits(max_batch_rows=rows), Metrics(registry))  # type: ignore[arg-type]
    engines.append(engine)
    labels = {"model": "fake", "version": "1"}
    parts = 1 if rows > 2 else 2
    for answered in range(1, 4):
        engine.submit([SOURCES[0], SOURCES[1]], Options()).result(timeout=30)
        assert registry.get_sample_value("attn_queue_duration_seconds_count", labels) == answered
        assert registry.get_sample_value("attn_compute_duration_seconds_count", {**labels, "stage": "encoder"}) == (
            answered * parts)
        assert registry.get_sample_value("attn_batch_hypotheses_sum", labels) == sum(model.steps)


def test_close_fails_what_is_left(engines: list[Engine]) -> None:
    model = FakeModel(endless=True)
    engine = Engine(model, Limits())  # type: ignore[arg-type]
    future = engine.submit([SOURCES[0]], Options(max_steps=10**6))
    wait_until(lambda: len(model.steps) > 0, "decoding")
    engine.close()
    with pytest.raises(Exception, match="shutting down"):
        future.result(timeout=30)


class BookkeepingBug(Exception):
    pass


def failing_advance(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Makes the lanes' bookkeeping after a decoder call raise ``times`` times (a bug in the engine's own code, not
    the model's); the list counts the failures."""
    advance, failed = Lane.advance, []

    def advance_or_fail(lane: Lane, outputs: Any) -> Any:
        if len(failed) < times:
            failed.append(1)
            raise BookkeepingBug("a bug between two decoder calls")
        return advance(lane, outputs)

    monkeypatch.setattr(Lane, "advance", advance_or_fail)
    return failed


def test_a_failure_in_the_engines_bookkeeping_fails_what_it_decodes_and_the_engine_goes_on(
        engines: list[Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the exception ended the engine's thread: every request in flight or queued waited for ever."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_requests=1, max_batch_rows=4)
    failed = failing_advance(monkeypatch, times=1)
    decoding = engine.submit([SOURCES[0]], Options())
    wait_until(lambda: engine.active == 1, "admission")
    waiting = engine.submit([SOURCES[1]], Options())
    model.gate.release(10_000)
    with pytest.raises(BookkeepingBug):
        decoding.result(timeout=30)
    [hyps] = waiting.result(timeout=30)  # the queue was kept, and its request decodes as it would alone
    same(hyps, model.alone(SOURCES[1], Options()))
    assert failed == [1]
    # The rows of the failed request were given back: a request of the whole row budget is admitted.
    whole = engine.submit([SOURCES[2]], Options(beam_size=4))
    [hyps] = whole.result(timeout=30)
    same(hyps, model.alone(SOURCES[2], Options(beam_size=4)))
    assert engine.active == 0 and engine.queued == 0


def test_a_failure_that_repeats_fails_the_queue_too_and_nothing_waits_for_ever(
        engines: list[Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_requests=1)
    failed = failing_advance(monkeypatch, times=10**6)
    futures = [engine.submit([source], Options()) for source in SOURCES]
    wait_until(lambda: engine.active == 1, "admission")
    model.gate.release(10_000)
    for future in futures:
        with pytest.raises(BookkeepingBug):
            future.result(timeout=30)
    assert len(failed) == 2  # the first turn failed the request it decoded, the second the next one and the queue
    wait_until(lambda: engine.active == 0 and engine.queued == 0, "the engine to hold nothing")
    monkeypatch.undo()
    [hyps] = engine.submit([SOURCES[3]], Options()).result(timeout=30)
    same(hyps, model.alone(SOURCES[3], Options()))


def test_a_source_longer_than_the_buckets_decodes_in_a_lane_of_its_own(engines: list[Engine]) -> None:
    """A 70-token source does not pad the 3-token ones: separate lanes (separate calls), same outputs as alone."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model)
    long = [(7 * i) % 50 for i in range(70)]
    items = [SOURCES[0], long, SOURCES[2]]
    future = engine.submit(items, Options(beam_size=2, nbest=2))
    model.gate.release(10_000)
    found = future.result(timeout=30)
    for item, hyps in zip(items, found):
        same(hyps, model.alone(item, Options(beam_size=2, nbest=2)))
    assert model.encoded == [3]  # one encoder call for the request
    assert model.steps[:2] == [4, 2]  # the two short sources together, the long one in a lane of its own


@pytest.mark.parametrize("busy", [False, True])
def test_sources_share_one_lane_under_light_load_and_split_by_length_under_heavy(engines: list[Engine],
                                                                                  busy: bool) -> None:
    """Up to ``mixed_lane_rows`` rows, sources of up to LENGTH_BUCKETS[-1] tokens decode in one call per step (a
    call's fixed cost outweighs the padding); above it, by length. The outputs are those of each source alone."""
    from server.engine import LENGTH_BUCKETS

    model = FakeModel()
    model.gate = threading.Semaphore(0)
    beam = 3  # two sentences of 3 rows each
    engine = start(engines, model, mixed_lane_rows=2 * beam - 1 if busy else 2 * beam)
    longer = [(7 * i) % 50 for i in range(LENGTH_BUCKETS[-1])]  # the last bucket's bound: in another bucket
    options = Options(beam_size=beam, nbest=1)
    future = engine.submit([SOURCES[0], longer], options)
    model.gate.release(10_000)
    found = future.result(timeout=60)
    for item, hyps in zip([SOURCES[0], longer], found):
        same(hyps, model.alone(item, options))
    assert model.steps[:2] == ([beam, beam] if busy else [2 * beam, 2 * beam])


def test_distinct_length_penalties_do_not_grow_the_engine(engines: list[Engine]) -> None:
    """A client may send a new float length penalty with every call: the engine keeps only the recent settings,
    and its memory stays flat over 100,000 distinct values."""
    import tracemalloc

    from server.engine import SEARCHES_KEPT

    model = FakeModel()
    engine = start(engines, model)
    [hyps] = engine.submit([SOURCES[0]], Options(length_penalty=0.5)).result(timeout=30)
    same(hyps, model.alone(SOURCES[0], Options(length_penalty=0.5)))
    tracemalloc.start()
    try:
        for i in range(10_000):
            engine._search_for(Options(length_penalty=i / 100_000))
        settled, _ = tracemalloc.get_traced_memory()
        for i in range(10_000, 100_000):
            engine._search_for(Options(length_penalty=i / 100_000))
        grown = tracemalloc.get_traced_memory()[0] - settled
    finally:
        tracemalloc.stop()
    assert len(engine._searches) <= SEARCHES_KEPT
    assert grown < 256 * 1024, f"{grown} bytes more after 90,000 more distinct settings"
    # Recent settings are still shared, so their requests advance together.
    assert engine._search_for(Options(length_penalty=0.25)) is engine._search_for(Options(length_penalty=0.25))


class ReducingModel(FakeModel):
    """The fake whose step reduces its log-probabilities with the graph on the CPU provider (as a bound runtime does
    on its device), instead of leaving it to the engine's host path."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = Reduction(Device("cpu", [CPU], "test"), host_greedy=False)
        self.widths: list[int] = []

    def step_reduced(self, tokens: np.ndarray, state: State, static: State, all_heads: bool, width: int,
                     banned: list[int]) -> Any:
        log_probs, attention, new_state, every = self.step_rows(tokens, state, static, all_heads)
        self.widths.append(width)
        return self.reduction(log_probs, width, banned, EOS), attention, new_state, every


MIXED = [Options(banned=(2, 5)), Options(beam_size=3, nbest=2, banned=(2, 5), max_steps=4),
         Options(beam_size=2, banned=(2, 5), length_penalty=0.5, max_steps=5), Options(banned=(2, 5), max_steps=3)]


def test_device_reductions_give_what_the_host_path_gives(engines: list[Engine]) -> None:
    """Greedy and beams in one lane, banned ids, budgets short enough for the last step's EOS rule."""
    requests = [(SOURCES[i % 4 : i % 4 + 2], MIXED[i % 4]) for i in range(8)]
    results = []
    for model in (FakeModel(), ReducingModel()):
        model.gate = threading.Semaphore(0)
        engine = start(engines, model)
        futures = [engine.submit(items, options) for items, options in requests]
        model.gate.release(10_000)
        results.append([f.result(timeout=30) for f in futures])
    assert max(model.widths) == 6  # the best 2k of each row for the widest beam (k = 3)
    host, device = results
    assert any(h.truncated for found in host for hyps in found for h in hyps)
    for (items, options), found_host, found_device in zip(requests, host, device):
        for item, a, b in zip(items, found_host, found_device):
            assert [h.tokens for h in a] == [h.tokens for h in b]
            for h, w in zip(a, b):
                assert h.log_prob == pytest.approx(w.log_prob, abs=1e-6) and h.truncated == w.truncated
                np.testing.assert_array_equal(h.attention, w.attention)
                assert not {2, 5} & set(h.tokens)
            same(a, model.alone(item, options))


def test_rows_leaving_do_not_move_the_static_inputs(engines: list[Engine]) -> None:
    """Sentences finish at different steps: the static inputs stay where they are (the last rows move into the
    places of those that left), the steps run on fewer rows of the same buffer."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model)
    budgets = [2, 9, 4, 6, 3, 12]
    futures = [engine.submit([SOURCES[i % 4]], Options(max_steps=b)) for i, b in enumerate(budgets)]
    model.gate.release(10_000)
    for i, future in enumerate(futures):
        [hyps] = future.result(timeout=30)
        same(hyps, model.alone(SOURCES[i % 4], Options(max_steps=budgets[i])))
    assert model.encoded == [6]
    assert len({address for address, _ in model.memory}) == 1  # one buffer, never copied
    assert sorted({shape[0] for _, shape in model.memory}, reverse=True)[:2] == [6, 5]


def test_many_requests_joining_and_leaving_get_what_they_get_alone(engines: list[Engine]) -> None:
    """Waves of requests of every setting and of lengths in every bucket: slots are freed and reused, the lanes
    grow, widen and compact, requests of one setting share their search; each result is what the item gets alone."""
    rng = np.random.default_rng(11)
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_rows=24)
    settings = [Options(max_steps=8), Options(beam_size=2, nbest=2, max_steps=7), Options(beam_size=3, max_steps=5),
                Options(length_penalty=0.3, max_steps=10), Options(beam_size=2, length_penalty=0.0, max_steps=6)]
    submitted = []
    for _wave in range(4):
        for _ in range(8):
            length = int(rng.choice([2, 5, 14, 20, 40, 70]))
            items = [[int(t) for t in rng.integers(2, 50, size=length)] for _ in range(int(rng.integers(1, 3)))]
            options = settings[int(rng.integers(len(settings)))]
            submitted.append((items, options, engine.submit(items, options)))
        model.gate.release(int(rng.integers(2, 6)))
    model.gate.release(10_000)
    for items, options, future in submitted:
        for item, hyps in zip(items, future.result(timeout=60)):
            same(hyps, model.alone(item, options))
    wait_until(lambda: engine.active == 0, "the engine to be idle")
    assert not engine._lanes and engine._rows == 0 and engine._tokens == 0


def cancelling(engines: list[Engine], cancel: bool) -> list[int]:
    """Two requests share a lane with an endless one (EOS banned), cancelled after three steps if ``cancel``; the
    rows of every step until the two are done, which get what they get alone."""
    shared = [(SOURCES[:2], Options(beam_size=2, nbest=2, max_steps=20)), ([SOURCES[3]], Options(beam_size=3))]
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model)
    futures = [engine.submit(items, options) for items, options in shared]
    doomed = engine.submit([SOURCES[2], SOURCES[3]], Options(banned=(EOS,), max_steps=10**6))
    model.gate.release(3)
    wait_until(lambda: len(model.steps) == 3, "three steps")
    if cancel:
        assert doomed.cancel()
    model.gate.release(10_000)
    for (items, options), future in zip(shared, futures):
        for item, hyps in zip(items, future.result(timeout=30)):
            same(hyps, model.alone(item, options))
    if cancel:
        with pytest.raises(CancelledError):
            doomed.result(timeout=30)
        wait_until(lambda: engine.active == 0, "the engine to be idle")
    engine.close()
    return model.steps


def test_a_request_cancelled_mid_flight_leaves_its_lane_to_the_others(engines: list[Engine]) -> None:
    """From the step boundary after the cancellation on, each step holds exactly its two rows fewer."""
    uncancelled, cancelled = cancelling(engines, False), cancelling(engines, True)
    assert cancelled[:3] == uncancelled[:3] and len(cancelled) > 5
    assert cancelled[4:] == [rows - 2 for rows in uncancelled[4 : len(cancelled)]]


class NoEndModel(FakeModel):
    """A decoder that gives end-of-sentence no probability at all (-inf): no hypothesis can end before its budget,
    where EOS is forced."""

    def step(self, tokens: np.ndarray, state: State, static: State) -> tuple[np.ndarray, np.ndarray, State]:
        log_probs, weights, new_state = super().step(tokens, state, static)
        log_probs[:, EOS] = -np.inf
        return log_probs, weights, new_state


def test_a_sentence_whose_model_never_ends_gives_its_rows_back_once(engines: list[Engine]) -> None:
    engine = start(engines, NoEndModel())
    found = engine.submit([SOURCES[0], SOURCES[2]], Options(beam_size=2, nbest=2, max_steps=4)).result(timeout=30)
    assert len(found) == 2
    assert engine._rows == 0 and engine._tokens == 0  # given back before the answer: no wait needed


@pytest.mark.parametrize("beam", [1, 4])
def test_a_sentence_whose_model_never_ends_gets_its_best_live_hypotheses_at_the_budget(engines: list[Engine],
                                                                                      beam: int) -> None:
    """Beam search ended such a sentence with no hypotheses at all; now, as greedy search, with its live ones of
    budget length, EOS forced and flagged truncated, each with its own attention rows."""
    model = NoEndModel()
    engine = start(engines, model)
    options = Options(beam_size=beam, nbest=beam, max_steps=5)
    found = engine.submit([SOURCES[0], SOURCES[2]], options).result(timeout=30)
    for source, hyps in zip([SOURCES[0], SOURCES[2]], found):
        assert len(hyps) == beam
        for hyp in hyps:
            assert len(hyp.tokens) == 5 and hyp.tokens[-1] == EOS and EOS not in hyp.tokens[:-1] and hyp.truncated
            assert hyp.attention.shape == (5, len(source))
            assert hyp.log_prob == -np.inf  # EOS's own log-probability, as greedy search adds it at the budget
        same(hyps, model.alone(source, options))
    assert engine._rows == 0 and engine._tokens == 0


@pytest.mark.parametrize("growing_state", [False, True])
def test_a_request_over_half_the_row_budget_decodes_in_parts_and_gets_what_it_gets_alone(
        engines: list[Engine], growing_state: bool) -> None:
    model = FakeModel(growing_state=growing_state)
    engine = start(engines, model, max_batch_rows=8)
    options = Options(beam_size=3, nbest=2)
    items = [*SOURCES, SOURCES[0][::-1], SOURCES[3][:2]]  # 6 items × 3 rows: 18 rows, parts of one item
    found = engine.submit(items, options).result(timeout=30)
    assert len(found) == len(items)
    for hyps, item in zip(found, items):
        same(hyps, model.alone(item, options))
    assert max(model.steps) <= 8 and len(model.encoded) == len(items)


def test_a_call_after_a_request_over_the_row_budget_is_not_held_until_that_one_ends(engines: list[Engine]) -> None:
    """Whole, 16 rows under a budget of 8 ran alone and the greedy call behind it waited for all of it; in parts of
    at most 4 rows (half the budget) it is admitted beside them and ends first."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_rows=8)
    ended: list[str] = []
    large = engine.submit([SOURCES[0], SOURCES[1], SOURCES[2], SOURCES[3]], Options(beam_size=4, max_steps=12))
    large.add_done_callback(lambda _: ended.append("large"))
    wait_until(lambda: engine.active == 1, "the first part's admission")
    small = engine.submit([SOURCES[2]], Options(max_steps=2))
    small.add_done_callback(lambda _: ended.append("small"))
    model.gate.release(10_000)
    small.result(timeout=30), large.result(timeout=30)
    assert ended == ["small", "large"]
    assert max(model.steps) <= 8


def test_a_request_in_parts_fails_or_is_cancelled_whole(engines: list[Engine]) -> None:
    """Its deadline or its cancellation ends every part, queued, decoding or not queued yet, and the engine idles."""
    model = FakeModel(endless=True)
    engine = start(engines, model, max_batch_rows=2)
    options = Options(max_steps=10**6)
    expiring = engine.submit([SOURCES[0], SOURCES[1], SOURCES[2]], options, timeout=0.2)  # parts of one item
    with pytest.raises(DeadlineExceeded):
        expiring.result(timeout=30)
    wait_until(lambda: engine.active == 0 and engine.queued == 0, "every part to leave")
    cancelled = engine.submit([SOURCES[0], SOURCES[1], SOURCES[2]], options)
    wait_until(lambda: len(model.steps) > 3, "the first part to decode")
    assert cancelled.cancel()
    wait_until(lambda: engine.active == 0 and engine.queued == 0, "every part to leave")
    steps = len(model.steps)
    time.sleep(0.05)
    assert len(model.steps) == steps  # nothing decodes any more


def test_the_later_parts_of_a_request_count_against_the_queues_tokens_until_they_leave(engines: list[Engine]) -> None:
    """A request queued in parts waits whole: its parts not queued yet count against max_queue_tokens (only the first
    did, so the queue took a call that put it past its limit), and a cancelled request gives every token back."""
    model = FakeModel(endless=True)
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_rows=2, max_queue_tokens=20)
    options = Options(max_steps=10**6)
    engine.submit([SOURCES[0]], Options(beam_size=2, max_steps=10**6))  # decoding, every row taken
    wait_until(lambda: engine.active == 1, "the first call's admission")
    try:
        parts = engine.submit([SOURCES[1], SOURCES[3], SOURCES[2]], options)  # 7 + 5 + 2 tokens, parts of one item
        with pytest.raises(Overloaded, match="holds 14 source tokens"):
            engine.submit([SOURCES[1]], options)  # 7 more: 21 would wait
        assert parts.cancel()
        model.gate.release(1)  # a step boundary, where the cancellation is handled
        wait_until(lambda: engine.queued == 0 and engine._queued_tokens == 0, "every part to give its tokens back")
    finally:
        model.gate.release(10_000)


def test_with_batching_off_a_request_over_half_the_row_budget_decodes_whole(engines: list[Engine]) -> None:
    """Batching off decodes one request at a time (the comparison the benchmarks make): nothing is admitted beside a
    part, so parts only made the request decode a part at a time, with calls taking turns between them."""
    model = FakeModel()
    engine = start(engines, model, max_batch_rows=8, max_batch_requests=1)
    options = Options(beam_size=4)
    items = [SOURCES[0], SOURCES[1], SOURCES[2], SOURCES[3]]
    found = engine.submit(items, options).result(timeout=30)
    for hyps, item in zip(found, items):
        same(hyps, model.alone(item, options))
    assert model.encoded == [len(items)] and model.steps[0] == 4 * len(items)


def test_a_request_in_parts_is_one_call_in_the_queue_and_in_the_batch(engines: list[Engine]) -> None:
    """One part at a time: its later parts neither fill the queue (max_queue_requests of 1 takes the next call) nor
    count as more requests decoding."""
    model = FakeModel()
    model.gate = threading.Semaphore(0)
    engine = start(engines, model, max_batch_rows=8, max_queue_requests=1)
    try:
        large = engine.submit([SOURCES[0], SOURCES[1], SOURCES[2], SOURCES[3]], Options(beam_size=4))  # 4 parts
        wait_until(lambda: engine.active == 1, "the first part's admission")
        assert engine.queued == 0
        small = engine.submit([SOURCES[2]], Options())  # the queue holds no part of the large call: it is taken
    finally:
        model.gate.release(10_000)
    small.result(timeout=30), large.result(timeout=30)
    wait_until(lambda: (engine.active, engine.queued) == (0, 0), "the engine to be idle")
