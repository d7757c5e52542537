"""The count of calls in flight that max_inflight bounds: one process's, or every front-end's through shared slots."""

from __future__ import annotations

import multiprocessing

from server.inflight import CallsInFlight


def test_front_ends_see_each_others_calls_and_a_restarted_one_starts_at_zero() -> None:
    slots = multiprocessing.get_context("spawn").RawArray("q", 3)
    first, second = CallsInFlight(slots, 0), CallsInFlight(slots, 1)
    first.add(2)
    second.add(1)
    assert first.total() == second.total() == 3 and (first.here, second.here) == (2, 1)
    restarted = CallsInFlight(slots, 0)  # the front-end that held two calls died with them
    assert restarted.total() == second.total() == 1
    second.add(-1)
    assert restarted.total() == 0


def test_one_process_counts_its_own() -> None:
    alone = CallsInFlight()
    alone.add(1)
    assert alone.total() == alone.here == 1
