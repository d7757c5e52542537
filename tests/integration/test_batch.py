"""``attn batch`` against real servers (and a fake one that refuses): order, exactly-once after SIGKILL, shards,
retries, per-text errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client.cli import main
from tests.conftest import DING_SAMPLE
from tests.integration.serving import RunningServer, settings

REPO = Path(__file__).resolve().parents[2]


def _sentences(n: int) -> list[str]:
    """German headwords and phrases of the Ding fixture (repeated when n is larger than the fixture)."""
    heads = [line.split("::")[0].split("|")[0].split(";")[0].strip()
             for line in DING_SAMPLE.read_text(encoding="utf-8").splitlines() if "::" in line]
    heads = [h for h in heads if h]
    return [heads[i % len(heads)] for i in range(n)]


def _target(port: int) -> list[str]:
    return ["--target", f"127.0.0.1:{port}"]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _batch(port: int, *args: str) -> int:
    return main(["batch", *args, *_target(port), "--quiet"])


def test_a_full_run_writes_every_line_once_in_order_as_direct_calls_translate_it(
        running: RunningServer, tmp_path: Path) -> None:
    texts = _sentences(200)
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert _batch(running.port, str(source), "-o", str(out), "--beam", "2", "--batch-size", "16",
                  "--concurrency", "4", "--summary", str(summary)) == 0
    records = _records(out)
    assert [r["line"] for r in records] == list(range(1, 201))
    assert [r["text"] for r in records] == texts
    direct = []
    for start in range(0, len(texts), 25):  # other batches than the job's: the batch must not change the result
        request = pb.TranslateRequest(texts=texts[start : start + 25], options=pb.DecodingOptions(beam_size=2))
        direct.extend(running.stub.Translate(request, timeout=60).translations)
    for record, translation in zip(records, direct, strict=True):
        best = translation.hypotheses[0]
        assert record["translation"] == best.text and record["model"] == "tiny-de-en"
        assert record["hypotheses"][0]["score"] == pytest.approx(best.score, rel=1e-4, abs=1e-4)
        assert "error" not in record and "alignments" not in record["hypotheses"][0]
    report = json.loads(summary.read_text())
    assert report | {"seconds": 0, "lines_per_second": 0} == {
        "input": str(source), "output": str(out), "shard": "0/1", "complete": True, "error": None, "done": 200,
        "ok": 200, "failed": 0, "skipped": 0, "total": 200, "failed_total": 0, "retries": 0, "seconds": 0,
        "lines_per_second": 0}

    # Running the finished job again does nothing.
    before = out.read_bytes()
    assert _batch(running.port, str(source), "-o", str(out), "--beam", "2", "--summary", str(summary)) == 0
    assert out.read_bytes() == before
    assert json.loads(summary.read_text())["skipped"] == 200 and json.loads(summary.read_text())["done"] == 0
    # ... and other decoding settings do not silently mix into the same output.
    assert _batch(running.port, str(source), "-o", str(out), "--beam", "3") == 2
    assert out.read_bytes() == before


def test_jsonl_with_ids_alignments_and_lines_that_fail(running: RunningServer, tmp_path: Path) -> None:
    rows = [json.dumps({"id": f"s{i}", "text": text}) for i, text in enumerate(_sentences(6))]
    rows[2] = json.dumps({"id": "blank", "text": "   "})  # INVALID_ARGUMENT: must not fail its batch neighbours
    rows[4] = '{"id": "broken", "text": '  # not JSON: written as a failed line, not dropped
    source, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    assert _batch(running.port, str(source), "-o", str(out), "--attention", "words", "--batch-size", "8",
                  "--summary", str(summary)) == 0
    records = _records(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2]["id"] == "blank" and records[2]["error"]["code"] == "INVALID_ARGUMENT"
    assert records[4]["error"]["code"] == "INVALID_INPUT" and "id" not in records[4]
    for record in (records[i] for i in (0, 1, 3, 5)):
        assert record["id"] == f"s{record['line'] - 1}" and "error" not in record
        hyp = record["hypotheses"][0]
        assert len(hyp["word_attention"]) == len(hyp["words"]) and "attention" not in hyp
        assert all(len(row) == len(record["source_words"]) for row in hyp["word_attention"])
        assert all(0 <= a["source_word"] < len(record["source_words"]) for a in hyp["alignments"])
    report = json.loads(summary.read_text())
    assert (report["done"], report["ok"], report["failed"], report["failed_total"]) == (6, 4, 2, 2)


def test_an_unknown_model_stops_the_job_instead_of_failing_every_line(running: RunningServer, tmp_path: Path) -> None:
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("Guten Morgen.\n", encoding="utf-8")
    assert _batch(running.port, str(source), "-o", str(out), "--model", "nope", "--summary", str(summary)) == 1
    assert out.read_text() == ""
    report = json.loads(summary.read_text())
    assert not report["complete"] and report["error"].startswith("NOT_FOUND")


def test_a_job_that_stopped_before_its_first_line_resumes_with_corrected_settings(
        fake: tuple[RefusingTranslator, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The stop says "run the same command again to resume" once the problem is fixed; when the problem was the
    # command (a misspelt --model), the fixed command was refused (exit 2: other settings) though no line had been
    # written under the old ones, and only --restart went on.
    servicer, port = fake
    servicer.refusals = [grpc.StatusCode.NOT_FOUND]
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("eins\nzwei\n", encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--model", "tiny-de-nu") == 1
    assert "NOT_FOUND" in capsys.readouterr().err and out.read_text() == ""
    assert _batch(port, str(source), "-o", str(out), "--model", "tiny-de-en") == 0
    assert [r["translation"] for r in _records(out)] == ["EINS", "ZWEI"]
    assert json.loads((tmp_path / "out.jsonl.checkpoint.json").read_text())["job"]["model"] == "tiny-de-en"
    # Once lines are written, other settings are refused as before.
    assert _batch(port, str(source), "-o", str(out), "--model", "tiny-de-nu") == 2


def test_two_shards_cover_the_file_exactly_once(running: RunningServer, tmp_path: Path) -> None:
    texts = _sentences(41)
    source = tmp_path / "in.tsv"
    source.write_text("id\tsentence\n" + "".join(f"k{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    for shard in ("0/2", "1/2"):
        assert _batch(running.port, str(source), "-o", str(tmp_path / "out.jsonl"), "--column", "sentence",
                      "--shard", shard, "--batch-size", "4", "--summary", str(tmp_path / "summary.json")) == 0
    parts = [_records(tmp_path / f"out.shard-{i}-of-2.jsonl") for i in range(2)]
    # One summary per shard, named as the outputs are: shards given the same --summary overwrote each other's.
    summaries = [json.loads((tmp_path / f"summary.shard-{i}-of-2.json").read_text()) for i in range(2)]
    assert [(s["shard"], s["done"]) for s in summaries] == [("0/2", len(parts[0])), ("1/2", len(parts[1]))]
    for i, part in enumerate(parts):
        assert part and all(r["line"] % 2 == i for r in part)
        assert [r["line"] for r in part] == sorted(r["line"] for r in part)
    merged = sorted(parts[0] + parts[1], key=lambda r: r["line"])
    assert [r["line"] for r in merged] == list(range(2, 43))  # line 1 is the header
    assert [(r["id"], r["text"]) for r in merged] == [(f"k{i}", t) for i, t in enumerate(texts)]
    # The README's merge, which streams (jq -s held a whole job's output in memory).
    files = [str(tmp_path / f"out.shard-{i}-of-2.jsonl") for i in range(2)]
    streamed = subprocess.run(["sort", "-m", "-k2,2n", *files], env={**os.environ, "LC_ALL": "C"},
                              capture_output=True, text=True, check=True).stdout
    assert [json.loads(line) for line in streamed.splitlines()] == merged


@pytest.fixture()
def slow_server(slow_models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(slow_models_dir, workers=1))
    yield server
    server.close()


def test_a_job_killed_with_sigkill_resumes_without_losing_or_repeating_a_line(
        slow_server: RunningServer, tmp_path: Path) -> None:
    texts = _sentences(300)
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    state = tmp_path / "out.jsonl.checkpoint.json"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "client.cli", "batch", str(source), "-o", str(out), "--beam", "1",
               "--max-output-tokens", "8", "--batch-size", "2", "--concurrency", "2", "--checkpoint-every", "10",
               "--summary", str(summary), *_target(slow_server.port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        committed = 0
        # Kill once something is committed, preferably while written lines wait for their commit.
        while process.poll() is None and time.monotonic() < deadline:
            if state.exists():
                committed = json.loads(state.read_text())["output_bytes"]
                if committed and (out.stat().st_size > committed or time.monotonic() > deadline - 50):
                    break
            time.sleep(0.005)
        assert process.poll() is None, "the job finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
        assert process.stderr is not None
        process.stderr.close()
    done_before = json.loads(state.read_text())["records"]
    assert 0 < done_before < 300 and out.stat().st_size >= committed

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(out)
    assert [r["line"] for r in records] == list(range(1, 301))
    assert [r["text"] for r in records] == texts and not any("error" in r for r in records)
    report = json.loads(summary.read_text())
    assert (report["skipped"], report["done"], report["total"]) == (done_before, 300 - done_before, 300)


class RefusingTranslator(pb_grpc.AttentionServiceServicer):
    """Refuses the next calls with the codes in ``refusals``, goes down (UNAVAILABLE) for good after ``serve``
    answers, and otherwise 'translates' by upper-casing."""

    def __init__(self) -> None:
        self.refusals: list[grpc.StatusCode] = []
        self.serve: int | None = None
        self.calls = self.answered = 0
        self.delay = 0.0  # seconds each call takes, so that a job is still running when a test stops it
        self.max_texts: int | None = None  # refuse larger requests, as a server with a smaller ATTN_MAX_TEXTS
        self.peers: list[str] = []  # the client address ("ipv4:127.0.0.1:PORT") of every call: its connection

    def Translate(self, request: pb.TranslateRequest, context: grpc.ServicerContext) -> pb.TranslateResponse:
        self.calls += 1
        self.peers.append(context.peer())
        time.sleep(self.delay)
        if self.max_texts is not None and len(request.texts) > self.max_texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.texts)} texts in one request; the limit is "
                          f"{self.max_texts}")
        if any(text == "kaputt" for text in request.texts):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kaputt")
        if self.refusals:
            context.abort(self.refusals.pop(0), "busy")
        if self.serve is not None and self.answered >= self.serve:
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.answered += 1
        return pb.TranslateResponse(model="fake", version="1", translations=[
            pb.Translation(hypotheses=[pb.Hypothesis(text=text.upper(), score=-1.0)]) for text in request.texts])


@pytest.fixture()
def fake() -> Iterator[tuple[RefusingTranslator, int]]:
    servicer = RefusingTranslator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AttentionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_refusals_are_retried_with_backoff_until_they_succeed(fake: tuple[RefusingTranslator, int],
                                                              tmp_path: Path) -> None:
    servicer, port = fake
    servicer.refusals = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3 + [grpc.StatusCode.UNAVAILABLE]
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("eins\nzwei\ndrei\nvier\nfünf\n", encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "2", "--concurrency", "1",
                  "--summary", str(summary)) == 0
    assert [r["translation"] for r in _records(out)] == ["EINS", "ZWEI", "DREI", "VIER", "FÜNF"]
    report = json.loads(summary.read_text())
    assert (report["retries"], report["ok"], report["failed"]) == (4, 5, 0)
    assert servicer.calls == 4 + 3


def test_a_call_the_server_cancelled_is_retried_not_the_end_of_the_job(fake: tuple[RefusingTranslator, int],
                                                                      tmp_path: Path) -> None:
    """A server that starts to drain ends the calls that reach it before its GOAWAY reaches the client with CANCELLED
    (gRPC's core, grpc/grpc#41785), without having run them: the job retries them as it retries UNAVAILABLE."""
    servicer, port = fake
    servicer.refusals = [grpc.StatusCode.CANCELLED]
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("eins\nzwei\n", encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--concurrency", "1", "--summary", str(summary)) == 0
    assert [r["translation"] for r in _records(out)] == ["EINS", "ZWEI"]
    assert json.loads(summary.read_text())["retries"] == 1


def test_exhausted_retries_stop_the_job_and_a_rerun_resumes(fake: tuple[RefusingTranslator, int],
                                                             tmp_path: Path) -> None:
    servicer, port = fake
    servicer.serve = 1  # the first batch is answered, then the server is down
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("eins\nzwei\ndrei\nvier\n", encoding="utf-8")
    command = [str(source), "-o", str(out), "--batch-size", "2", "--concurrency", "1", "--max-retries", "2",
               "--summary", str(summary)]
    assert _batch(port, *command) == 1
    report = json.loads(summary.read_text())
    assert not report["complete"] and report["error"].startswith("UNAVAILABLE after 3 attempts")
    assert [r["line"] for r in _records(out)] == [1, 2] and report["retries"] == 2
    servicer.serve = None  # back up: the same command resumes after line 2
    assert _batch(port, *command) == 0
    assert [r["translation"] for r in _records(out)] == ["EINS", "ZWEI", "DREI", "VIER"]
    report = json.loads(summary.read_text())
    assert (report["skipped"], report["done"], report["total"]) == (2, 2, 4)


def test_a_resume_over_an_edited_input_is_refused(fake: tuple[RefusingTranslator, int], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Resuming skips the lines before the checkpoint by their byte offset: over an edited input the output would
    # hold translations of lines that are no longer there, joined to the wrong line numbers.
    servicer, port = fake
    servicer.serve = 1
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("eins\nzwei\ndrei\nvier\n", encoding="utf-8")
    command = [str(source), "-o", str(out), "--batch-size", "2", "--concurrency", "1", "--max-retries", "0"]
    assert _batch(port, *command) == 1
    servicer.serve = None
    source.write_text("null\neins\nzwei\ndrei\nvier\n", encoding="utf-8")  # a line put in front
    capsys.readouterr()
    assert _batch(port, *command) == 2
    assert "changed before line 2" in capsys.readouterr().err
    assert [r["translation"] for r in _records(out)] == ["EINS", "ZWEI"]  # left as it was
    assert _batch(port, *command, "--restart") == 0
    assert [r["translation"] for r in _records(out)] == ["NULL", "EINS", "ZWEI", "DREI", "VIER"]


def test_calls_take_turns_over_connections_of_their_own(fake: tuple[RefusingTranslator, int], tmp_path: Path) -> None:
    # A server with several front-ends gives each connection to one of them: one connection would reach one.
    servicer, port = fake
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("".join(f"satz {i}\n" for i in range(12)), encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "1", "--concurrency", "3",
                  "--connections", "3") == 0
    assert len(_records(out)) == 12
    assert sorted(Counter(servicer.peers).values()) == [4, 4, 4]

    servicer.peers.clear()  # never more connections than requests in flight
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "1", "--concurrency", "2", "--restart") == 0
    assert sorted(Counter(servicer.peers).values()) == [6, 6]


def test_sigterm_commits_what_is_written_and_says_so_in_the_summary(fake: tuple[RefusingTranslator, int],
                                                                     tmp_path: Path) -> None:
    # A Kubernetes pod is stopped with SIGTERM: the job stops as on Ctrl-C instead of dying with its last lines
    # uncommitted and no summary.
    servicer, port = fake
    servicer.delay = 0.01
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    state = tmp_path / "out.jsonl.checkpoint.json"
    source.write_text("".join(f"satz {i}\n" for i in range(2000)), encoding="utf-8")
    command = [sys.executable, "-m", "client.cli", "batch", str(source), "-o", str(out), "--batch-size", "1",
               "--concurrency", "1", "--checkpoint-every", "100000", "--summary", str(summary), "--quiet",
               *_target(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
            time.sleep(0.005)
        assert process.poll() is None, "the job ended before it could be stopped"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 143
    finally:
        process.kill()
        process.wait(30)
        assert process.stderr is not None
        process.stderr.close()
    report = json.loads(summary.read_text())
    assert (report["complete"], report["error"]) == (False, "terminated")
    committed = json.loads(state.read_text())
    assert 0 < committed["records"] == report["total"] == report["done"] < 2000
    assert out.stat().st_size == committed["output_bytes"]  # every line written is committed

    servicer.delay = 0.0
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "50") == 0
    assert [r["line"] for r in _records(out)] == list(range(1, 2001))


def test_a_batch_larger_than_the_server_takes_is_split_in_halves_not_sent_line_by_line(
        fake: tuple[RefusingTranslator, int], tmp_path: Path) -> None:
    servicer, port = fake
    servicer.max_texts = 4
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("".join(f"satz {i}\n" for i in range(16)), encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "8", "--concurrency", "1") == 0
    assert [r["translation"] for r in _records(out)] == [f"SATZ {i}" for i in range(16)]
    assert servicer.calls == 2 * 3  # per batch of 8: refused, then two of 4

    # A bad text still fails only its own line.
    servicer.calls, servicer.max_texts = 0, None
    source.write_text("eins\nzwei\nkaputt\nvier\n", encoding="utf-8")
    assert _batch(port, str(source), "-o", str(out), "--batch-size", "4", "--restart") == 0
    records = _records(out)
    assert [r.get("translation") for r in records] == ["EINS", "ZWEI", None, "VIER"]
    assert records[2]["error"] == {"code": "INVALID_ARGUMENT", "message": "kaputt"}


def test_a_message_over_a_size_limit_fails_its_lines_instead_of_stopping_the_job(tmp_path: Path) -> None:
    # gRPC refuses a request over the server's receive limit with RESOURCE_EXHAUSTED, the code of a full queue; but
    # the same texts would be refused again: retrying them stopped every run of the job at the same batch.
    servicer = RefusingTranslator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.max_receive_message_length", 200)])
    pb_grpc.add_AttentionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
        source.write_text(f"eins\nzwei\n{'x' * 300}\nvier\n", encoding="utf-8")
        assert _batch(port, str(source), "-o", str(out), "--batch-size", "4", "--max-retries", "1") == 0
    finally:
        server.stop(None)
    records = _records(out)
    assert [r.get("translation") for r in records] == ["EINS", "ZWEI", None, "VIER"]
    assert records[2]["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "larger than max" in records[2]["error"]["message"]


def test_an_output_that_cannot_be_written_stops_the_job_with_its_reason_and_a_summary(
        fake: tuple[RefusingTranslator, int], tmp_path: Path) -> None:
    # A full disk (here: a file size limit, which Python turns into EFBIG) ended the job with a traceback and no
    # summary; it stops as any early end does (exit 1, the reason, the summary), and a rerun resumes from its last
    # commit.
    _, port = fake
    source, out, summary = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "summary.json"
    source.write_text("".join(f"satz {i}\n" for i in range(1000)), encoding="utf-8")
    limit = 20_000  # bytes: some 130 lines
    # The limit is set by the child itself, not in a preexec_fn: Python run between fork and exec, in a process
    # whose gRPC threads (the fake server's) may hold a lock at the fork, can hang the child.
    small_files = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
                   "runpy.run_module('client.cli', run_name='__main__', alter_sys=True)")
    command = [sys.executable, "-c", small_files, "batch", str(source), "-o", str(out), "--checkpoint-every", "40",
               "--summary", str(summary), "--quiet", *_target(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"stopped: {out}: File too large" in done.stderr
    report = json.loads(summary.read_text())
    assert (report["complete"], report["error"]) == (False, f"{out}: File too large")
    committed = json.loads((tmp_path / "out.jsonl.checkpoint.json").read_text())
    assert 0 < committed["records"] == report["total"] < 1000 and committed["output_bytes"] <= limit

    assert _batch(port, str(source), "-o", str(out)) == 0
    assert [r["line"] for r in _records(out)] == list(range(1, 1001))
