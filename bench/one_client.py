"""One client's latency on the bundled model, the designs taking turns (the target "at 1 client, p50 no worse").

    .venv/bin/python bench/one_client.py                           # this commit: one process, 1 and 2 front-ends
    .venv/bin/python bench/one_client.py --baseline /tmp/before    # and an earlier commit (git worktree add)

One run of bench/overhead.py measures each design once, and on this shared machine one client's p50 moves by up to
a quarter between runs, more than the differences it is asked to show. Here every design's server is started once
and kept running; in each of ``--rounds`` rounds each serves one client (one sentence per call, greedy, full
attention, the Ding test split's full sentences, as overhead.py's bundled rows) for ``--seconds``, the designs in
turn. Reported per design: every round's p50, their median, and the medians of the server CPU and of its threads'
wake-ups (voluntary context switches) per sentence, the engine process's apart: with one request at a time each
wake-up is paid on the call's path (bench/ipc_roundtrip.py: one message in flight between two processes, two
wake-ups a round trip, takes about 0.2 ms here). Results:
docs/benchmarks/one_client.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import checkout, positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import ServerProcess, commit_of, only_model, save_results  # noqa: E402
from bench.overhead import design_name, ding_sentences, measure  # noqa: E402
from bench.sections import command_line, replace_section, shown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- one-client: written by bench/one_client.py -->", "<!-- /one-client -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--seconds", type=positive_float, default=6.0, help="measured seconds per design and round")
    parser.add_argument("--frontends", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", type=checkout, help="a checkout of an earlier commit, measured as 'before'")
    parser.add_argument("--bundled", type=Path, default=ROOT / "models", help="folder holding de-en-bahdanau")
    parser.add_argument("--out", type=writable_file, default=ROOT / "docs" / "benchmarks" / "one_client.json")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    if not (args.bundled / "de-en-bahdanau").is_dir():
        parser.error(f"--bundled {args.bundled}: no de-en-bahdanau folder in it")
    # the bundled translator alone, as overhead.py serves it
    models = only_model(ROOT / "runs" / "bench-models", args.bundled / "de-en-bahdanau")
    designs: list[tuple[str, dict[str, Any], Path]] = [(str(n), {"frontends": n}, ROOT) for n in [0, *args.frontends]]
    if args.baseline:
        designs.insert(0, ("before", {}, args.baseline))
    texts = ding_sentences()
    greedy = pb.DecodingOptions(beam_size=1, attention=pb.ATTENTION_DETAIL_FULL)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "commit": commit_of(ROOT), "command": command_line("one_client.py", argv),
                               "results_file": shown(args.out), "rounds": args.rounds, "seconds_per_run": args.seconds,
                               "runs": {key: [] for key, _, _ in designs}}
    if args.baseline:
        results["baseline"] = commit_of(args.baseline)
    with contextlib.ExitStack() as stack:
        servers = {key: stack.enter_context(ServerProcess(models, root=root, reload_interval=0, **settings))
                   for key, settings, root in designs}
        for round_ in range(args.rounds):
            for key, server in servers.items():
                run = measure(server, texts, 1, greedy, args.seconds, 1)
                run["round"] = round_
                results["runs"][key].append(run)
                print(f"round {round_} {design_name(key, results)}: p50 {run['p50_ms']} ms, "
                      f"{run['server_cpu_ms_per_sentence']} ms CPU and {run['wakeups_per_sentence']} thread "
                      "wake-ups per sentence", flush=True)
    save_results(args.out, results)
    write_section(results, args.report)
    print(f"wrote {args.out} and the one-client section of {args.report}")
    return 0


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
            "cpu_ms": round(statistics.median(r["server_cpu_ms_per_sentence"] for r in runs), 3),
            "wakeups": round(statistics.median(sum(r["wakeups_per_sentence"].values()) for r in runs), 1),
            "engine_wakeups": round(statistics.median(r["wakeups_per_sentence"]["engine"] for r in runs), 1)}


def write_section(results: dict[str, Any], report: Path) -> None:
    runs = results["runs"]
    base_key = "before" if "before" in runs else "0"
    base = summary(runs[base_key])
    lines = [BEGIN, "## One client, the designs taking turns", "",
             f"Produced by `{results['command']}` at commit {results['commit']} on {results['finished']}; raw numbers "
             f"in `{results['results_file']}`. The bundled de-en-bahdanau, one "
             "client, one sentence per call, "
             f"greedy, full attention; every server started once, then {results['rounds']} rounds of "
             f"{results['seconds_per_run']} s each, the designs in turn within a round.", "",
             "| design | p50 ms per round | median p50 ms | vs " + design_name(base_key, results)
             + " | median server CPU ms/sentence | median thread wake-ups/sentence (engine process's) |",
             "|---|---|---|---|---|---|"]
    for key, design_runs in runs.items():
        mine = summary(design_runs)
        engine = f" ({mine['engine_wakeups']})" if mine["engine_wakeups"] else ""
        lines.append(f"| {design_name(key, results)} | {', '.join(str(r['p50_ms']) for r in design_runs)} | "
                     f"{mine['p50_ms']} | {mine['p50_ms'] / base['p50_ms']:.2f}× | {mine['cpu_ms']} | "
                     f"{mine['wakeups']}{engine} |")
    replace_section(report, BEGIN, END, [*lines, "", END])


if __name__ == "__main__":
    raise SystemExit(main())
