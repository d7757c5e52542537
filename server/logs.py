"""Structured log lines: one JSON object (or one ``key=value`` line) per event, with the request id of the call.

Call sites log an event name as the message and the fields as ``extra={"fields": {...}}``; :func:`event` is the
short form. The request id travels in a context variable, so lines logged from worker threads carry it too (the
worker pool runs work inside a copy of the caller's context).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def event(logger: logging.Logger, name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    rid = request_id.get()
    if rid:
        out["request_id"] = rid
    out.update(getattr(record, "fields", {}) or {})
    if record.exc_info:
        out["traceback"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record_fields(record), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = _record_fields(record)
        traceback = data.pop("traceback", None)
        head = f"{data.pop('ts')} {data.pop('level'):<7} {data.pop('event')}"
        data.pop("logger")
        line = " ".join([head] + [f"{k}={_text_value(v)}" for k, v in data.items()])
        return f"{line}\n{traceback}" if traceback else line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Route the ``attn`` loggers to stderr, one line per event. Called by the command line, never on import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("attn")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
