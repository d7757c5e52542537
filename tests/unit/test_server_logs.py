"""Structured log lines carry the request id of the call they belong to."""

from __future__ import annotations

import json
import logging

import pytest

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


def test_a_child_process_names_itself_in_every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Front-ends and the engine write to one stderr: each line says which process wrote it."""
    monkeypatch.setattr(logs, "_process", "frontend-1")
    data = json.loads(logs.JsonFormatter().format(_record("rpc", rpc="Translate")))
    assert (data["event"], data["process"], data["rpc"]) == ("rpc", "frontend-1", "Translate")
    assert logs.TextFormatter().format(_record("rpc", rpc="Translate")).endswith("rpc process=frontend-1 rpc=Translate")
    monkeypatch.setattr(logs, "_process", "")  # one process: nothing to tell apart
    assert "process" not in json.loads(logs.JsonFormatter().format(_record("rpc")))


def test_json_mode_makes_every_stderr_line_json() -> None:
    """A Python warning (Pillow's "Corrupt EXIF data"), another library's log record, a stray print and a line that
    a C library writes straight to file descriptor 2 (as gRPC's core does) all come out as JSON lines."""
    import subprocess
    import sys

    script = """
import logging, os, sys, warnings
from server import logs
logs.configure("INFO", "json")
logs.event(logging.getLogger("attn.server"), "listening", port=1)
warnings.warn("Corrupt EXIF data", UserWarning)
logging.getLogger("PIL.TiffImagePlugin").warning("tag %d is odd", 7)
print("a stray print", file=sys.stderr)
os.write(2, b"E0000 00:00:1700000000.1  42 chttp2_server.cc:1] raw C-core line\\n")
os.write(2, b'{"event": "from a child", "level": "info"}\\n')
os.write(2, b''.join(b'{"ts": "t", "event": "burst", "n": %d}\\n' % i for i in range(300)))
os.write(2, b'{"ts": "t", "event": "cut short"')  # no newline, and not JSON: wrapped at exit
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is JSON
    assert all(isinstance(p, dict) for p in parsed)
    text = "\n".join(lines)
    for expected in ("listening", "Corrupt EXIF data", "tag 7 is odd", "a stray print", "raw C-core line",
                     "from a child"):
        assert expected in text, f"{expected!r} missing from {text}"
    assert [p["n"] for p in parsed if p.get("event") == "burst"] == list(range(300))  # passed whole, in order
    assert '{"ts": "t", "event": "burst", "n": 7}' in lines
    assert any(p.get("line") == '{"ts": "t", "event": "cut short"' for p in parsed)
    native = next(p for p in parsed if "raw C-core line" in p.get("line", ""))
    assert native["level"] == "error"


def test_a_crash_leaves_every_threads_stack_on_the_real_stderr() -> None:
    """A fatal signal in JSON mode: the stacks reach the process's real stderr (plain text), though the thread that
    wraps fd 2's lines into JSON dies with the process; the lines logged before it are whole JSON lines."""
    import subprocess
    import sys

    script = """
import logging, os, signal, threading
from server import logs
logs.configure("INFO", "json")
logs.event(logging.getLogger("attn.server"), "listening", port=1)
def engine_loop():
    threading.Event().wait()
threading.Thread(target=engine_loop, name="attn-engine", daemon=True).start()
os.kill(os.getpid(), signal.SIGSEGV)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -11, done.stderr
    first, *dump = done.stderr.splitlines()
    assert json.loads(first)["event"] == "listening"
    text = "\n".join(dump)
    assert "Fatal Python error: Segmentation fault" in text
    assert "engine_loop" in text and "<string>" in text  # the other thread's stack too, and the crashing one's


class _Writes:
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return 2


def _handler_on(writes: _Writes) -> tuple[logs._LineStream, logging.Logger]:
    stream = logs._LineStream(writes)  # type: ignore[arg-type]
    handler = logs._Handler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("attn.test")
    logger.addHandler(handler)
    return stream, logger


def test_an_event_loops_lines_leave_together_on_its_next_turn() -> None:
    """One write per turn of the loop instead of one per line; a warning goes out at once, after what waited; a
    line from another thread is not held; and nothing is left behind when gathering ends."""
    import asyncio
    import threading

    writes = _Writes()
    stream, logger = _handler_on(writes)

    async def serve() -> None:
        stream.gather_on(asyncio.get_running_loop())
        logger.info("a")
        logger.info("b")
        assert writes.writes == []  # held until the turn ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert writes.writes == ["a\nb\n"]
        logger.info("c")
        logger.warning("d")
        assert writes.writes == ["a\nb\n", "c\nd\n"]  # the warning went out at once, with the line before it
        other = threading.Thread(target=logger.info, args=("from a worker thread",))
        other.start()
        other.join()
        assert writes.writes[-1] == "from a worker thread\n"
        logger.info("e")
        stream.gather_on(None)
        assert writes.writes[-1] == "e\n"
        logger.info("f")
        assert writes.writes[-1] == "f\n"  # no longer gathered

    asyncio.run(serve())


def test_a_failed_server_still_writes_its_last_gathered_lines() -> None:
    """The loop dies with lines still gathered: they are written at exit, in order, as whole JSON lines."""
    import subprocess
    import sys

    script = """
import asyncio, logging
from server import logs
logs.configure("INFO", "json")
log = logging.getLogger("attn.server")
async def serve():
    logs.gather_on(asyncio.get_running_loop())
    for i in range(3):
        logs.event(log, "rpc", n=i)
    raise RuntimeError("boom")
asyncio.run(serve())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [e["n"] for e in events if e.get("event") == "rpc"] == [0, 1, 2]
    assert "boom" in done.stderr


@pytest.mark.parametrize("formatter", [logs.JsonFormatter, logs.TextFormatter])
def test_an_event_is_written_without_a_record_as_the_handler_would_write_it(
        formatter: type[logging.Formatter], monkeypatch: pytest.MonkeyPatch) -> None:
    """``logs.event`` writes an INFO or DEBUG line itself when the process's handler is the only one to get it (the
    access-log line, once per call): the same line the handler writes from a record. With another handler on the
    way (a test's capture), the records go through ``logging`` as before."""
    import time

    writes = _Writes()
    _, logger = _handler_on(writes)
    handler = logger.handlers[0]
    handler.setFormatter(formatter())
    logger.propagate = False
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(logs, "_handler", handler)
    monkeypatch.setattr(logs, "_process", "frontend-1")
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.1239)
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_123_900_000)  # what logging reads since Python 3.12
    token = logs.request_id.set("abc")
    try:
        with monkeypatch.context() as no_records:
            no_records.setattr(logger, "makeRecord", lambda *a, **k: pytest.fail("a LogRecord was made"))
            logs.event(logger, "rpc", rpc="Translate", seconds=0.0123, note="two words")
            logs.event(logger, "rpc_received", level=logging.DEBUG)  # below the logger's level: nothing
        direct = writes.writes[-1]
        logger.info("rpc", extra={"fields": {"rpc": "Translate", "seconds": 0.0123, "note": "two words"}})
        assert writes.writes == [direct, direct]
        assert "2023-11-14T22:13:20.123Z" in direct and "abc" in direct and "frontend-1" in direct

        captured: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = captured.append  # type: ignore[method-assign]
        logger.addHandler(capture)
        logs.event(logger, "rpc", rpc="Translate", seconds=0.0123, note="two words")
        assert writes.writes[-1] == direct and [r.getMessage() for r in captured] == ["rpc"]
    finally:
        logs.request_id.reset(token)


def test_a_field_that_does_not_format_never_fails_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The access-log line is written inside the call's handler: a field whose ``str`` raises is reported the way
    ``logging`` reports a bad record, and the call goes on."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    writes = _Writes()
    _, logger = _handler_on(writes)
    handler = logger.handlers[0]
    handler.setFormatter(logs.TextFormatter())
    logger.propagate = False
    monkeypatch.setattr(logs, "_handler", handler)
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)
    logs.event(logger, "rpc", field=Unprintable())
    assert [r.getMessage() for r in reported] == ["rpc"] and writes.writes == []


def test_a_status_grpc_could_not_send_is_an_info_line_without_a_traceback() -> None:
    """gRPC's asyncio server logs an error with a traceback when the call ended (deadline, client gone) a moment
    before its status could leave; the server's filter makes that one record an INFO line, and no other."""
    import io

    from server.app import StatusAfterTheCallEnded

    logger = logging.getLogger("tests.grpc-aio")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    logger.addFilter(StatusAfterTheCallEnded())
    logger.propagate = False
    try:
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:  # as gRPC's Cython logs it
            logger.exception("ExecuteBatchError raised in core by servicer method "
                             "[/attention.v1.AttentionService/Translate]")
        logger.error("Unexpected [ValueError] raised by servicer method [/attention.v1.AttentionService/Caption]")
    finally:
        logger.removeHandler(handler)
    undelivered, other = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (undelivered["level"], undelivered["event"], undelivered["method"]) == (
        "info", "rpc_status_undelivered", "/attention.v1.AttentionService/Translate")
    assert "traceback" not in undelivered
    assert (other["level"], other["event"]) == (
        "error", "Unexpected [ValueError] raised by servicer method [/attention.v1.AttentionService/Caption]")
