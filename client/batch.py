"""``attn batch``: translate a whole file through the Translate RPC into JSONL, resumably.

    attn batch inputs.txt -o out.jsonl                       one text per line
    attn batch inputs.jsonl -o out.jsonl --attention words   {"text": ..., "id": ...} per line
    attn batch inputs.tsv -o out.jsonl --column sentence     the "sentence" column of a TSV with a header line
    attn batch inputs.txt -o out.jsonl --shard "$JOB_COMPLETION_INDEX/4"    worker i of 4: out.shard-i-of-4.jsonl

The output has one JSON line per non-blank input line, in input order. Several lines go in one Translate request
(--batch-size) and --concurrency requests are in flight at once, taking turns over --connections connections (a
server runs several front-end processes on one port and gives each connection to one of them: over one connection
a job would reach one front-end only). Output is committed in chunks: the file is fsynced, then the sidecar
``OUT.checkpoint.json`` (replaced atomically) records the committed output bytes and the last input line they
cover. Rerunning the same command truncates the output to that length and goes on after that line, so a job killed
at any moment (SIGKILL included) neither loses nor repeats a line, and rerunning a finished job does nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import json_format

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client import connection
from client.batch_io import (
    CHECKPOINT_SECONDS,
    BatchError,
    Checkpoint,
    InputDigest,
    Item,
    Record,
    Writer,
    batches,
    check_unchanged,
    checkpoint_path,
    count_inputs,
    detect_format,
    read_items,
    shard_path,
)
from client.options import add_decoding_arguments, decoding_options

# CANCELLED too: this job's own cancellations end in FutureCancelledError (Job.invoke), so a CANCELLED status comes
# from the server, whose gRPC core ends so the calls that reach it as it starts to drain, before its GOAWAY reaches
# the client, without having run them (grpc/grpc#41785): a retry goes to a new connection, another replica.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
# Codes about the job rather than one text (unknown model, no access): writing them into every line would bury the
# problem, so they stop the job instead; a rerun resumes once it is fixed.
FATAL = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.PERMISSION_DENIED}
# A message over a size limit is refused with RESOURCE_EXHAUSTED as a full queue is, but the same texts would be
# refused again: gRPC's own limits ("Received/Sent message larger than max": a request over the server's
# max_receive_bytes, an answer over this client's receive limit) and the server's answer over its max_send_bytes. Not
# retried: the batch is split like any batch that fails, and a text too large on its own fails only its line.
TOO_LARGE = ("message larger than max", "more than this server sends in one message")
BACKOFF_BASE, BACKOFF_CAP = 0.1, 10.0  # seconds: the first retry waits ~0.1 s, later ones double up to 10 s
PROGRESS_SECONDS = 10.0  # between progress lines when stderr is a log rather than a terminal


class Abort(Exception):
    """Stops the job after committing what is written: retries exhausted, a job-level error, or an interrupt."""

    def __init__(self, message: str, status: tuple[grpc.StatusCode, str] | None = None) -> None:
        super().__init__(message)
        self.status = status  # the call's code and details, when a call's error stopped the job


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` → (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser,
               details: dict[str, Any]) -> None:
    b = commands.add_parser("batch", parents=[common], description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            help="translate a file (JSONL, TSV or text) into JSONL, resumably")
    b.add_argument("input", type=Path, help="the input file")
    b.add_argument("-o", "--output", type=Path, required=True,
                   help="JSONL output; with --shard I/N, .shard-I-of-N goes before its extension unless the path "
                        "contains {i} (and {n}), which are replaced instead")
    b.add_argument("--format", choices=("auto", "jsonl", "tsv", "text"), default="auto",
                   help="input format (default auto: .jsonl/.ndjson/.json, .tsv/.tab, anything else is text)")
    b.add_argument("--column", default=None,
                   help="JSONL: the text field (default text); TSV: the text column, named in a header line "
                        "(default: the first column, no header)")
    b.add_argument("--id-column", default="id", help="JSONL field or TSV header column copied as the id (default id)")
    add_decoding_arguments(b, details, "none", "none (default): text and scores; words: word alignments and "
                           "word-level matrix; full: also the token-level matrix")
    b.add_argument("--batch-size", type=_positive, default=16, help="texts per Translate request (default 16)")
    b.add_argument("--concurrency", type=_positive, default=8, help="requests in flight at once (default 8)")
    b.add_argument("--connections", type=_positive, default=8,
                   help="connections to the server, taken in turn (default 8, at most --concurrency): each reaches "
                        "one of the server's front-end processes")
    b.add_argument("--max-retries", type=_count, default=8,
                   help="retries of a request refused with UNAVAILABLE, RESOURCE_EXHAUSTED or CANCELLED, with "
                        "exponential backoff and jitter (default 8); then the job stops, resumable")
    b.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="process only the lines whose 1-based line number %% N == I (default 0/1: all)")
    b.add_argument("--checkpoint-every", type=_positive, default=1000,
                   help=f"commit after this many output lines (default 1000) and at least every "
                        f"{CHECKPOINT_SECONDS:.0f} s")
    b.add_argument("--restart", action="store_true", help="ignore the checkpoint and start the output over")
    b.add_argument("--summary", type=Path, help="write the summary JSON here (default: as the last stderr line); "
                   "with --shard named per shard as --output is")
    b.add_argument("--quiet", action="store_true", help="no progress line and no readable summary")


# Records ---------------------------------------------------------------------------------------------------------

def _rows(m: pb.Matrix) -> list[list[float]]:
    values = list(m.values)
    return [[round(v, 6) for v in values[r * m.cols : (r + 1) * m.cols]] for r in range(m.rows)]


def _head(item: Item) -> Record:
    return {"line": item.line, **({} if item.id is None else {"id": item.id}), "text": item.text}


def error_record(item: Item, code: str, message: str) -> Record:
    return {**_head(item), "error": {"code": code, "message": message}}


def _hypothesis(h: pb.Hypothesis, detail: int) -> Record:
    out: Record = {"text": h.text, "score": h.score, "log_prob": h.log_prob, "truncated": h.truncated}
    if detail != pb.ATTENTION_DETAIL_NONE:
        out["words"] = [w.text for w in h.words]
        out["alignments"] = [{"source_word": a.source_word, "target_word": a.target_word, "weight": a.weight}
                             for a in h.alignments]
        out["word_attention"] = _rows(h.word_attention)
    if detail in (pb.ATTENTION_DETAIL_FULL, pb.ATTENTION_DETAIL_UNSPECIFIED):
        out["tokens"] = [t.piece for t in h.tokens]
        out["attention"] = _rows(h.attention)
    return out


def result_record(item: Item, response: pb.TranslateResponse, result: pb.Translation, detail: int) -> Record:
    out = {**_head(item), "model": response.model, "version": response.version,
           "translation": result.hypotheses[0].text if result.hypotheses else "",
           "hypotheses": [_hypothesis(h, detail) for h in result.hypotheses]}
    if detail != pb.ATTENTION_DETAIL_NONE:
        out["source_words"] = [w.text for w in result.source_words]
        out["attention_uniform"] = response.attention_uniform
    if detail in (pb.ATTENTION_DETAIL_FULL, pb.ATTENTION_DETAIL_UNSPECIFIED):
        out["source_tokens"] = [t.piece for t in result.source_tokens]
    return out


# Calling the server ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What every worker thread shares: the stubs (one per connection), the request settings, and the stop switch."""

    stubs: list[pb_grpc.AttentionServiceStub]
    model: str
    version: str
    options: pb.DecodingOptions
    timeout: float
    max_retries: int
    stop: threading.Event = field(default_factory=threading.Event)
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _calls: set[grpc.Future] = field(default_factory=set)
    _turns: Iterator[int] = field(default_factory=itertools.count)  # calls take the connections in turn

    def invoke(self, texts: list[str]) -> pb.TranslateResponse:
        """One Translate call, cancellable from another thread by :meth:`cancel`."""
        if self.stop.is_set():
            raise Abort("stopped")
        request = pb.TranslateRequest(model=self.model, version=self.version, texts=texts, options=self.options)
        stub = self.stubs[next(self._turns) % len(self.stubs)]  # a retry goes out on the next connection
        call = stub.Translate.future(request, timeout=self.timeout)
        with self._lock:
            self._calls.add(call)
        try:
            if self.stop.is_set():
                call.cancel()
            return call.result()
        except grpc.FutureCancelledError:
            raise Abort("stopped") from None
        finally:
            with self._lock:
                self._calls.discard(call)

    def cancel(self) -> None:
        self.stop.set()
        with self._lock:
            for call in self._calls:
                call.cancel()

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: half the doubled delay is fixed, the other half random."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, exc)
    return call.code(), call.details() or ""


def call_with_retries(job: Job, texts: list[str]) -> pb.TranslateResponse:
    """Translate, retrying UNAVAILABLE, RESOURCE_EXHAUSTED (but for a message too large) and CANCELLED; other errors
    are raised as they come."""
    for attempt in range(job.max_retries + 1):
        try:
            return job.invoke(texts)
        except grpc.RpcError as exc:
            code, message = _status(exc)
            if code not in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                         and any(reason in message for reason in TOO_LARGE)):
                raise
            if attempt == job.max_retries:
                raise Abort(f"{code.name} after {attempt + 1} attempts: {message}", (code, message)) from None
        job.count_retry()
        if job.stop.wait(backoff(attempt)):
            raise Abort("stopped")
    raise AssertionError("unreachable")


def _translate(job: Job, items: list[Item]) -> dict[int, Record]:
    try:
        response = call_with_retries(job, [item.text for item in items])
    except grpc.RpcError as exc:
        code, message = _status(exc)
        if code in FATAL:
            raise Abort(f"{code.name}: {message}", (code, message)) from None
        if len(items) > 1:
            # One bad text (INVALID_ARGUMENT, say) must not fail the others: retry the halves, down to single texts
            # where the error is. Halves, not single texts at once: a --batch-size over the server's ATTN_MAX_TEXTS
            # then costs one refused call per batch, not a call per line.
            half = len(items) // 2
            return {**_translate(job, items[:half]), **_translate(job, items[half:])}
        return {items[0].line: error_record(items[0], code.name, message)}
    detail = job.options.attention
    return {item.line: result_record(item, response, result, detail)
            for item, result in zip(items, response.translations, strict=True)}


def score(job: Job, items: list[Item]) -> list[Record]:
    """The output records of one batch, in input order (runs in a worker thread)."""
    readable = [item for item in items if item.error is None]
    results = _translate(job, readable) if readable else {}
    return [error_record(item, "INVALID_INPUT", item.error) if item.error is not None else results[item.line]
            for item in items]


# Progress and the job --------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A self-updating line on a terminal, one line every PROGRESS_SECONDS in a log."""

    def __init__(self, total: int, skipped: int, quiet: bool) -> None:
        self.total, self.skipped, self.quiet = total, skipped, quiet
        self.done = self.failed = 0
        self.started = self.printed = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def advance(self, records: list[Record]) -> None:
        self.done += len(records)
        self.failed += sum("error" in r for r in records)
        now = time.monotonic()
        if not self.quiet and now - self.printed >= (0.2 if self.tty else PROGRESS_SECONDS):
            self.printed, self.shown = now, True
            print(f"\r{self.line()}\x1b[K" if self.tty else self.line(), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def line(self) -> str:
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        position = self.skipped + self.done
        eta = _duration(max(self.total - position, 0) / rate) if rate > 0 else "?"
        percent = 100.0 * position / self.total if self.total else 100.0
        failed = f", {self.failed} failed" if self.failed else ""
        return f"attn batch: {position}/{self.total} lines ({percent:.1f}%), {rate:.1f} lines/s, ETA {eta}{failed}"

    def finish(self) -> None:
        if self.tty and self.shown:
            print(file=sys.stderr)


def _write_next(pending: deque[tuple[Item, Future[list[Record]]]], writer: Writer, progress: Progress) -> None:
    last, future = pending.popleft()
    records = future.result()
    writer.write(last, records)
    progress.advance(records)


def pipeline(job: Job, work: Iterable[list[Item]], writer: Writer, progress: Progress, concurrency: int) -> None:
    """Scores the batches on ``concurrency`` threads and writes their records strictly in input order."""
    pending: deque[tuple[Item, Future[list[Record]]]] = deque()  # the reorder buffer, in input order
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="attn-batch")
    try:
        for batch in work:
            pending.append((batch[-1], pool.submit(score, job, batch)))
            while pending and (len(pending) >= 2 * concurrency or pending[0][1].done()):
                _write_next(pending, writer, progress)
        while pending:
            _write_next(pending, writer, progress)
    finally:
        job.cancel()  # nothing is in flight after a normal end; after an error, stop the workers now
        pool.shutdown(wait=True, cancel_futures=True)


def _settings(args: argparse.Namespace, fmt: str, options: pb.DecodingOptions) -> dict[str, Any]:
    return {"input": str(args.input.resolve()), "format": fmt, "column": args.column, "id_column": args.id_column,
            "shard": list(args.shard), "model": args.model, "version": args.version,
            "options": json_format.MessageToDict(options)}


class Terminated(Exception):
    """SIGTERM: a Kubernetes pod or a container stopped, or ``kill``."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def run(args: argparse.Namespace, channel: grpc.Channel, details: dict[str, Any]) -> int:
    """Exit status: 0 when every line is written (failed lines included), 1 when the job stopped early (rerun to
    resume), 2 for a problem with the files or options, 130 on Ctrl-C, 143 on SIGTERM."""
    try:
        return _run(args, channel, details)
    except BatchError as exc:
        print(f"attn batch: {exc}", file=sys.stderr)
        return 2


def _make_folder(path: Path, what: str) -> None:
    """``path``'s folder, made if missing; a place nothing can be written (a file in the way, say) fails the start
    with one line, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"{what}: cannot write: {exc.strerror or exc}") from None


def _check_summary(path: Path) -> None:
    """The summary is written after the job: a place it cannot go must fail the start, not the end of a long run."""
    _make_folder(path, f"--summary {path}")  # as the output's folder is made
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise BatchError(f"--summary {path}: cannot write: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()


def _check_apart(files: dict[str, Path | None]) -> None:
    """The input and the files the job writes must be files of their own: an output that is the input is truncated
    before it is read (the input lost, and the job done with no line), a summary that is the output overwrites it."""
    named = [(what, path) for what, path in files.items() if path is not None]
    for i, (what, path) in enumerate(named):
        for other, earlier in named[:i]:
            if path.resolve() == earlier.resolve() or (path.exists() and earlier.exists() and path.samefile(earlier)):
                raise BatchError(f"{what} {path} is the same file as {other} {earlier}; nothing was written")


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return f"{path}: is a folder, not a file"
    if path.exists():  # a pipe: `attn batch <(zcat in.txt.gz)`, a FIFO, a device
        return (f"{path}: not a regular file (a pipe?): the job reads its input more than once and resumes at a byte "
                "offset; write it to a file first")
    return f"{path}: no such file"


def _run(args: argparse.Namespace, channel: grpc.Channel, details: dict[str, Any]) -> int:
    if not args.input.is_file():
        raise BatchError(_not_a_file(args.input))
    output = shard_path(args.output, args.shard)
    summary = shard_path(args.summary, args.shard) if args.summary else None  # shards side by side: one each
    _check_apart({"the input": args.input, "the output": output, "its checkpoint": checkpoint_path(output),
                  "--summary": summary})
    if summary:
        _check_summary(summary)
    fmt = detect_format(args.input, args.format)
    options = decoding_options(args, details)
    _make_folder(output, str(output))
    settings = _settings(args, fmt, options)
    checkpoint = None if args.restart else Checkpoint.load(checkpoint_path(output))
    if checkpoint is not None and not checkpoint.records:
        checkpoint = None  # no line written under its settings: a corrected command (--model, say) goes on
    if checkpoint is not None and checkpoint.job != settings:
        raise BatchError(f"{output} was started with other settings ({checkpoint.job}); use the same ones to "
                         "resume, or --restart")
    checkpoint = checkpoint or Checkpoint(settings)
    digest = InputDigest(args.input)
    check_unchanged(digest, checkpoint, output)
    progress = Progress(count_inputs(args.input, fmt, args.column, args.shard), checkpoint.records, args.quiet)
    config = connection.ChannelConfig.from_args(args)  # as ``channel`` was made, which checked it
    own = [config.channel([connection.OWN_CONNECTION]) for _ in range(min(args.connections, args.concurrency) - 1)]
    job = Job([pb_grpc.AttentionServiceStub(c) for c in [channel, *own]], args.model, args.version, options,
              args.timeout, args.max_retries)
    items = read_items(args.input, fmt, args.column, args.id_column, args.shard, (checkpoint.line, checkpoint.offset))
    try:
        writer = Writer(output, checkpoint, args.checkpoint_every, digest)
    except OSError as exc:
        raise BatchError(f"{output}: cannot write: {exc.strerror or exc}") from None
    status, error, hint = 0, "", None
    # SIGTERM stops the job as Ctrl-C does: what is written is committed and the summary says where it stopped
    # (by default the signal would end the process at once, the lines since the last commit to be translated again).
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        pipeline(job, batches(items, args.batch_size), writer, progress, args.concurrency)
    except Abort as exc:
        status, error = 1, str(exc)
        hint = connection.handshake_hint(args, *exc.status) if exc.status else None  # as the other commands say
    except KeyboardInterrupt:
        status, error = 130, "interrupted"
    except Terminated:
        status, error = 143, "terminated"
    except OSError as exc:  # a full disk, say: the job stops, resumable from its last commit, and says why
        status, error = 1, _os_error(exc, output)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        try:
            writer.close()
        except OSError as exc:  # the checkpoint is saved after the bytes it covers, never before: it still holds
            if not error:  # else the job had already stopped, and says why
                status, error = 1, _os_error(exc, output)
        progress.finish()
        for extra in own:
            extra.close()
    report(args, output, summary, progress, writer.committed, job.retries, error, hint)
    return status


def _os_error(exc: OSError, output: Path) -> str:
    return f"{exc.filename or output}: {exc.strerror or exc}"


def report(args: argparse.Namespace, output: Path, summary_path: Path | None, progress: Progress,
           committed: Checkpoint, retries: int, error: str, hint: str | None = None) -> None:
    seconds = time.monotonic() - progress.started
    rate = progress.done / seconds if seconds > 0 else 0.0
    summary = {"input": str(args.input), "output": str(output), "shard": "/".join(map(str, args.shard)),
               "complete": not error, "error": error or None, "done": progress.done,
               "ok": progress.done - progress.failed, "failed": progress.failed, "skipped": progress.skipped,
               "total": committed.records, "failed_total": committed.failed, "retries": retries,
               "seconds": round(seconds, 3), "lines_per_second": round(rate, 2)}
    if not args.quiet:
        print(f"attn batch: {progress.done} lines done ({progress.failed} failed), {progress.skipped} skipped as "
              f"already done, {seconds:.1f} s, {rate:.1f} lines/s → {output}", file=sys.stderr)
    if error:
        print(f"attn batch: stopped: {error}; run the same command again to resume", file=sys.stderr)
    if hint:
        print(f"attn batch: {hint}", file=sys.stderr)
    if summary_path:
        try:
            summary_path.write_text(json.dumps(summary) + "\n")
            return
        except OSError as exc:  # on the output's full disk, say: the summary goes to stderr instead
            print(f"attn batch: --summary {summary_path}: cannot write: {exc.strerror or exc}", file=sys.stderr)
    print(json.dumps(summary), file=sys.stderr)
