"""What a serving process keeps for its whole life, out of the garbage collector's way.

A server process makes its long-lived objects once: the modules it imports, the models' runtimes, tokenizers and
metrics (some 45,000 tracked objects in a front-end, 70,000 in an engine process). Under load a call then allocates
objects that live for milliseconds, and CPython's collector, besides its cheap young collections, starts a full one
every two or three seconds that walks every tracked object again: 17–40 ms each, while the event loop or the
engine's thread waits for the interpreter lock. :func:`settle` collects once and moves what is alive into the
permanent generation (``gc.freeze``), which later collections skip; per-call garbage is collected as before.

It runs wherever the set of models a process holds changes, which is also when that process becomes ready: the
registry's load and each reload that loaded or retired a version (the engine process, or the single process), and a
front-end's views of the engines' models (:mod:`server.ipc.remote_models`). A frozen object is still freed when its
last reference goes (a retired model's runtime, once its engine has drained); only garbage in reference cycles among
frozen objects waits, until the next settle unfreezes them first. docs/benchmarks.md ("The garbage collector") has
the measurements.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collects everything, frozen before or not, then freezes what survives."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
