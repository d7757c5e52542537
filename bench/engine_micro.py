"""The serving engine alone, without gRPC: sentences/s and CPU time per sentence at a fixed number of requests in
flight.

    .venv/bin/python bench/engine_micro.py                  # the bundled model and the tiny one, greedy and beam 4
    .venv/bin/python bench/engine_micro.py --models bundled --sentences 300 --concurrency 64
    .venv/bin/python bench/engine_micro.py --models --reductions   # only the reductions: numpy against the graph
    PYTHONPATH=DIR .venv/bin/python bench/engine_micro.py --engine other_engine   # another Engine, to compare
    .venv/bin/python bench/engine_micro.py --mixed-lane-rows 0 128 --repeat 3   # lanes always by length, or not
    .venv/bin/python bench/engine_micro.py --models tiny --beams 1 --concurrency 64 256 1024 --max-batch-rows 1024

One sentence per request; ``--concurrency`` requests are kept in flight (a finished one is replaced at once). Two
models: the bundled ``de-en-bahdanau`` (the decoder's compute dominates) and a tiny one of negligible compute (widths
16, 400 pieces, ``max_output_tokens`` 12: what remains is the engine's own Python per sentence). The tiny model is
trained and exported once into ``runs/engine-micro-tiny/`` (ignored by git), with `attn-train translation` on the
test fixture as the test session does.

Reported per run: sentences/s (wall); CPU milliseconds per sentence (``time.process_time``: every thread of this
process, ONNX Runtime's and the submitting thread's included) and the engine thread's own (its Python, and the
ONNX Runtime calls it makes); the decoder's share of the wall time (the engine's ``compute_time`` metric, which
includes the search's reductions done with the step); the mean rows per decoder call; the wall time per sentence
outside the decoder; and the engine thread's CPU outside the encoder's and decoder's calls (its Python and numpy:
what stays on the CPU when a GPU runs the graphs). On a machine shared with other work the CPU times are the
steadier figures; ``--repeat`` keeps each setting's fastest run. Nothing is asserted; results go to stdout and, with
``--json``, to a file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402

from bench.arguments import non_negative_int, positive_int, writable_file  # noqa: E402
from server.artifacts import Manifest  # noqa: E402
from server.device import CPU, Device, choose  # noqa: E402
from server.engine import Engine, Limits  # noqa: E402
from server.errors import InvalidInput  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.translation import DecodeOptions, TranslationModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "de-en-bahdanau" / "1"
TINY_RUN = ROOT / "runs" / "engine-micro-tiny"
TINY = TINY_RUN / "tiny" / "1"
FIXTURE = ROOT / "tests" / "fixtures" / "ding-sample.txt"


def build_tiny() -> Path:
    """The negligible-compute model, trained for a dozen steps on the test fixture and exported (once)."""
    if (TINY / "manifest.json").exists():
        return TINY
    run = TINY_RUN / "run"
    subprocess.run([
        sys.executable, "-m", "training.cli", "translation", "--data", f"ding:{FIXTURE}", "--out", str(run),
        "--vocab-size", "400", "--emb-dim", "16", "--hidden-dim", "16", "--attn-dim", "16", "--max-steps", "12",
        "--valid-every", "1000", "--valid-bleu-sample", "10", "--max-tokens", "1000", "--device", "cpu",
        "--threads", "1",
    ], check=True, cwd=ROOT)
    from exporter.export import ExportOptions, export

    export(run / "best.pt", TINY, ExportOptions(name="tiny", parity_sentences=10, force=True))
    return TINY


def sentences(count: int, corpus: str) -> list[str]:
    """The Ding test split's full sentences (``corpus`` ding), or the fixture's sources, repeated up to ``count``."""
    from training.data.corpus import load_corpus, split

    pairs = split(load_corpus(corpus))["test"] if corpus == "ding" else load_corpus(corpus)
    seen = list(dict.fromkeys(p.source for p in pairs if p.sentence or corpus != "ding"))
    return [seen[i % len(seen)] for i in range(count)]


def drive(engine: Engine, items: list[Any], options: DecodeOptions, concurrency: int) -> tuple[float, float]:
    """Submits one item per request, ``concurrency`` in flight; (wall seconds, CPU seconds)."""
    slots = threading.Semaphore(concurrency)
    futures: list[Future[Any]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        slots.acquire()
        future = engine.submit([item], options)
        future.add_done_callback(lambda _: slots.release())
        futures.append(future)
    for future in futures:
        future.result()
    return time.perf_counter() - wall, time.process_time() - cpu


def load(directory: Path, texts: list[str], threads: int, device: Device) -> tuple[TranslationModel, list[Any]]:
    """The model and the items the engine decodes: a source's ids where the model says so (the multi-process
    split), else the prepared source. Texts the model cannot take (too many tokens) are left out."""
    model = TranslationModel(directory, Manifest.load(directory), device, threads=threads)
    items = []
    for text in texts:
        try:
            [source] = model.prepare([text])
        except InvalidInput:
            continue
        items.append(getattr(source, "ids", source))
    return model, items


def run(engine_class: type[Engine], model: TranslationModel, items: list[Any], options: DecodeOptions,
        concurrency: int, limits: Limits) -> dict[str, Any]:
    """One engine, warmed up on ``2 * concurrency`` items, then timed over all of them."""
    registry = CollectorRegistry()
    labels = {"model": model.name, "version": model.version}
    decoder, encoder = {**labels, "stage": "decoder"}, {**labels, "stage": "encoder"}

    def read() -> list[float]:  # the decoder's seconds and calls, the rows over its calls, the encoder's seconds
        return [registry.get_sample_value(name, where) or 0.0 for name, where in (
            ("attn_compute_duration_seconds_sum", decoder), ("attn_compute_duration_seconds_count", decoder),
            ("attn_batch_hypotheses_sum", labels), ("attn_compute_duration_seconds_sum", encoder))]

    engine = engine_class(model, limits, Metrics(registry))
    clock = time.pthread_getcpuclockid(engine._thread.ident or 0)  # the engine thread's CPU time
    try:
        drive(engine, items[: min(len(items), 2 * concurrency)], options, concurrency)
        before, engine_cpu = read(), time.clock_gettime(clock)
        wall, cpu = drive(engine, items, options, concurrency)
        engine_cpu = time.clock_gettime(clock) - engine_cpu
        seconds, calls, rows, encoding = (after - first for after, first in zip(read(), before))
    finally:
        engine.close()
    n = len(items)
    return {
        "model": model.name, "device": model.device.name if model.device else "", "beam": options.beam_size,
        "concurrency": concurrency, "mixed_lane_rows": limits.mixed_lane_rows,
        "max_batch_rows": limits.max_batch_rows, "sentences": n,
        "sentences_per_s": round(n / wall, 1), "cpu_ms_per_sentence": round(1000 * cpu / n, 3),
        "engine_thread_cpu_ms_per_sentence": round(1000 * engine_cpu / n, 3),
        "wall_s": round(wall, 3), "decoder_share": round(seconds / wall, 3), "decoder_calls": int(calls),
        "rows_per_call": round(rows / max(calls, 1), 1), "other_ms_per_sentence": round(1000 * (wall - seconds) / n, 3),
        # The engine thread's CPU outside the timed encoder and decoder calls (the decoder's time includes the
        # reductions done with the step): the scheduler's and the search's Python and numpy, what a GPU does not
        # take over. Exact where ONNX Runtime runs on the calling thread alone (one intra-op thread, the server's
        # setting on two cores); with more, their CPU is not the engine thread's and this comes out too low. On a
        # GPU the calls' time is mostly the device's, not the thread's CPU: not reported there.
        "engine_thread_outside_graphs_ms_per_sentence": round(1000 * (engine_cpu - seconds - encoding) / n, 3)
        if model.device is None or model.device.name == "cpu" else None,
    }


def measure(directory: Path, texts: list[str], concurrencies: list[int], beams: list[int], max_output: int,
            threads: int, engine_class: type[Engine] = Engine, repeat: int = 1,
            device: Device | None = None, mixed_lane_rows: list[int] | None = None,
            max_batch_rows: int = Limits().max_batch_rows) -> list[dict[str, Any]]:
    """Every setting ``repeat`` times (the fastest run is kept); several ``mixed_lane_rows`` take turns within each
    repetition, so that a noisy machine slows them alike."""
    model, items = load(directory, texts, threads, device or Device("cpu", [CPU], "bench"))
    limits = [Limits(max_batch_rows=max_batch_rows, mixed_lane_rows=m)
              for m in mixed_lane_rows or [Limits().mixed_lane_rows]]
    rows: list[dict[str, Any]] = []
    for beam in beams:
        options = DecodeOptions(beam_size=beam, max_output_tokens=max_output)
        for concurrency in concurrencies:
            runs = [run(engine_class, model, items, options, concurrency, chosen)
                    for _ in range(repeat) for chosen in limits]
            for chosen in limits:
                row = max((r for r in runs if r["mixed_lane_rows"] == chosen.mixed_lane_rows),
                          key=lambda r: r["sentences_per_s"])
                rows.append(row)
                _print(row, beam, concurrency, len(limits) > 1)
    return rows


def _print(row: dict[str, Any], beam: int, concurrency: int, mixed: bool) -> None:
    lanes = f" mixed lane up to {row['mixed_lane_rows']:>3} rows" if mixed else ""
    outside = row["engine_thread_outside_graphs_ms_per_sentence"]
    print(f"{row['model']:>16} beam {beam} x{concurrency:>4}{lanes}: {row['sentences_per_s']:>7} sentences/s, "
          f"CPU ms/sentence {row['cpu_ms_per_sentence']:>6} (engine thread "
          f"{row['engine_thread_cpu_ms_per_sentence']:>6}), decoder {row['decoder_share']:.0%} of the wall "
          f"time, {row['rows_per_call']} rows per call, {row['other_ms_per_sentence']} ms/sentence "
          "outside the decoder" + ("" if outside is None else
                                   f", engine thread outside the graphs {outside} ms/sentence"), flush=True)


def reductions(vocab: int = 8000, repeat: int = 20) -> list[dict[str, Any]]:
    """The search's reduction of (rows × vocab) log-probabilities on this CPU: numpy (argmax; argpartition and a
    sort) against the TopK graph on ONNX Runtime's CPU provider (server/reductions.py chooses by these)."""
    from server.reductions import Reduction, top_candidates

    graph = Reduction(Device("cpu", [CPU], "bench"), host_greedy=False)
    rng = np.random.default_rng(0)
    rows_out = []
    for rows in (64, 256, 1024):
        log_probs = rng.normal(size=(rows, vocab)).astype(np.float32)
        for width in (1, 8):
            timings = {}
            for name, reduce in (("numpy", top_candidates), ("graph", graph)):
                reduce(log_probs.copy(), width, [0, 2], 3)
                copies = [log_probs.copy() for _ in range(repeat)]
                started = time.perf_counter()
                for copy in copies:
                    reduce(copy, width, [0, 2], 3)
                timings[name] = round(1000 * (time.perf_counter() - started) / repeat, 3)
            rows_out.append({"rows": rows, "vocab": vocab, "width": width,
                             **{f"{name}_ms": ms for name, ms in timings.items()}})
            print(f"reduction of {rows:>5} x {vocab} to {width}: numpy {timings['numpy']:>8} ms, "
                  f"graph {timings['graph']:>8} ms", flush=True)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["bundled", "tiny"], choices=["bundled", "tiny"])
    parser.add_argument("--sentences", type=positive_int, default=600,
                        help="sentences per run (the tiny model: 4x as many)")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[64, 256])
    parser.add_argument("--beams", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--corpus", default="ding", help="ding (its test split's full sentences) or ding:PATH")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="ONNX Runtime intra-op threads (0: the server's)")
    parser.add_argument("--json", type=writable_file, help="also write the rows here")
    parser.add_argument("--engine", default="server.engine",
                        help="the module whose Engine is measured (another implementation, to compare)")
    parser.add_argument("--repeat", type=positive_int, default=1, help="runs per setting; the fastest is reported")
    parser.add_argument("--mixed-lane-rows", type=non_negative_int, nargs="+",
                        help="the engine's Limits.mixed_lane_rows (0: lanes always by source length); several "
                             "take turns")
    parser.add_argument("--max-batch-rows", type=positive_int, default=Limits().max_batch_rows,
                        help="the engine's Limits.max_batch_rows (ATTN_MAX_BATCH_ROWS): raise it with --concurrency "
                             "to see the engine's cost per sentence at the batches a GPU decodes")
    parser.add_argument("--reductions", action="store_true", help="also time the search's reductions alone")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU with I/O binding, as the server chooses it")
    args = parser.parse_args(argv)
    device = choose(args.device)
    engine_class = importlib.import_module(args.engine).Engine
    rows = reductions() if args.reductions else []
    for which in args.models:
        if which == "bundled":
            texts = sentences(args.sentences, args.corpus)
            rows += measure(BUNDLED, texts, args.concurrency, args.beams, 0, args.threads, engine_class, args.repeat,
                            device, args.mixed_lane_rows, args.max_batch_rows)
        else:
            texts = sentences(4 * args.sentences, args.corpus)
            rows += measure(build_tiny(), texts, args.concurrency, args.beams, 12, args.threads, engine_class,
                            args.repeat, device, args.mixed_lane_rows, args.max_batch_rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
