"""A long soak: the server with every bundled model loaded answers ``--requests`` Translate calls (greedy, full
attention, ``--concurrency`` clients), and the resident memory of each of its processes is read after every
``--chunk`` of them.

    .venv/bin/python bench/soak.py       # 40,000 requests: docs/benchmarks.md, docs/benchmarks/soak.json

Memory first grows while the traffic brings batch and sentence shapes the engine has not held yet (its buffers, and
the allocator keeping what they needed); the question is whether it stops. Reported: RSS when ready; the warm-up (the
requests after which every later reading of the whole tree stays within ``--band`` of the median of those readings);
after it, the largest deviation from that median and the drift from the first quarter's mean to the last quarter's;
and each process's RSS at the end. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import ServerProcess, commit_of, drive, stability  # noqa: E402
from bench.sections import command_line, replace_section, shown  # noqa: E402
from bench.serving import test_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the defaults are this checkout's, from whatever folder it is run
BEGIN, END = "<!-- soak: written by bench/soak.py -->", "<!-- /soak -->"
MIB = 2**20


def warm_up(totals: list[float], band: float) -> int:
    """The index of the first reading from which every later one stays within ``band`` of their median."""
    for start in range(len(totals)):
        rest = totals[start:]
        median = float(np.median(rest))
        if all(abs(x - median) <= band * median for x in rest):
            return start
    return len(totals) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--requests", type=positive_int, default=40_000)
    parser.add_argument("--chunk", type=positive_int, default=2_000, help="requests between two readings")
    parser.add_argument("--concurrency", type=positive_int, default=64)
    parser.add_argument("--band", type=positive_float, default=0.05,
                        help="the warm-up ends when later readings stay within "
                             "this fraction of their median")
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "soak.json")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    texts = test_sentences(0)
    options = pb.DecodingOptions(beam_size=1, attention=pb.ATTENTION_DETAIL_FULL)
    readings: list[dict[str, Any]] = []
    codes: dict[str, int] = {}
    with ServerProcess(args.models_dir) as server:
        loaded = {name: round(rss / MIB, 1) for name, rss in server.rss_by_process().values()}
        print(f"ready: {loaded} MiB", flush=True)
        done = 0
        while done < args.requests:
            chunk = min(args.chunk, args.requests - done)
            started = time.perf_counter()
            run = drive(server.target, texts, args.concurrency, options, requests=chunk)
            done += chunk
            for code, n in run.codes.items():
                codes[code] = codes.get(code, 0) + n
            processes = {name: round(rss / MIB, 1) for name, rss in server.rss_by_process().values()}
            readings.append({"requests": done, "seconds": round(time.perf_counter() - started, 1),
                             "total_mib": round(sum(processes.values()), 1), "processes": processes})
            print(f"{done:>7} requests: {readings[-1]['total_mib']} MiB {processes}", flush=True)

    totals = [r["total_mib"] for r in readings]
    start = warm_up(totals, args.band)
    commit = commit_of()
    results = {
        "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M"), "command": command_line("soak.py", argv),
        "results_file": shown(args.out),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "requests": args.requests, "chunk": args.chunk, "concurrency": args.concurrency, "band": args.band,
        "codes": codes, "loaded_mib": loaded, "readings": readings,
        "warm_up_requests": readings[start]["requests"], **stability(totals, start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_section(results, args.report)
    print(json.dumps({k: v for k, v in results.items() if k != "readings"}, indent=1))
    return 0


def write_section(results: dict[str, Any], report: Path) -> None:
    """The soak section of docs/benchmarks.md, between its markers."""
    readings = results["readings"]
    last = readings[-1]["processes"]
    every = max(len(readings) // 10, 1)
    lines = [BEGIN, "## Memory over a long soak", "",
             f"Produced by `{results['command']}` at commit {results['commit']} on {results['finished']}; raw numbers "
             f"in `{results['results_file']}`. Every bundled model loaded; "
             f"{results['requests']:,} "
             f"Translate calls (greedy, full attention, {results['concurrency']} clients, answers "
             f"{results['codes']}), the RSS of each server process read every {results['chunk']:,}.", "",
             "| requests | whole tree (MiB) | " + " | ".join(last) + " |",
             "|---:|---:|" + "---:|" * len(last),
             f"| ready | {sum(results['loaded_mib'].values()):.1f} | "
             + " | ".join(str(results["loaded_mib"].get(name, "–")) for name in last) + " |"]
    for r in readings[every - 1 :: every]:
        lines.append(f"| {r['requests']:,} | {r['total_mib']} | "
                     + " | ".join(str(r["processes"].get(name, "–")) for name in last) + " |")
    lines += ["", f"- Warm-up: from {results['warm_up_requests']:,} requests on, every reading stays within "
              f"±{results['band']:.0%} of their median.",
              f"- After it: median {results['median_mib']} MiB, largest deviation {results['max_deviation']:.1%}, "
              f"drift from the first quarter to the last {results['drift']:+.1%}.", "", END]
    replace_section(report, BEGIN, END, lines)


if __name__ == "__main__":
    sys.exit(main())
