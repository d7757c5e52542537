"""Structured log lines carry the request id of the call they belong to."""

from __future__ import annotations

import json
import logging

from server import logs


def _record(message: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("attn.rpc", logging.INFO, __file__, 1, message, None, None)
    record.fields = fields
    return record


def test_json_lines_with_request_id() -> None:
    token = logs.request_id.set("abc")
    try:
        line = logs.JsonFormatter().format(_record("rpc", rpc="Translate", code="OK"))
    finally:
        logs.request_id.reset(token)
    data = json.loads(line)
    assert (data["event"], data["request_id"], data["rpc"], data["code"], data["level"]) == (
        "rpc", "abc", "Translate", "OK", "info")


def test_text_lines() -> None:
    line = logs.TextFormatter().format(_record("listening", port=50051, host="0.0.0.0", note="two words"))
    assert line.endswith('info    listening port=50051 host=0.0.0.0 note="two words"')
