"""``attn batch``: translate a whole file through the Translate RPC into JSONL, resumably.

    attn batch inputs.txt -o out.jsonl                       one text per line
    attn batch inputs.jsonl -o out.jsonl --attention words   {"text": ..., "id": ...} per line
    attn batch inputs.tsv -o out.jsonl --column sentence     the "sentence" column of a TSV with a header line
    attn batch inputs.txt -o out.jsonl --shard "$JOB_COMPLETION_INDEX/4"    worker i of 4: out.shard-i-of-4.jsonl

The output has one JSON line per non-blank input line, in input order. Several lines go in one Translate request
(--batch-size) and --concurrency requests are in flight at once. Output is committed in chunks: the file is
fsynced, then the sidecar ``OUT.checkpoint.json`` (replaced atomically) records the committed output bytes and the
last input line they cover. Rerunning the same command truncates the output to that length and goes on after that
line, so a job killed at any moment (SIGKILL included) neither loses nor repeats a line, and rerunning a finished
job does nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, cast

import grpc
from google.protobuf import json_format

from attention.v1 import attention_pb2 as pb
from attention.v1 import attention_pb2_grpc as pb_grpc
from client.options import decoding_options

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".tab": "tsv"}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Codes about the job rather than one text (unknown model, no access): writing them into every line would bury the
# problem, so they stop the job instead; a rerun resumes once it is fixed.
FATAL = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED}
BACKOFF_BASE, BACKOFF_CAP = 0.1, 10.0  # seconds: the first retry waits ~0.1 s, later ones double up to 10 s
CHECKPOINT_SECONDS = 10.0  # commit at least this often, whatever --checkpoint-every says
PROGRESS_SECONDS = 10.0  # between progress lines when stderr is a log rather than a terminal
Record = dict[str, Any]


class BatchError(Exception):
    """A problem with the job's files or options, reported in one line."""


class Abort(Exception):
    """Stops the job after committing what is written: retries exhausted, a job-level error, or an interrupt."""


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
    b.add_argument("--model", default="", help="model name (default: the server's default)")
    b.add_argument("--version", default="", help="model version (default: the highest)")
    b.add_argument("--beam", type=int, default=0, help="beam size (default: the server's; 1 = greedy)")
    b.add_argument("--nbest", type=int, default=0, help="hypotheses per text (default 1)")
    b.add_argument("--max-output-tokens", type=int, default=0, help="token budget per output (default: model's)")
    b.add_argument("--length-penalty", type=float, default=None, help="length penalty alpha (default 1.0)")
    b.add_argument("--attention-layer", type=int, default=None, help="multi-head models: the decoder layer to show")
    b.add_argument("--attention-head", type=int, default=None, help="multi-head models: the head (-1: the mean)")
    b.add_argument("--attention", choices=details, default="none",
                   help="none (default): text and scores; words: word alignments and word-level matrix; "
                        "full: also the token-level matrix")
    b.add_argument("--batch-size", type=_positive, default=16, help="texts per Translate request (default 16)")
    b.add_argument("--concurrency", type=_positive, default=8, help="requests in flight at once (default 8)")
    b.add_argument("--max-retries", type=_count, default=8,
                   help="retries of a request refused with UNAVAILABLE or RESOURCE_EXHAUSTED, with exponential "
                        "backoff and jitter (default 8); then the job stops, resumable")
    b.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="process only the lines whose 1-based line number %% N == I (default 0/1: all)")
    b.add_argument("--checkpoint-every", type=_positive, default=1000,
                   help=f"commit after this many output lines (default 1000) and at least every "
                        f"{CHECKPOINT_SECONDS:.0f} s")
    b.add_argument("--restart", action="store_true", help="ignore the checkpoint and start the output over")
    b.add_argument("--summary", type=Path, help="write the summary JSON here (default: as the last stderr line)")
    b.add_argument("--quiet", action="store_true", help="no progress line and no readable summary")


# Reading ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One input line: its 1-based number, the input byte offset where it ends, and its text or why it is unusable."""

    line: int
    end: int
    text: str = ""
    id: Any = None
    error: str | None = None


def detect_format(path: Path, fmt: str = "auto") -> str:
    return FORMATS.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


def _jsonl(line: str, text_field: str, id_field: str) -> tuple[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    text = value.get(text_field)
    if not isinstance(text, str):
        raise ValueError(f"no string field {text_field!r}")
    return text, value.get(id_field)


def _tsv(line: str, index: int, id_index: int | None) -> tuple[str, Any]:
    cells = line.split("\t")
    if index >= len(cells):
        raise ValueError(f"only {len(cells)} column(s), the text is in column {index + 1}")
    return cells[index], cells[id_index] if id_index is not None and id_index < len(cells) else None


def _plain(line: str) -> tuple[str, Any]:
    return line, None


Parser = Callable[[str], tuple[str, Any]]


def _parser(f: IO[bytes], fmt: str, column: str | None, id_column: str) -> tuple[Parser, int, int]:
    """How to get (text, id) out of a line, and the line number and byte offset after any header."""
    if fmt == "jsonl":
        return functools.partial(_jsonl, text_field=column or "text", id_field=id_column), 0, 0
    if fmt == "tsv" and column is not None:
        header = f.readline()
        names = header.decode("utf-8-sig").rstrip("\r\n").split("\t")
        if column not in names:
            raise BatchError(f"no column {column!r} in the TSV header ({', '.join(names)})")
        id_index = names.index(id_column) if id_column in names else None
        return functools.partial(_tsv, index=names.index(column), id_index=id_index), 1, len(header)
    if fmt == "tsv":
        return functools.partial(_tsv, index=0, id_index=None), 0, 0
    return _plain, 0, 0


def _lines(f: IO[bytes], line: int, offset: int, shard: tuple[int, int]) -> Iterator[tuple[int, int, bytes]]:
    """The shard's non-blank lines after position (line, offset): (line number, end offset, content)."""
    i, n = shard
    for raw in f:
        line += 1
        offset += len(raw)
        content = raw.rstrip(b"\r\n")
        if line % n == i and content.strip():
            yield line, offset, content


def read_items(path: Path, fmt: str, column: str | None = None, id_column: str = "id",
               shard: tuple[int, int] = (0, 1), start: tuple[int, int] = (0, 0)) -> Iterator[Item]:
    """The inputs of ``shard`` after ``start`` = (line number, byte offset) of the last line already done.
    A line that cannot be read becomes an Item with an ``error`` (written as a failed line, never dropped)."""
    with path.open("rb") as f:
        parse, line, offset = _parser(f, fmt, column, id_column)
        if start[1] > offset:
            f.seek(start[1])
            line, offset = start
        for number, end, content in _lines(f, line, offset, shard):
            try:
                text = content.decode("utf-8")
                yield Item(number, end, *parse(text.removeprefix("\ufeff") if number == 1 else text))
            except ValueError as exc:  # also UnicodeDecodeError and json.JSONDecodeError
                yield Item(number, end, error=f"line {number}: {exc}")


def count_inputs(path: Path, fmt: str, column: str | None, shard: tuple[int, int]) -> int:
    with path.open("rb") as f:
        _, line, offset = _parser(f, fmt, column, "id")
        return sum(1 for _ in _lines(f, line, offset, shard))


def batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
    """What every worker thread shares: the stub, the request settings, and the stop switch."""

    stub: pb_grpc.AttentionServiceStub
    model: str
    version: str
    options: pb.DecodingOptions
    timeout: float
    max_retries: int
    stop: threading.Event = field(default_factory=threading.Event)
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _calls: set[grpc.Future] = field(default_factory=set)

    def invoke(self, texts: list[str]) -> pb.TranslateResponse:
        """One Translate call, cancellable from another thread by :meth:`cancel`."""
        if self.stop.is_set():
            raise Abort("stopped")
        request = pb.TranslateRequest(model=self.model, version=self.version, texts=texts, options=self.options)
        call = self.stub.Translate.future(request, timeout=self.timeout)
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
    """Translate, retrying UNAVAILABLE and RESOURCE_EXHAUSTED; other errors are raised as they come."""
    for attempt in range(job.max_retries + 1):
        try:
            return job.invoke(texts)
        except grpc.RpcError as exc:
            code, message = _status(exc)
            if code not in RETRYABLE:
                raise
            if attempt == job.max_retries:
                raise Abort(f"{code.name} after {attempt + 1} attempts: {message}") from None
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
            raise Abort(f"{code.name}: {message}") from None
        if len(items) > 1:  # one bad text (INVALID_ARGUMENT, say) must not fail the others: retry them one by one
            return {line: record for item in items for line, record in _translate(job, [item]).items()}
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


# Writing and checkpointing ---------------------------------------------------------------------------------------

def shard_path(output: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    if "{i}" in output.name or "{n}" in output.name:
        return output.with_name(output.name.replace("{i}", str(i)).replace("{n}", str(n)))
    return output if n == 1 else output.with_name(f"{output.stem}.shard-{i}-of-{n}{output.suffix}")


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoint.json")


@dataclass
class Checkpoint:
    """What is durably done: ``output_bytes`` of output hold every input line up to ``line`` (ending at byte
    ``offset`` of the input). ``job`` holds the settings that shape the output; a resume must use the same."""

    job: dict[str, Any]
    line: int = 0
    offset: int = 0
    output_bytes: int = 0
    records: int = 0
    failed: int = 0

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise BatchError(f"{path}: unreadable checkpoint ({exc}); use --restart to start over") from None

    def save(self, path: Path) -> None:
        """Atomically: a reader (or a resumed job) sees the old checkpoint or the new one, never a mix."""
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class Writer:
    """Appends records in input order; :meth:`commit` fsyncs them, then records them in the checkpoint."""

    def __init__(self, path: Path, checkpoint: Checkpoint, every: int) -> None:
        self.state_path, self.every = checkpoint_path(path), every
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size < checkpoint.output_bytes:
            raise BatchError(f"{path} has {size} bytes, its checkpoint says {checkpoint.output_bytes} were "
                             "committed; use --restart to start over")
        self.file = path.open("r+b" if path.exists() else "wb")
        self.file.truncate(checkpoint.output_bytes)  # what a killed run wrote after its last commit goes
        self.file.seek(checkpoint.output_bytes)
        self.committed, self.pending = checkpoint, replace(checkpoint)
        self.committed_at = time.monotonic()

    def write(self, last: Item, records: list[Record]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        self.file.write(data)
        p = self.pending
        p.line, p.offset, p.output_bytes = last.line, last.end, p.output_bytes + len(data)
        p.records += len(records)
        p.failed += sum("error" in r for r in records)
        if (p.records - self.committed.records >= self.every
                or time.monotonic() - self.committed_at >= CHECKPOINT_SECONDS):
            self.commit()

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the bytes first: the checkpoint must never point past them
        self.pending.save(self.state_path)
        self.committed, self.committed_at = replace(self.pending), time.monotonic()

    def close(self) -> None:
        self.commit()
        self.file.close()


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


def run(args: argparse.Namespace, channel: grpc.Channel, details: dict[str, Any]) -> int:
    """Exit status: 0 when every line is written (failed lines included), 1 when the job stopped early (rerun to
    resume), 2 for a problem with the files or options, 130 on Ctrl-C."""
    try:
        return _run(args, channel, details)
    except BatchError as exc:
        print(f"attn batch: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, channel: grpc.Channel, details: dict[str, Any]) -> int:
    if not args.input.is_file():
        raise BatchError(f"{args.input}: no such file")
    fmt = detect_format(args.input, args.format)
    options = decoding_options(args, details)
    output = shard_path(args.output, args.shard)
    settings = _settings(args, fmt, options)
    checkpoint = None if args.restart else Checkpoint.load(checkpoint_path(output))
    if checkpoint is not None and checkpoint.job != settings:
        raise BatchError(f"{output} was started with other settings ({checkpoint.job}); use the same ones to "
                         "resume, or --restart")
    checkpoint = checkpoint or Checkpoint(settings)
    if checkpoint.offset > args.input.stat().st_size:
        raise BatchError(f"{args.input} is shorter than when {output} was checkpointed; use --restart to start over")
    progress = Progress(count_inputs(args.input, fmt, args.column, args.shard), checkpoint.records, args.quiet)
    job = Job(pb_grpc.AttentionServiceStub(channel), args.model, args.version, options, args.timeout,
              args.max_retries)
    items = read_items(args.input, fmt, args.column, args.id_column, args.shard, (checkpoint.line, checkpoint.offset))
    writer = Writer(output, checkpoint, args.checkpoint_every)
    status, error = 0, ""
    try:
        pipeline(job, batches(items, args.batch_size), writer, progress, args.concurrency)
    except Abort as exc:
        status, error = 1, str(exc)
    except KeyboardInterrupt:
        status, error = 130, "interrupted"
    finally:
        writer.close()
        progress.finish()
    report(args, output, progress, writer.committed, job.retries, error)
    return status


def report(args: argparse.Namespace, output: Path, progress: Progress, committed: Checkpoint, retries: int,
           error: str) -> None:
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
    if args.summary:
        args.summary.write_text(json.dumps(summary) + "\n")
    else:
        print(json.dumps(summary), file=sys.stderr)
