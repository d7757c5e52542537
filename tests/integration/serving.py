"""Helpers for the server tests: an in-process server on port 0 with its own event loop thread, the certificate a
TLS server presents, and checks of the response invariants (spans, matrices) shared by several tests."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from server.app import AttentionServer
from server.settings import Settings

T = TypeVar("T")
_BYTE = re.compile(r"<0x([0-9A-F]{2})>")


def settings(models_dir: Path, **overrides: Any) -> Settings:
    base = Settings(host="127.0.0.1", port=0, metrics_port=0, models_dir=str(models_dir), device="cpu",
                    ort_threads=1, workers=2, grace_seconds=5.0)
    return replace(base, **overrides)


class RunningServer:
    """An :class:`AttentionServer` driven from synchronous test code; clients use the ordinary sync stubs."""

    def __init__(self, settings: Settings, load: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server = AttentionServer(settings, CollectorRegistry())
        self.port = self.call(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.AttentionServiceStub(self.channel)
        if load:
            self.load()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def load(self) -> None:
        self.call(self.server.load())

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def close(self) -> None:
        self.channel.close()
        if self.server.registry is not None:
            self.call(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def peer_certificate(port: int) -> bytes:
    """The certificate (DER) that a new TLS handshake with the server on ``port`` presents, trusted or not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # what a gRPC client offers
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def matrix(m: pb.Matrix) -> np.ndarray:
    return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)


def _piece_pattern(piece: str, first: bool) -> str:
    """A ``▁`` stands for a run of whitespace, except at the very start of the text where it stands for nothing."""
    if not piece.strip("▁"):
        return r"\s*"  # whitespace only: detokenization may have dropped it (leading or repeated whitespace)
    body = piece[1:] if first and piece.startswith("▁") else piece
    return "".join(r"\s+" if c == "▁" else re.escape(c) for c in body)


def check_spans(text: str, tokens: Sequence[pb.Token]) -> None:
    """Every token span cuts the token's surface out of ``text`` (the rules are in the .proto's Token comment)."""
    assert tokens and tokens[-1].special and tokens[-1].piece == "</s>"
    assert tokens[-1].start == tokens[-1].end == len(text)
    assert not any(t.special for t in tokens[:-1])
    position = 0
    pending = bytearray()  # the bytes of a byte-fallback character spelled so far
    for index, token in enumerate(tokens[:-1]):
        span = text[token.start : token.end]
        where = f"token {index} {token.piece!r} [{token.start}:{token.end}] = {span!r} in {text!r}"
        assert position <= token.start <= token.end <= len(text), where
        assert not text[position : token.start].strip(), f"{where}: skips {text[position:token.start]!r}"
        position = token.end
        byte = _BYTE.fullmatch(token.piece)
        if byte:
            pending.append(int(byte.group(1), 16))
            if token.start == token.end:
                continue  # a leading byte of a character: empty span at the character's start
            assert span in (pending.decode("utf-8", errors="replace"), "\ufffd"), where
            pending.clear()
            continue
        assert not pending, f"{where}: follows an incomplete byte sequence"
        if token.piece == "<unk>":
            assert span.strip(), where
            continue
        surface = unicodedata.normalize("NFKC", span)
        assert re.fullmatch(_piece_pattern(token.piece, first=index == 0), surface), where
    assert not text[position:].strip(), f"text after the last token is not covered: {text[position:]!r}"


def check_hypothesis(translation: pb.Translation, hyp: pb.Hypothesis, detail: int = pb.ATTENTION_DETAIL_FULL) -> None:
    check_spans(hyp.text, hyp.tokens)
    assert [w.text for w in hyp.words] == hyp.text.split()
    n_src_words, n_tgt_words = len(translation.source_words), len(hyp.words)
    for t in hyp.tokens:
        assert -1 <= t.word < n_tgt_words
        if t.word >= 0:  # the token's first visible character lies in its word
            span = hyp.text[t.start : t.end]
            first = t.start + len(span) - len(span.lstrip())
            word = hyp.words[t.word]
            assert word.start <= first < word.end or (t.start == t.end and word.start <= first <= word.end)
    if detail in (pb.ATTENTION_DETAIL_FULL, pb.ATTENTION_DETAIL_UNSPECIFIED):
        weights = matrix(hyp.attention)
        assert weights.shape == (len(hyp.tokens), len(translation.source_tokens))
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-4)
        assert (weights >= 0).all()
    else:
        assert hyp.attention.rows == 0 and not hyp.attention.values
    if detail == pb.ATTENTION_DETAIL_NONE:
        assert hyp.word_attention.rows == 0 and not hyp.alignments
        return
    words = matrix(hyp.word_attention)
    assert words.shape == (n_tgt_words, n_src_words)
    assert (words.sum(axis=1) <= 1 + 1e-4).all() and (words >= 0).all()
    assert len(hyp.alignments) <= n_tgt_words
    for a in hyp.alignments:
        assert 0 <= a.source_word < n_src_words and 0 <= a.target_word < n_tgt_words
        assert 0.0 < a.weight <= 1.0 + 1e-5
        assert a.weight == np.float32(words[a.target_word].max())


class ServerProcess:
    """``attn-serve`` in a process of its own (by default several front-end processes and an engine process), with
    its JSON log lines read on a thread: tests wait for events instead of sleeping."""

    started: ClassVar[list[ServerProcess]] = []  # those of the test running now (conftest.py): its report on failure

    def __init__(self, models_dir: Path, *flags: str, frontends: int = 2, env: dict[str, str] | None = None) -> None:
        import json
        import os
        import subprocess
        import sys

        ServerProcess.started.append(self)
        self.log: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
             "--device", "cpu", "--ort-threads", "1", "--workers", "1", "--reload-interval", "0",
             "--frontends", str(frontends), *flags],
            env={**os.environ, "ATTN_MODELS_DIR": str(models_dir), **(env or {})}, stderr=subprocess.PIPE,
            text=True, cwd=Path(__file__).resolve().parents[2],
        )

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                try:
                    record = json.loads(line)  # every line the server writes is JSON ...
                except ValueError:  # ... but a crashing process's stack dump (server/logs.py): kept for the report
                    record = {"event": "not_json", "line": line.rstrip("\n")}
                with self._changed:
                    self.log.append(record)
                    self._changed.notify_all()
            with self._changed:
                self._changed.notify_all()

        self._reader = threading.Thread(target=read, name="server-log", daemon=True)
        self._reader.start()
        [listening] = self.wait_for("listening")
        self.port, self.metrics_port = int(listening["port"]), int(listening["metrics_port"])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.AttentionServiceStub(self.channel)

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._changed:
            return [r for r in self.log if r.get("event") == name and all(r.get(k) == v for k, v in fields.items())]

    def wait_for(self, name: str, count: int = 1, timeout: float = 120.0, **fields: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [r for r in self.log
                         if r.get("event") == name and all(r.get(k) == v for k, v in fields.items())]
                if len(found) >= count:
                    return found[:count]
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"the server exited ({self.process.returncode}) before {count} {name!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {count} {name!r} events in {timeout} s: {self.log[-20:]}")
                self._changed.wait(min(remaining, 0.5))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def pids(self, role: str) -> list[int]:
        """The live processes of ``role`` (engine, frontend), from the parent's log."""
        started = {r["pid"]: r for r in self.events("process_started", role=role)}
        gone = {r["pid"] for r in self.events("process_exited", role=role)}
        return [pid for pid in started if pid not in gone]

    def stop(self, timeout: float = 120.0) -> int:
        import signal

        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(10)
        assert not self.events("not_json"), f"lines that are not JSON: {self.events('not_json')}"
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` log lines of every process of this server, as the server wrote them."""
        import json

        with self._changed:
            return "\n".join(json.dumps(r) for r in self.log[-lines:])
