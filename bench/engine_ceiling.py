"""One engine process's ceiling: the sentences/s the server's engine process answers when no front-end limits it.

    .venv/bin/python bench/engine_ceiling.py            # the negligible-compute model and the bundled one, here
    .venv/bin/python bench/engine_ceiling.py --model models/de-en-bahdanau/1 --device cuda --submitters 4 5

Under load the front-ends limit this server on two cores (bench/overhead.py): requests reach the engine a few at a
time. On a GPU machine the engine process has a core of its own, and its Python, one interpreter for every request
of a device, is what caps the server once there are front-ends enough. This measures that cap on the real server:
``python -m server`` with one front-end (idle here) and one engine process. Submitter processes connect to the
engine's socket as front-ends do and speak its records (:mod:`server.ipc.records`): each keeps ``--window``
one-sentence requests in flight, tokenized beforehand, and sends the next as each answer arrives.

Reported for each number of submitter processes: sentences/s, the engine process's cores and CPU milliseconds per
sentence (from /proc), and rows per decoder call (its ``attn_batch_hypotheses`` metric). A figure that does not rise
with one submitter more is the engine's, not the submitters'. Beside it: ``bench/engine_micro.py`` measures the
engine alone in one process (no socket, no records), ``bench/overhead.py`` the whole server through gRPC.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import CLIENTS, ServerProcess, commit_of  # noqa: E402
from bench.overhead import ding_sentences, fixture_sources, negligible_model  # noqa: E402
from server.artifacts import Manifest  # noqa: E402
from server.codec import translate_job  # noqa: E402
from server.errors import InvalidInput  # noqa: E402
from server.ipc import framing, records  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.translation import DecodeOptions, TranslationModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "de-en-bahdanau" / "1"
NEGLIGIBLE_WORK = ROOT / "runs" / "bench-overhead"  # where bench/overhead.py's negligible_model builds it
NEGLIGIBLE = NEGLIGIBLE_WORK / "models" / "tiny8" / "1"
CAPPED = 12  # the negligible model's outputs, as bench/overhead.py caps them


def is_negligible(directory: Path) -> bool:
    """Whether ``directory`` is the negligible model's version folder, however the path is written (relative to the
    current folder, through a link): its outputs are capped and it translates the fixture's sources, as
    bench/overhead.py measures it."""
    return directory.resolve() == NEGLIGIBLE.resolve()


def requests(directory: Path, texts: list[str], options: pb.DecodingOptions) -> tuple[list[np.ndarray],
                                                                                     DecodeOptions]:
    """What a front-end would submit for each text (its token ids), and the decoding options it would send."""
    model = TranslationModel(directory, Manifest.load(directory), None)  # a front-end's view: no graphs
    items, decoding = [], DecodeOptions()
    for text in texts:
        try:
            job = translate_job(pb.TranslateRequest(texts=[text], options=options), model, Settings())
        except InvalidInput:  # more tokens than the model takes
            continue
        items.append(job.sources[0].ids)
        decoding = job.options
    return items, decoding


def submit_for(args: tuple[str, str, str, list[np.ndarray], DecodeOptions, int, float, float]) -> dict[str, int]:
    """One submitter process: ``window`` requests in flight from ``start_at`` for ``seconds``. Counts the answers
    (``done``) and the refusals by error name; a refused request is sent again, as a client would retry."""
    address, name, version, items, options, window, start_at, seconds = args
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(address)
    connection.settimeout(60)  # an engine that stops answering fails the run instead of hanging it
    decoder, sent, counts = framing.Decoder(), 0, {"done": 0}

    def send() -> None:
        nonlocal sent
        sent += 1
        message = records.submit(sent, name, version, options, None, [items[sent % len(items)]])
        connection.sendall(framing.encode(message))

    time.sleep(max(0.0, start_at - time.time()))
    for _ in range(window):
        send()
    end = start_at + seconds
    while time.time() < end:
        for frames in decoder.feed(connection.recv(1 << 20)):
            kind = bytes(frames[0])
            if kind == records.DONE:
                counts["done"] += 1
            elif kind == records.FAILED:
                failed = json.loads(frames[1])["error"] or "EngineError"
                counts[failed] = counts.get(failed, 0) + 1
            else:
                continue
            send()
    connection.close()  # the engine cancels what is still in flight
    return counts


def measure(server: ServerProcess, directory: Path, items: list[np.ndarray], options: DecodeOptions,
            submitters: int, window: int, seconds: float) -> dict[str, Any]:
    manifest = Manifest.load(directory)
    start_at = CLIENTS.start(submitters)  # the load generator's processes serve as submitters
    work = [(server.engine_addresses[0], manifest.name, directory.name, items, options, window, start_at, seconds)
            ] * submitters
    pending = CLIENTS.map_async(submit_for, work)
    time.sleep(max(0.0, start_at - time.time()))
    cpu, (rows, calls) = server.cpu_seconds_by_role()["engine"], server.decoder_calls()
    time.sleep(seconds)
    cpu = server.cpu_seconds_by_role()["engine"] - cpu
    rows, calls = (now - before for now, before in zip(server.decoder_calls(), (rows, calls)))
    parts = pending.get()
    done = sum(p.pop("done") for p in parts)
    refused: Counter[str] = Counter()
    for part in parts:
        refused.update(part)
    return {"model": manifest.name, "beam": options.beam_size, "max_output_tokens": options.max_output_tokens,
            "submitters": submitters, "window": window,
            "sentences_per_s": round(done / seconds, 1), "refused": dict(refused),
            "engine_cores": round(cpu / seconds, 2),
            "engine_cpu_ms_per_sentence": round(1000 * cpu / max(done, 1), 3),
            "rows_per_decoder_call": round(rows / calls, 1) if calls else None}


def ceiling(directory: Path, texts: list[str], options: pb.DecodingOptions, submitters: list[int], window: int,
            seconds: float, **settings: Any) -> list[dict[str, Any]]:
    """The rows of one model: a server started for it, measured with each number of submitter processes."""
    items, decoding = requests(directory, texts, options)
    rows = []
    with ServerProcess(directory.parent.parent, frontends=1, reload_interval=0, **settings) as server:
        measure(server, directory, items, decoding, 1, window, 1.0)  # warm-up
        for count in submitters:
            rows.append(measure(server, directory, items, decoding, count, window, seconds))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | beam | submitter processes × in flight | sentences/s | engine cores | engine CPU ms/sentence "
           "| rows per decoder call |", "|---|---:|---|---:|---:|---:|---:|"]
    out += [f"| {r['model']}{_cap(r)} | {r['beam']} | {r['submitters']} × {r['window']} | "
            f"{r['sentences_per_s']:,.0f} | {r['engine_cores']} | {r['engine_cpu_ms_per_sentence']} | "
            f"{r['rows_per_decoder_call']} |" for r in rows]
    return out


def _cap(row: dict[str, Any]) -> str:
    return f" (outputs ≤ {row['max_output_tokens']} tokens)" if row.get("max_output_tokens") else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append",
                        help="a model version's folder (repeatable); default: the negligible model and the bundled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beam", type=positive_int, default=1)
    parser.add_argument("--submitters", type=positive_int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--window", type=positive_int, default=64,
                        help="requests in flight per submitter process (in all, keep them within the server's queue "
                             "limits: a refusal is counted and sent again)")
    parser.add_argument("--seconds", type=positive_float, default=6.0)
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "engine_ceiling.json")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for directory in args.model or [negligible_model(NEGLIGIBLE_WORK) / "tiny8" / "1", BUNDLED]:
        capped = is_negligible(directory)
        options = pb.DecodingOptions(beam_size=args.beam, max_output_tokens=CAPPED if capped else 0,
                                     attention=pb.ATTENTION_DETAIL_FULL)
        rows += ceiling(directory, fixture_sources() if capped else ding_sentences(), options, args.submitters,
                        args.window, args.seconds, device=args.device)
    print("\n".join(table(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": commit_of(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                    "device": args.device, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
