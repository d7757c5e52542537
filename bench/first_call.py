"""A server's first calls after ``ready`` against its later ones: what a process still makes on first use.

    .venv/bin/python bench/first_call.py                           # this commit: one process and 2 front-ends
    .venv/bin/python bench/first_call.py --baseline /tmp/before    # and an earlier commit (git worktree add)

Each design's server is started ``--starts`` times over the bundled models; each time one client sends a ListModels
(the connection), then ``--calls`` Caption calls with the captioner's example image and as many Translate calls with
one sentence (each at the server's default beam, 4). The times are the server's own, from its ``rpc`` log lines
(receipt to answer), so that the client's first call over a new channel does not count. Reported per design and
RPC: the first call's time (median over the starts) and the median of the later calls. On a GPU, where a session
made on first use costs far more, ``bench/gpu.py`` times Caption's first call on the device. Results:
docs/benchmarks/first_call.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import at_least_two, checkout, positive_int, writable_file  # noqa: E402
from bench.loadgen import ServerProcess, commit_of, save_results  # noqa: E402
from bench.sections import command_line, replace_section, shown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "docs" / "scenes-sat-example-1-input.png"
SENTENCE = "Die Datei konnte nicht geöffnet werden."
BEGIN, END = "<!-- first-call: written by bench/first_call.py -->", "<!-- /first-call -->"


def one_start(root: Path, models: Path, settings: dict[str, Any], calls: int) -> dict[str, list[float]]:
    """The server-side milliseconds of every Caption and Translate call of one server's life, in order."""
    import grpc

    from attention_pb.v1 import attention_pb2_grpc as pb_grpc

    image = IMAGE.read_bytes()
    with tempfile.TemporaryDirectory() as work:
        log = Path(work) / "server.log"
        with ServerProcess(models, root=root, log_path=log, reload_interval=0, **settings) as server, \
                grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AttentionServiceStub(channel)
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
            for _ in range(calls):
                stub.Caption(pb.CaptionRequest(image=image), timeout=60)
            for _ in range(calls):
                stub.Translate(pb.TranslateRequest(texts=[SENTENCE]), timeout=60)
        times: dict[str, list[float]] = {"Caption": [], "Translate": []}
        for line in log.read_text().splitlines():
            if '"event": "rpc"' not in line:
                continue
            record = json.loads(line)
            if record.get("rpc") in times:
                times[record["rpc"]].append(round(1000 * record["seconds"], 2))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=positive_int, default=3, help="servers started per design")
    parser.add_argument("--calls", type=at_least_two, default=6, help="calls of each RPC per server")
    parser.add_argument("--frontends", type=positive_int, nargs="+", default=[2])
    parser.add_argument("--baseline", type=checkout, help="a checkout of an earlier commit, measured as 'before'")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "first_call.json")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    designs: list[tuple[str, str, dict[str, Any], Path]] = [
        (str(n), "one process (`ATTN_FRONTENDS=0`)" if n == 0 else f"{n} front-end(s) + engine", {"frontends": n},
         ROOT) for n in [0, *args.frontends]]
    if args.baseline:
        designs.insert(0, ("before", f"commit {commit_of(args.baseline)} (before)", {}, args.baseline))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "commit": commit_of(ROOT), "command": command_line("first_call.py", argv),
                               "results_file": shown(args.out), "starts": args.starts, "calls": args.calls,
                               "designs": {}}
    for _ in range(args.starts):  # the designs in turn, so that a slow minute does not fall on one of them
        for key, name, settings, root in designs:
            run = one_start(root, args.models, settings, args.calls)
            results["designs"].setdefault(key, {"name": name, "starts": []})["starts"].append(run)
            print(json.dumps({"design": key, **run}), flush=True)
    save_results(args.out, results)
    write_section(results, args.report)
    print(f"wrote {args.out} and the first-call section of {args.report}")
    return 0


def summary(starts: list[dict[str, list[float]]], rpc: str) -> tuple[float, float]:
    """(median of the first calls, median of every later call) in ms."""
    return (statistics.median(s[rpc][0] for s in starts),
            statistics.median(t for s in starts for t in s[rpc][1:]))


def write_section(results: dict[str, Any], report: Path) -> None:
    lines = [BEGIN, "## A process's first calls", "",
             f"Produced by `{results['command']}` at commit {results['commit']}; raw numbers in "
             f"`{results['results_file']}`. "
             "The bundled models, "
             f"{results['starts']} starts per design, {results['calls']} calls of each RPC per start (the server's "
             "own time from its `rpc` log lines; one client, default beam 4).", "",
             "| design | Caption: first call ms | later calls ms | Translate: first call ms | later calls ms |",
             "|---|---:|---:|---:|---:|"]
    for design in results["designs"].values():
        caption, translate = summary(design["starts"], "Caption"), summary(design["starts"], "Translate")
        lines.append(f"| {design['name']} | {caption[0]} | {caption[1]} | {translate[0]} | {translate[1]} |")
    replace_section(report, BEGIN, END, [*lines, "", END])


if __name__ == "__main__":
    sys.exit(main())
