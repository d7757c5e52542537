"""Structured log lines: one JSON object (or one ``key=value`` line) per event, with the request id of the call.

Call sites log an event name as the message and the fields as ``extra={"fields": {...}}``; :func:`event` is the
short form. The request id travels in a context variable, so lines logged from worker threads carry it too (the
worker pool runs work inside a copy of the caller's context).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import faulthandler
import functools
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_process = ""  # this process's role in a multi-process server (frontend-1, engine-0): every line names it
_handler: _Handler | None = None  # the handler of the attn loggers and the root logger, once configured
_stderr_fileno = 2  # where log lines are written: the real stderr, which JSON mode's pipe on fd 2 wraps


def event(logger: logging.Logger, name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    handler = _handler
    if level in _LEVEL_NAMES and not exc_info and handler is not None and _only(handler, logger):
        # The line as the handler would write it, without a LogRecord and the logging module's handling of it: a
        # front-end writes one per call (the access-log line), which took 58-59 µs of its loop thread's CPU under
        # load that way and takes 36-38 µs this way (docs/benchmarks.md, "The access-log line").
        try:
            handler.stream.write(handler.line(_fields(time.time(), _LEVEL_NAMES[level], logger.name, name, fields)))
            return
        except Exception:  # a field that does not format: logging's own handling reports it, never the caller
            pass
    logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


# The levels event() writes itself. WARNING and above go through the handler, which writes them at once, with the
# lines gathered before them.
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info"}


def _only(handler: logging.Handler, logger: logging.Logger) -> bool:
    """Whether ``handler`` is the only one a record of ``logger`` would reach, and unfiltered (a test's capture, or
    a handler added later, gets its records the usual way)."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return False
        if node.handlers:
            return node.handlers == [handler] and not handler.filters and handler.level <= logging.DEBUG and (
                not node.propagate or node.parent is None)
        node = node.parent if node.propagate else None
    return False


def _fields(created: float, level: str, logger: str, message: str, fields: dict[str, Any],
            traceback: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": f"{_second(int(created))}.{int((created - int(created)) * 1000):03d}Z",
        "level": level,
        "logger": logger,
        "event": message,
    }
    if _process:
        out["process"] = _process
    rid = request_id.get()
    if rid:
        out["request_id"] = rid
    out.update(fields)
    if traceback:
        out["traceback"] = traceback
    return out


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    traceback = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
    return _fields(record.created, record.levelname.lower(), record.name, record.getMessage(),
                   getattr(record, "fields", {}) or {}, traceback)


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """A line's time to the second: the same for the many lines of one second, so formatted once."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class _LineFormatter(logging.Formatter):
    """A line from a record's fields (:func:`_fields`), which :func:`event` also builds without a record."""

    def format(self, record: logging.LogRecord) -> str:
        return self.line(_record_fields(record))

    def line(self, data: dict[str, Any]) -> str:
        raise NotImplementedError


class JsonFormatter(_LineFormatter):
    def line(self, data: dict[str, Any]) -> str:
        return _ENCODER.encode(data)


class TextFormatter(_LineFormatter):
    def line(self, data: dict[str, Any]) -> str:
        traceback = data.pop("traceback", None)
        head = f"{data.pop('ts')} {data.pop('level'):<7} {data.pop('event')}"
        data.pop("logger")
        line = " ".join([head] + [f"{k}={_text_value(v)}" for k, v in data.items()])
        return f"{line}\n{traceback}" if traceback else line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


def configure(level: str = "INFO", fmt: str = "json", process: str = "") -> None:
    """Route the ``attn`` loggers to stderr, one line per event, and with them every other library's log records and
    Python warnings (a Pillow "Corrupt EXIF data" warning is a log line like any other). In JSON mode, whatever else
    reaches the process's stderr (gRPC's C core writes there directly) is wrapped into JSON lines too, so that
    every line parses. ``process``: a child process's role and number, added to each of its lines (the children
    write to the same stderr, and an access-log line or an error should say which front-end or engine wrote it).
    A fatal signal's stack dump goes to the real stderr too, as plain text. Called by the command line and the child
    processes, never on import."""
    global _stderr_fileno, _process, _handler
    _process = process
    stream = _json_stderr() if fmt == "json" else _LineStream(sys.stderr)
    _stderr_fileno = stream.fileno()
    # Where a line was logged from is in no line: logging's walk up the stack to find it is skipped (the logging
    # HOWTO's "Optimization").
    logging._srcfile = None
    atexit.register(stream.write_pending)  # runs before the JSON pipe's own close: the last lines go out first
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _handler = handler
    logger = logging.getLogger("attn")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # other libraries: their warnings and errors only
    logging.captureWarnings(True)
    # A process that dies on a fatal signal (a crash in a native library: gRPC's core, ONNX Runtime) writes every
    # thread's Python stack to the real stderr first. Plain text: in JSON mode the thread that would wrap it into
    # JSON dies with the process, and fd 2 (its pipe) with it.
    faulthandler.enable(file=stream, all_threads=True)


def stderr_fileno() -> int:
    """The descriptor this process's log lines are written to (after :func:`configure`): what a child process
    should take as its stderr, so that its lines go straight out rather than through this process's pipe."""
    return _stderr_fileno


# The first letter of an absl/gRPC C-core log line ("E0000 00:00:… file.cc:12] message") is its severity.
_NATIVE_LEVEL = re.compile(r"([EWID])\d{4} ")
_NATIVE_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "D": logging.DEBUG}


def _json_stderr() -> _LineStream:
    """Points file descriptor 2 at a pipe whose lines come back as JSON on the real stderr, and returns a stream on
    the real stderr for the log handler. Lines that already are JSON objects pass as they are; any other line (a C
    library's, a stray print) becomes a ``stderr`` event holding it. Child processes are handed the real stderr
    (:func:`stderr_fileno`) and write their lines there themselves."""
    real = _LineStream(os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace"))
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    native = logging.getLogger("attn.stderr")

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                if not text.strip():
                    continue
                if _is_json_object(text):
                    real.write(text + "\n")
                    continue
                found = _NATIVE_LEVEL.match(text)
                level = _NATIVE_LEVELS[found.group(1)] if found else logging.WARNING
                native.log(level, "stderr", extra={"fields": {"line": text}})

    thread = threading.Thread(target=forward, name="attn-stderr", daemon=True)
    thread.start()

    def close() -> None:  # at exit: end the pipe (fd 2 back to the real stderr) and let the last lines through
        sys.stderr.flush()
        os.dup2(real.fileno(), 2)
        thread.join(2.0)

    atexit.register(close)
    return real


class _LineStream:
    """The real stderr for two writers (the log handler, the pipe's reader): whole lines only.

    The real stderr may be a pipe (to whatever started the server, a log collector). If its reader is gone, writes
    fail with EPIPE: the lines are then dropped. Raising would make logging report the error on stderr, that is into
    this process's own pipe, whose reader is the thread that was writing: it would block, holding the handler's lock,
    and with it every thread that logs, so the process could never stop.

    Lines written on an event loop's thread (after :meth:`gather_on`) wait for the loop's next turn and leave together
    in one write: under load a turn ends several calls, and each write is a system call that also hands the
    interpreter lock to whichever thread wants it. The access-log line cost a front-end 0.15 ms of CPU per call, of
    which a third was its own write (docs/benchmarks.md, "The access-log line"). A line at WARNING or above is
    written at once, with those before it (:class:`_Handler`): what a crash leaves unwritten is one turn's INFO
    lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._lock, self._gone = stream, threading.Lock(), False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: list[str] = []

    def gather_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """From now on lines written on ``loop``'s thread (the caller's) are gathered per turn; ``None``: no longer
        (what is gathered is written now)."""
        with self._lock:
            self._loop, self._loop_thread = loop, threading.get_ident()
        if loop is None:
            self.write_pending()

    def write(self, text: str) -> int:
        with self._lock:
            if self._loop is not None and threading.get_ident() == self._loop_thread:
                if not self._pending:
                    try:
                        self._loop.call_soon(self.write_pending)
                    except RuntimeError:  # the loop is closed: write it now
                        return self._write(text)
                self._pending.append(text)
                return len(text)
            return self._write(text)

    def write_pending(self) -> None:
        with self._lock:
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self._write(text)

    def _write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # the reader is gone (or the stream closed)
                self._gone = True
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._gone:
                try:
                    self._stream.flush()
                except (BrokenPipeError, ValueError):
                    self._gone = True

    def fileno(self) -> int:
        return self._stream.fileno()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes a WARNING or worse at once, with the lines gathered before it (:class:`_LineStream`)."""

    stream: _LineStream
    formatter: _LineFormatter

    def line(self, data: dict[str, Any]) -> str:
        """A record's line as :meth:`emit` writes it, from its fields."""
        return self.formatter.line(data) + self.terminator

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.stream.write_pending()


def gather_on(loop: asyncio.AbstractEventLoop | None) -> None:
    """Log lines written on ``loop``'s thread (the caller's) leave once per turn of it (:class:`_LineStream`);
    ``None``: each as it comes again. Called by the server around its event loop; nothing before :func:`configure`."""
    if _handler is not None:
        _handler.stream.gather_on(loop)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
