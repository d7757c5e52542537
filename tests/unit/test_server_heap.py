"""server.heap: what a serving process keeps is frozen out of the collector's sight, and a later settle still
collects what was frozen and has since become garbage in a reference cycle."""

import gc
import weakref

from server import heap


class _Node:
    pass


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in one of the collector's generations (a frozen object is in none)."""
    return any(o is obj for o in gc.get_objects())


def test_settle_freezes_what_is_alive_and_later_collects_cycles_it_froze() -> None:
    node = _Node()
    node.itself = node  # a reference cycle: only the collector frees it
    gone = weakref.ref(node)
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert not _tracked(node)
        del node
        gc.collect()
        assert gone() is not None  # frozen: no collection looks at it
        heap.settle()
        assert gone() is None  # unfrozen first, then collected
    finally:
        gc.unfreeze()


def test_settle_collects_garbage_before_freezing() -> None:
    node = _Node()
    node.itself = node
    gone = weakref.ref(node)
    del node
    try:
        heap.settle()
        assert gone() is None
    finally:
        gc.unfreeze()
