"""The records front-ends and the engine process exchange: a kind, a small JSON header, and numpy arrays as raw
frames (token ids, images' pixels, attention matrices travel as their bytes, never as per-token Python objects).

A message is the frames ``[kind, header, *arrays]`` (:mod:`server.ipc.framing` puts them on the socket); the
header's ``arrays`` entry lists each array's dtype and shape. JSON rather than pickle: the socket is local and
private, but a record is data, and reading one must never run code.

Front-end → engine: ``hello`` (announces the front-end; the engine answers with ``models``), ``submit`` (one
request: model, version, decoding options, timeout, the items as arrays), ``cancel`` (the caller went away).
Engine → front-end: ``models`` (what is loaded, on which device, whether the engine is ready, and each version's
manifest and tokenizer the first time the connection hears of it), ``done`` (each item's hypotheses; their attention
matrices as arrays), ``failed`` (an error by name and message).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from server import errors
from server.search import Hypothesis

if TYPE_CHECKING:
    from server.runtime import DecoderRuntime

HELLO, SUBMIT, CANCEL = b"hello", b"submit", b"cancel"
MODELS, DONE, FAILED = b"models", b"done", b"failed"

Frames = list[bytes | memoryview]
Key = tuple[str, str]  # (model name, version)

# The errors an engine may report by name; anything else reaches the client as INTERNAL.
_ERRORS: dict[str, type[errors.ServiceError]] = {cls.__name__: cls for cls in (
    errors.InvalidInput, errors.ModelNotFound, errors.Overloaded, errors.NotReady, errors.ShuttingDown,
    errors.DeadlineExceeded, errors.Cancelled, errors.Unimplemented)}


class EngineError(RuntimeError):
    """An unexpected failure inside the engine process (its traceback is in the engine's log)."""


def pack(kind: bytes, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> Frames:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    return [kind, json.dumps(header, separators=(",", ":")).encode(), *(a.data.cast("B") for a in arrays)]


def unpack(frames: Sequence[bytes]) -> tuple[bytes, dict[str, Any], list[np.ndarray]]:
    kind, header = bytes(frames[0]), json.loads(frames[1])
    specs = header.pop("arrays", [])
    if len(specs) != len(frames) - 2:
        raise ValueError(f"{kind!r} record lists {len(specs)} arrays but carries {len(frames) - 2}")
    arrays = [np.frombuffer(frame, dtype=np.dtype(dtype)).reshape(shape)
              for (dtype, shape), frame in zip(specs, frames[2:])]
    return kind, header, arrays


# -- models ------------------------------------------------------------------------------------------------------


def models(state: dict[str, Any], served: Sequence[DecoderRuntime], described: set[Key]) -> Frames:
    """The ``models`` record: ``state`` (readiness, default model, pid, device) and every version served. A version
    not in ``described`` (the versions this connection has heard of; updated here) also carries what a front-end
    builds its view from: the manifest, and the tokenizer's bytes as an array. The front-end never reads the model
    folder, so it tokenizes with what the engine loaded even after the files changed on disk (a version is read
    once) or a front-end was restarted."""
    entries: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    for model in served:
        entry: dict[str, Any] = {"name": model.name, "version": model.version, "directory": str(model.directory),
                                 "variant": model.variant}
        if (model.name, model.version) not in described:
            entry["manifest"] = dataclasses.asdict(model.manifest)
            entry["tokenizer"] = len(arrays)
            arrays.append(np.frombuffer(model.tokenizer.processor.serialized_model_proto(), dtype=np.uint8))
        entries.append(entry)
    described.clear()  # a version retired and loaded again later is sent again
    described.update((m.name, m.version) for m in served)
    return pack(MODELS, {**state, "models": entries}, arrays)


def views(header: dict[str, Any], arrays: list[np.ndarray]) -> dict[Key, tuple[dict[str, Any], bytes]]:
    """The manifests and tokenizers a ``models`` record carries, by version (those the connection had not heard of)."""
    return {(m["name"], m["version"]): (m["manifest"], arrays[m["tokenizer"]].tobytes())
            for m in header["models"] if "manifest" in m}


# -- submit ------------------------------------------------------------------------------------------------------


def submit(request_id: int, model: str, version: str, options: Any, timeout: float | None,
           items: Sequence[np.ndarray]) -> Frames:
    # The options' fields as they are (flat scalars): dataclasses.asdict deep-copies, 8 µs of a 14 µs record.
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    header = {"id": request_id, "model": model, "version": version, "options": fields, "timeout": timeout}
    return pack(SUBMIT, header, items)


# -- done ----------------------------------------------------------------------------------------------------------


def done(request_id: int, found: Sequence[Sequence[Hypothesis]]) -> Frames:
    results = [[{"tokens": [int(t) for t in h.tokens], "log_prob": h.log_prob, "score": h.score,
                 "truncated": h.truncated} for h in hyps] for hyps in found]
    attention = [np.asarray(h.attention, dtype=np.float32) for hyps in found for h in hyps]
    return pack(DONE, {"id": request_id, "results": results}, attention)


def hypotheses(header: dict[str, Any], arrays: list[np.ndarray]) -> list[list[Hypothesis]]:
    rows = iter(arrays)
    return [[Hypothesis(h["tokens"], h["log_prob"], h["score"], next(rows), h["truncated"]) for h in hyps]
            for hyps in header["results"]]


# -- failed --------------------------------------------------------------------------------------------------------


def failed(request_id: int, error: BaseException) -> Frames:
    name = type(error).__name__ if type(error).__name__ in _ERRORS else ""
    message = str(error) if name else f"{type(error).__name__} in the engine"
    return pack(FAILED, {"id": request_id, "error": name, "message": message})


def error_of(header: dict[str, Any]) -> Exception:
    """The exception a ``failed`` record stands for, of the same class as the engine raised where it is one of the
    service errors (so the front-end maps it to the same status code)."""
    cls = _ERRORS.get(header["error"])
    return cls(header["message"]) if cls is not None else EngineError(header["message"])
