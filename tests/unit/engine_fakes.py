"""The engine's hooks that every fake model of the engine tests shares: sources are lists of ints, one source
position per int, a fixed step budget from the options, the server's own search; and the wait those tests share
for what an engine's thread does."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.search import Search

BOS, EOS = 0, 1


def wait_until(condition: Callable[[], object], what: str, seconds: float = 6.0) -> None:
    """Returns once ``condition()`` holds; fails the test naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass(frozen=True)
class Options:
    """The decoding options the hooks read, as the server's request options carry them."""

    beam_size: int = 1
    nbest: int = 1
    length_penalty: float = 1.0
    max_steps: int = 12
    banned: tuple[int, ...] = ()


class EngineHooks:
    bos_id, eos_id = BOS, EOS
    src_axes = {"memory": 1, "mask": 1}

    def src_len(self, item: list[int]) -> int:
        return len(item)

    def cost(self, item: list[int]) -> int:
        return len(item)

    def budget_for(self, item: list[int], options: Any) -> int:
        return int(options.max_steps)

    def search_for(self, options: Any) -> Search:
        return Search(options.beam_size, EOS, options.nbest, options.length_penalty, options.banned)

    def selection(self, options: Any) -> None:
        return None
