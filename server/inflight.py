"""The count of Translate/Caption calls being handled, held against ``max_inflight``, the whole server's bound.

In one process it is a plain counter. With front-end processes each one counts its own calls into a slot of an array
in shared memory that the parent created, and admits a call only while the slots add up to less than the bound: each
front-end counting alone let N of them hold N times the bound. A slot has one writer, its front-end, so no lock is
taken (two front-ends admitting at the same instant may pass the bound by one call each, as a soft bound allows), and
a restarted front-end starts its slot at 0: the calls of the one that died are gone with it.
"""

from __future__ import annotations

from typing import Any


class CallsInFlight:
    """This process's calls (:attr:`here`) and, with a shared array, every front-end's (:meth:`total`)."""

    def __init__(self, slots: Any = None, index: int = 0) -> None:
        """``slots``: a ``multiprocessing`` RawArray of one integer per front-end (None: one process); ``index``:
        this front-end's."""
        self.here = 0
        self._slots, self._index = slots, index
        if slots is not None:
            slots[index] = 0
        self._view = _view(slots)

    def __getstate__(self) -> dict[str, Any]:  # the array travels to the spawned front-end; a view cannot
        return {"here": self.here, "_slots": self._slots, "_index": self._index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view = _view(self._slots)

    def total(self) -> int:
        return self.here if self._view is None else sum(self._view)

    def add(self, calls: int) -> None:
        self.here += calls
        if self._view is not None:
            self._view[self._index] = self.here


def _view(slots: Any) -> memoryview | None:
    """The slots as a memoryview of integers: summing it takes a tenth of the time summing the ctypes array takes
    (0.09 against 0.66 µs for 8 slots), and every Translate/Caption call sums it."""
    return None if slots is None else memoryview(slots).cast("B").cast("q")
