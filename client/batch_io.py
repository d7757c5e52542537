"""The files of ``attn batch``: reading inputs (JSONL, TSV, plain text; from a byte offset, one shard), and writing
the output with its checkpoint (fsync, then an atomic sidecar), so that a killed job resumes without losing or
repeating a line. No gRPC here (:mod:`client.batch` is the job)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

CHECKPOINT_SECONDS = 10.0  # commit at least this often, whatever --checkpoint-every says
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".tab": "tsv"}
Record = dict[str, Any]


class BatchError(Exception):
    """A problem with the job's files or options, reported in one line."""


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


class UnreadableText(ValueError):
    """A line whose text cannot be had, though its id can: the failed line carries the id, so that it joins back to
    its input by id like every other line."""

    def __init__(self, message: str, id: Any) -> None:
        super().__init__(message)
        self.id = id


def _jsonl(line: str, text_field: str, id_field: str) -> tuple[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    id_ = _unicode(value.get(id_field), id_field)
    text = value.get(text_field)
    if not isinstance(text, str):
        raise UnreadableText(f"no string field {text_field!r}", id_)
    try:
        return _unicode(text, text_field), id_
    except ValueError as exc:
        raise UnreadableText(str(exc), id_) from None


def _unicode(value: Any, field: str) -> Any:
    """``value``, if its strings are Unicode text: JSON may escape a lone surrogate ("\\ud800"), which is no
    character, and which neither a request's text nor the output's UTF-8 can hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError(f"field {field!r} holds a lone surrogate (an escape such as \\ud800, which is no "
                         "character)") from None
    return value


def _tsv(line: str, index: int, id_index: int | None) -> tuple[str, Any]:
    cells = line.split("\t")
    id_ = cells[id_index] if id_index is not None and id_index < len(cells) else None
    if index >= len(cells):
        raise UnreadableText(f"only {len(cells)} column(s), the text is in column {index + 1}", id_)
    return cells[index], id_


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


def _blank(content: bytes) -> bool:
    """Whether a line holds no text: ASCII whitespace, or Unicode's (no-break, ideographic spaces, a byte order mark),
    which the server would refuse as "empty or only whitespace". A line that is not UTF-8 is not blank: it fails."""
    if not content.strip():
        return True
    if content.isascii():
        return False
    try:
        return not content.decode("utf-8").replace("\ufeff", "").strip()
    except UnicodeDecodeError:
        return False


def _lines(f: IO[bytes], line: int, offset: int, shard: tuple[int, int]) -> Iterator[tuple[int, int, bytes]]:
    """The shard's non-blank lines after position (line, offset): (line number, end offset, content)."""
    i, n = shard
    for raw in f:
        line += 1
        offset += len(raw)
        content = raw.rstrip(b"\r\n")
        if line % n == i and not _blank(content):
            yield line, offset, content


def _rest_of_line(f: IO[bytes], offset: int) -> bytes:
    """Seeks past what follows ``offset`` on the line that ``offset`` ends, and returns it: nothing after a line end,
    but a line that had none when it was read (the input's last, in a file still being written, say) may have gone
    on since, with the line end alone or with more text."""
    f.seek(max(offset - 1, 0))
    if offset == 0 or f.read(1) == b"\n":
        return b""
    return f.readline()


def read_items(path: Path, fmt: str, column: str | None = None, id_column: str = "id",
               shard: tuple[int, int] = (0, 1), start: tuple[int, int] = (0, 0)) -> Iterator[Item]:
    """The inputs of ``shard`` after ``start`` = (line number, byte offset) of the last line already done.
    A line that cannot be read becomes an Item with an ``error`` (written as a failed line, never dropped)."""
    with path.open("rb") as f:
        parse, line, offset = _parser(f, fmt, column, id_column)
        if start[1] > offset:
            line, offset = start
            offset += len(_rest_of_line(f, offset))  # the line end of a last line that had none then: no line
        for number, end, content in _lines(f, line, offset, shard):
            try:
                text = content.decode("utf-8")
                yield Item(number, end, *parse(text.removeprefix("\ufeff") if number == 1 else text))
            except ValueError as exc:  # also UnicodeDecodeError and json.JSONDecodeError
                yield Item(number, end, id=getattr(exc, "id", None), error=f"line {number}: {exc}")


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



# Writing and checkpointing ---------------------------------------------------------------------------------------

def shard_path(output: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    path = str(output)  # a folder per shard (results/{i}/out.jsonl) as well as a file name
    if "{i}" in path or "{n}" in path:
        return Path(path.replace("{i}", str(i)).replace("{n}", str(n)))
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
    input_sha256: str = ""  # of the input's bytes before ``offset`` (absent from older checkpoints)

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


class InputDigest:
    """SHA-256 of the input's first bytes, advanced as lines are committed. A resumed job skips the lines before its
    checkpoint's offset by position alone; if the input was edited since, the output would be joined to the wrong
    lines, so the resume compares this digest first."""

    def __init__(self, path: Path) -> None:
        self.path, self.hash, self.offset = path, hashlib.sha256(), 0

    def up_to(self, offset: int) -> str:
        """The digest of the bytes before ``offset``, reading only those not yet hashed (the pages are still cached:
        the reader passed them moments ago)."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            while self.offset < offset:
                block = f.read(min(offset - self.offset, 1 << 20))
                if not block:
                    raise BatchError(f"{self.path} became shorter while the job read it")
                self.hash.update(block)
                self.offset += len(block)
        return self.hash.hexdigest()


def check_unchanged(digest: InputDigest, checkpoint: Checkpoint, output: Path) -> None:
    """Refuse to resume over an input whose lines before the checkpoint are no longer the ones translated."""
    if checkpoint.offset > digest.path.stat().st_size:
        raise BatchError(f"{digest.path} is shorter than when {output} was checkpointed; use --restart to start "
                         "over")
    if checkpoint.input_sha256 and digest.up_to(checkpoint.offset) != checkpoint.input_sha256:
        raise BatchError(f"{digest.path} changed before line {checkpoint.line} since {output} was checkpointed "
                         "(its output would no longer match the input's lines); use --restart to start over")
    with digest.path.open("rb") as f:
        rest = _rest_of_line(f, checkpoint.offset)
    if rest.rstrip(b"\r\n"):
        raise BatchError(f"{digest.path} changed at line {checkpoint.line} since {output} was checkpointed (the line "
                         "had no line end then, and it goes on now: its output is of part of it); use --restart to "
                         "start over")


class Writer:
    """Appends records in input order; :meth:`commit` fsyncs them, then records them (and the digest of the input
    they cover) in the checkpoint."""

    def __init__(self, path: Path, checkpoint: Checkpoint, every: int, digest: InputDigest) -> None:
        self.state_path, self.every, self.digest = checkpoint_path(path), every, digest
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size < checkpoint.output_bytes:
            raise BatchError(f"{path} has {size} bytes, its checkpoint says {checkpoint.output_bytes} were "
                             "committed; use --restart to start over")
        self.file = path.open("r+b" if path.exists() else "wb")
        # The checkpoint this run starts from goes to disk before the output is cut to it: starting over (--restart,
        # or an output without its checkpoint) leaves no older checkpoint beside the new lines, whose length a resume
        # would cut them at, mid-line, before going on after an old line.
        checkpoint.save(self.state_path)
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
        self.pending.input_sha256 = self.digest.up_to(self.pending.offset)
        self.pending.save(self.state_path)
        self.committed, self.committed_at = replace(self.pending), time.monotonic()

    def close(self) -> None:
        self.commit()
        self.file.close()


