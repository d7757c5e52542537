"""``attn batch`` without a server: the JSONL/TSV/text readers, resuming from an offset, shards, the checkpointed
writer, and the small helpers."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from client.batch import BACKOFF_CAP, Progress, backoff, parse_shard
from client.batch_io import (
    BatchError,
    Checkpoint,
    InputDigest,
    Item,
    Writer,
    batches,
    check_unchanged,
    checkpoint_path,
    count_inputs,
    detect_format,
    read_items,
    shard_path,
)


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(("name", "fmt"), [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.json", "jsonl"),
                                           ("a.tsv", "tsv"), ("a.tab", "tsv"), ("a.txt", "text"), ("a", "text")])
def test_the_format_follows_the_extension(name: str, fmt: str) -> None:
    assert detect_format(Path(name)) == fmt
    assert detect_format(Path(name), "tsv") == "tsv"


def test_text_lines_keep_their_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.txt", "\ufeffeins\r\n\n  \nzwei\tdrei\nvier")  # BOM, CRLF, no final newline
    items = list(read_items(path, "text"))
    assert [(i.line, i.text, i.id, i.error) for i in items] == [
        (1, "eins", None, None), (4, "zwei\tdrei", None, None), (5, "vier", None, None)]
    assert items[-1].end == path.stat().st_size
    assert count_inputs(path, "text", None, (0, 1)) == 3


def test_lines_of_unicode_whitespace_are_blank_too(tmp_path: Path) -> None:
    # The server refuses such a text as "empty or only whitespace": a line a user sees as blank was a failed line.
    path = _write(tmp_path, "in.txt", "\ufeff\neins\n\u00a0\n\u3000 \u2003\nzwei\u00a0\n".encode() + b"\xff\n")
    items = list(read_items(path, "text"))
    assert [(i.line, i.text) for i in items] == [(2, "eins"), (5, "zwei\u00a0"), (6, "")]
    assert items[-1].error is not None and "utf-8" in items[-1].error  # not UTF-8: a failed line, never skipped
    assert count_inputs(path, "text", None, (0, 1)) == 3


def test_jsonl_reads_text_and_id_and_turns_bad_lines_into_errors(tmp_path: Path) -> None:
    lines = ['{"text": "eins", "id": 7}', '{"text": "zwei"}', "not json", '["text"]', '{"id": "x"}',
             '{"satz": "drei", "key": "k"}', "", '{"text": "f\\u00fcnf", "id": {"a": 1}}']
    path = _write(tmp_path, "in.jsonl", "\n".join(lines) + "\n")
    items = list(read_items(path, "jsonl"))
    assert [(i.line, i.text, i.id) for i in items if i.error is None] == [
        (1, "eins", 7), (2, "zwei", None), (8, "fünf", {"a": 1})]
    errors = {i.line: i.error for i in items if i.error is not None}
    assert sorted(errors) == [3, 4, 5, 6]
    assert "not a JSON object" in errors[4] and "no string field 'text'" in errors[5]
    custom = list(read_items(path, "jsonl", column="satz", id_column="key"))
    assert [(i.line, i.text, i.id) for i in custom if i.error is None] == [(6, "drei", "k")]


def test_a_failed_line_keeps_the_id_it_has(tmp_path: Path) -> None:
    """Output joined back to the input by id must find the failed lines too."""
    jsonl = _write(tmp_path, "in.jsonl", '{"id": "x"}\n{"text": 5, "id": 2}\n{"text": "\\ud800", "id": 3}\nnot json\n')
    assert [(i.id, i.error is not None) for i in read_items(jsonl, "jsonl")] == [
        ("x", True), (2, True), (3, True), (None, True)]
    tsv = _write(tmp_path, "in.tsv", "id\tsentence\na1\n")
    (item,) = read_items(tsv, "tsv", column="sentence")
    assert (item.id, item.error) == ("a1", "line 2: only 1 column(s), the text is in column 2")


def test_a_jsonl_line_with_a_lone_surrogate_escape_is_a_failed_line(tmp_path: Path) -> None:
    # Valid JSON, but "\ud800" alone is no character: no request or UTF-8 output can hold it.
    lines = ['{"text": "eins"}', '{"text": "a\\ud800b"}', '{"text": "drei", "id": ["x", {"\\udc00": 1}]}',
             '{"text": "vier", "id": "\\ud83d\\ude00"}']  # a surrogate pair is one character: fine
    items = list(read_items(_write(tmp_path, "in.jsonl", "\n".join(lines) + "\n"), "jsonl"))
    assert [(i.line, i.text, i.id) for i in items if i.error is None] == [(1, "eins", None), (4, "vier", "😀")]
    errors = {i.line: i.error for i in items if i.error is not None}
    assert "field 'text' holds a lone surrogate" in errors[2] and "field 'id' holds a lone surrogate" in errors[3]


def test_tsv_takes_the_first_column_or_a_named_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.tsv", "eins\tone\nzwei\n")
    assert [(i.line, i.text) for i in read_items(path, "tsv")] == [(1, "eins"), (2, "zwei")]
    path = _write(tmp_path, "h.tsv", "id\tde\ten\na\tEins\tOne\nb\tZwei\n\nc\n")
    items = list(read_items(path, "tsv", column="de"))
    assert [(i.line, i.id, i.text, i.error) for i in items[:2]] == [(2, "a", "Eins", None), (3, "b", "Zwei", None)]
    assert items[2].line == 5 and "only 1 column(s), the text is in column 2" in (items[2].error or "")
    assert count_inputs(path, "tsv", "de", (0, 1)) == 3
    with pytest.raises(BatchError, match="no column 'text'"):
        list(read_items(path, "tsv", column="text"))


def test_reading_resumes_after_an_offset_and_keeps_the_tsv_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "h.tsv", "id\tde\na\tEins\nb\tZwei\nc\tDrei\n")
    first, second, third = read_items(path, "tsv", column="de")
    assert list(read_items(path, "tsv", column="de", start=(first.line, first.end))) == [second, third]
    assert list(read_items(path, "tsv", column="de", start=(third.line, third.end))) == []


def test_shards_split_the_lines_by_number(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.txt", "".join(f"t{i}\n" for i in range(1, 11)))
    shards = [[i.line for i in read_items(path, "text", shard=(k, 3))] for k in range(3)]
    assert shards == [[3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert [count_inputs(path, "text", None, (k, 3)) for k in range(3)] == [3, 4, 3]


def test_shard_options_and_output_names() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(bad)
    assert shard_path(Path("o/out.jsonl"), (0, 1)) == Path("o/out.jsonl")
    assert shard_path(Path("o/out.jsonl"), (1, 4)) == Path("o/out.shard-1-of-4.jsonl")
    assert shard_path(Path("o/part-{i}-{n}.jsonl"), (1, 4)) == Path("o/part-1-4.jsonl")
    assert shard_path(Path("o/shard-{i}/out.jsonl"), (1, 4)) == Path("o/shard-1/out.jsonl")  # --help: "the path"
    assert checkpoint_path(Path("o/out.jsonl")) == Path("o/out.jsonl.checkpoint.json")


def test_batches_and_backoff() -> None:
    items = [Item(line, line) for line in range(1, 6)]
    assert [[i.line for i in b] for b in batches(items, 2)] == [[1, 2], [3, 4], [5]]
    for attempt in range(12):
        delay = min(BACKOFF_CAP, 0.1 * 2**attempt)
        assert delay / 2 <= backoff(attempt) <= delay


def test_the_writer_commits_in_chunks_and_a_reopen_drops_the_uncommitted_tail(tmp_path: Path) -> None:
    out, source = tmp_path / "out.jsonl", _write(tmp_path, "in.txt", "x" * 40)
    writer = Writer(out, Checkpoint({"k": 1}), every=2, digest=InputDigest(source))
    writer.write(Item(1, 10), [{"line": 1}])
    assert Checkpoint.load(checkpoint_path(out)) == Checkpoint({"k": 1})  # one line: not yet committed
    writer.write(Item(3, 30), [{"line": 2}, {"line": 3, "error": {"code": "X", "message": ""}}])
    state = Checkpoint.load(checkpoint_path(out))
    assert state is not None and (state.line, state.offset, state.records, state.failed) == (3, 30, 3, 1)
    assert state.output_bytes == out.stat().st_size and state.job == {"k": 1}
    writer.write(Item(4, 40), [{"line": 4}])  # written, not committed: as if killed now
    writer.file.flush()
    assert out.stat().st_size > state.output_bytes
    resumed = Writer(out, state, every=2, digest=InputDigest(source))
    assert out.stat().st_size == state.output_bytes
    resumed.write(Item(4, 40), [{"line": 4}])
    resumed.close()
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_starting_over_replaces_the_old_checkpoint_before_the_output_is_rewritten(tmp_path: Path) -> None:
    """``--restart`` (or a first run over an old output) truncates the output and writes new lines in its place: the
    checkpoint on disk must no longer speak of the old lines by then. A run killed before its first commit left the
    old checkpoint beside new bytes; the next resume cut those at the old length, mid-line, and went on after the old
    line: a torn JSON line, a lost line, and a summary saying complete."""
    out, source = tmp_path / "out.jsonl", _write(tmp_path, "in.txt", "eins\nzwei\ndrei\nvier\n")
    old = Writer(out, Checkpoint({"k": 1}), every=1, digest=InputDigest(source))
    old.write(Item(1, 5), [{"line": 1, "translation": "ONE"}])
    old.close()
    restarted = Writer(out, Checkpoint({"k": 1}), every=1000, digest=InputDigest(source))
    restarted.write(Item(2, 10), [{"line": 1, "translation": "one, from a newer model"}, {"line": 2}])
    restarted.file.flush()  # the buffer reached the disk, the commit did not come: killed here
    state = Checkpoint.load(checkpoint_path(out))
    assert state is not None and (state.line, state.output_bytes, state.records) == (0, 0, 0)
    resumed = Writer(out, state, every=1000, digest=InputDigest(source))
    resumed.write(Item(4, 20), [{"line": n} for n in (1, 2, 3, 4)])
    resumed.close()
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_checkpoint_that_points_past_the_output_is_refused(tmp_path: Path) -> None:
    out = _write(tmp_path, "out.jsonl", "{}\n")
    with pytest.raises(BatchError, match="--restart"):
        Writer(out, Checkpoint({}, output_bytes=100), every=1, digest=InputDigest(out))
    checkpoint_path(out).write_text("{")
    with pytest.raises(BatchError, match="unreadable checkpoint"):
        Checkpoint.load(checkpoint_path(out))


def test_a_checkpoint_holds_the_digest_of_the_input_it_covers_and_a_resume_checks_it(tmp_path: Path) -> None:
    source = _write(tmp_path, "in.txt", "eins\nzwei\ndrei\n")
    out = tmp_path / "out.jsonl"
    writer = Writer(out, Checkpoint({}), every=1, digest=InputDigest(source))
    writer.write(Item(1, 5), [{"line": 1}])
    writer.write(Item(2, 10), [{"line": 2}])
    writer.close()
    state = Checkpoint.load(checkpoint_path(out))
    assert state is not None and state.input_sha256 == hashlib.sha256(b"eins\nzwei\n").hexdigest()
    check_unchanged(InputDigest(source), state, out)  # the same input resumes

    source.write_text("eins\nzwei\ndrei\nvier\n")  # lines added after the checkpoint: resumes too
    check_unchanged(InputDigest(source), state, out)
    source.write_text("eins\nZWEI\ndrei\n")  # a line before it edited, the length the same
    with pytest.raises(BatchError, match="changed before line 2 .*--restart"):
        check_unchanged(InputDigest(source), state, out)
    source.write_text("eins\n")
    with pytest.raises(BatchError, match="shorter"):
        check_unchanged(InputDigest(source), state, out)
    # A checkpoint written before digests were kept resumes as before (by position).
    check_unchanged(InputDigest(source), Checkpoint({}, line=1, offset=5), out)


def test_the_progress_line_shows_position_rate_and_eta() -> None:
    progress = Progress(total=100, skipped=20, quiet=True)
    progress.advance([{"line": 1}, {"line": 2, "error": {}}])
    line = progress.line()
    assert line.startswith("attn batch: 22/100 lines (22.0%), ") and "lines/s, ETA " in line
    assert line.endswith(", 1 failed")


def test_batch_refuses_json_which_only_the_printing_commands_take(capsys: pytest.CaptureFixture[str]) -> None:
    """``attn batch`` writes JSONL whatever it is told, so a ``--json`` it accepted would do nothing."""
    from client.cli import parser

    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["batch", "in.txt", "-o", "out.jsonl", "--json"])
    assert exit_.value.code == 2 and "unrecognized arguments: --json" in capsys.readouterr().err
    for argv in (["translate", "Hallo"], ["caption", "x.png"], ["models"], ["health"]):
        assert parser().parse_args([*argv, "--json"]).json, argv


def test_a_summary_or_output_that_cannot_be_written_fails_the_start(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 with one line before any line is translated (no server answers here), not a traceback after the job."""
    from client.cli import main

    source = _write(tmp_path, "in.txt", "Hallo\n")
    blocker = _write(tmp_path, "file", "")  # a file where a folder would have to be
    nowhere = ["--target", "127.0.0.1:1", "--max-retries", "0", "--quiet"]
    assert main(["batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--summary", str(blocker / "s.json"),
                 *nowhere]) == 2
    assert capsys.readouterr().err.startswith(f"attn batch: --summary {blocker / 's.json'}: cannot write")
    assert main(["batch", str(source), "-o", str(blocker / "out.jsonl"), *nowhere]) == 2
    assert capsys.readouterr().err.startswith(f"attn batch: {blocker / 'out.jsonl'}: cannot write")
    # A summary whose folder is missing gets it, as the output does (the job then stops: no server).
    assert main(["batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--summary",
                 str(tmp_path / "new" / "s.json"), *nowhere]) == 1
    assert json.loads((tmp_path / "new" / "s.json").read_text())["complete"] is False


def test_an_output_or_summary_that_is_the_input_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The output is truncated to its committed length (0 on a first run) before the input is read: ``-o`` naming the
    input erased it and ended "complete" with no line; a summary naming the input or the output overwrote it."""
    from client.cli import main

    source = _write(tmp_path, "in.txt", "Hallo\n")
    (tmp_path / "link.txt").symlink_to(source)
    nowhere = ["--target", "127.0.0.1:1", "--max-retries", "0", "--quiet"]
    for extra in (["-o", str(source)], ["-o", str(tmp_path / "link.txt")],
                  ["-o", str(tmp_path / "out.jsonl"), "--summary", str(source)],
                  ["-o", str(tmp_path / "out.jsonl"), "--summary", str(tmp_path / "out.jsonl")]):
        assert main(["batch", str(source), *extra, *nowhere]) == 2, extra
        assert "is the same file as" in capsys.readouterr().err
        assert source.read_text() == "Hallo\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_an_input_that_is_no_regular_file_is_refused_for_what_it_is(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A pipe (``attn batch <(zcat in.txt.gz)``, a FIFO) or a folder was refused as "no such file": the user looks for
    a typo in a path that exists. The job reads its input more than once and resumes at a byte offset, so it needs a
    regular file, and says so."""
    import os

    from client.cli import main

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    nowhere = ["-o", str(tmp_path / "out.jsonl"), "--target", "127.0.0.1:1", "--max-retries", "0", "--quiet"]
    assert main(["batch", str(fifo), *nowhere]) == 2
    assert capsys.readouterr().err == (f"attn batch: {fifo}: not a regular file (a pipe?): the job reads its input "
                                       "more than once and resumes at a byte offset; write it to a file first\n")
    assert main(["batch", str(tmp_path), *nowhere]) == 2
    assert capsys.readouterr().err == f"attn batch: {tmp_path}: is a folder, not a file\n"
    assert main(["batch", str(tmp_path / "missing.txt"), *nowhere]) == 2
    assert capsys.readouterr().err == f"attn batch: {tmp_path / 'missing.txt'}: no such file\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_resume_after_a_last_line_without_its_line_end_keeps_the_line_numbers(tmp_path: Path) -> None:
    # The checkpoint of a job over "eins\nzwei" (no line end: a file still being written, or one edited without one)
    # ends at "zwei"'s last byte. Once the input goes on ("\ndrei\n" appended), the "\n" that ends line 2 was read as
    # a line of its own: "drei" came out as line 4, and with --shard in the shard of the wrong worker.
    path = _write(tmp_path, "in.txt", "eins\nzwei")
    first, second = read_items(path, "text")
    assert (second.line, second.end) == (2, 9)
    with path.open("ab") as f:
        f.write(b"\ndrei\nvier\n")
    resumed = list(read_items(path, "text", start=(second.line, second.end)))
    assert [(i.line, i.text) for i in resumed] == [(3, "drei"), (4, "vier")]
    assert [i.line for i in read_items(path, "text", shard=(1, 2), start=(second.line, second.end))] == [3]
    assert [(i.line, i.text) for i in read_items(path, "text")][2:] == [(i.line, i.text) for i in resumed]


def test_a_last_line_without_its_line_end_that_grew_since_its_checkpoint_is_a_changed_input(tmp_path: Path) -> None:
    # "zwei" was translated while the file ended there; had it gone on ("zweimal\n"), the output would hold the
    # translation of a line that is no longer in the input.
    source = _write(tmp_path, "in.txt", "eins\nzwei")
    state = Checkpoint({}, line=2, offset=9, input_sha256=hashlib.sha256(b"eins\nzwei").hexdigest())
    out = tmp_path / "out.jsonl"
    source.write_bytes(b"eins\nzwei\r\ndrei\n")  # only its line end added: resumes
    check_unchanged(InputDigest(source), state, out)
    source.write_bytes(b"eins\nzweimal\ndrei\n")
    with pytest.raises(BatchError, match="changed at line 2 .*--restart"):
        check_unchanged(InputDigest(source), state, out)
