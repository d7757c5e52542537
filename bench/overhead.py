"""The serving path's own cost, and the server in one process against several (issue "GPU-grade serving").

    .venv/bin/python bench/overhead.py      # docs/benchmarks/overhead.json and the tables in docs/benchmarks.md

Two models, each served by the server in one process (``ATTN_FRONTENDS=0``, the previous design) and by front-end
processes beside an engine process (the new one):

* a model of negligible compute (every width 8, trained on the test fixture), outputs capped at 12 tokens with
  ``max_output_tokens``: what remains is the server's own cost per sentence, which on a GPU is the whole cost;
* the bundled ``de-en-bahdanau`` on this CPU.

With ``--baseline DIR`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/before REV``), that
commit's server runs the same load beside them as the design "before", and the ratios are taken against it;
without, against ``ATTN_FRONTENDS=0`` of this commit. Every design's server is started first and each load is
measured on the designs in turn, so that a slower minute of this shared machine does not fall on one design alone.

At 1, 64 and 256 clients (greedy, full attention): sentences/s, target tokens/s, p50 latency, and the server's CPU
milliseconds per sentence (the user + system time of the server's whole process tree, from /proc, over the run,
divided by the sentences answered). The load generator runs in several
processes (:func:`bench.loadgen.drive_processes`); at 256 clients it runs once more with one process more, to show
that the client is not what limits the figure. ``--texts-per-call N`` sends N sentences in each call, as a batch job
would (the call's own cost is then paid once per N sentences); its results have a file and a section of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import checkout, positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import (  # noqa: E402
    ServerProcess,
    client_check,
    client_checks,
    commit_of,
    drive,
    drive_processes,
    only_model,
)
from bench.sections import command_line, replace_section, shown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "ding-sample.txt"
CONCURRENCY = [1, 64, 256]
BEGIN, END = "<!-- overhead: written by bench/overhead.py -->", "<!-- /overhead -->"


def negligible_model(workdir: Path) -> Path:
    """Every width 8 (embeddings, hidden state, attention, a 400-piece vocabulary): its graphs cost microseconds."""
    models = workdir / "models"
    if (models / "tiny8" / "1" / "manifest.json").exists():
        return models
    from exporter.export import ExportOptions, export
    from training.train import TrainConfig, train

    cfg = TrainConfig(data=f"ding:{FIXTURE}", out=str(workdir / "run"), vocab_size=400, emb_dim=8, hidden_dim=8,
                      attn_dim=8, max_steps=20, valid_every=1000, valid_bleu_sample=10, max_tokens=2000, threads=1)
    export(train(cfg), models / "tiny8" / "1", ExportOptions(name="tiny8", parity_sentences=20))
    return models


def fixture_sources() -> list[str]:
    from training.data.corpus import load_corpus

    return sorted({p.source for p in load_corpus(f"ding:{FIXTURE}") if p.sentence})


def ding_sentences() -> list[str]:
    from training.data.corpus import load_corpus, split
    from training.evaluate import group_references

    sources, _, is_sentence = group_references(split(load_corpus("ding"))["test"])
    return [s for s, full in zip(sources, is_sentence) if full]


def measure(server: ServerProcess, texts: list[str], concurrency: int, options: pb.DecodingOptions,
            seconds: float, processes: int, texts_per_call: int = 1) -> dict[str, Any]:
    drive(server.target, texts, min(concurrency, 8), options, requests=32)  # warm-up
    before, steps_before, wakeups = server.cpu_seconds_by_role(), server.decoder_calls(), server.wakeups_by_role()
    run = drive_processes(server.target, texts, concurrency, options, seconds=seconds, processes=processes,
                          texts_per_call=texts_per_call)
    # Includes the client processes' start-up wait: none of the server's.
    by_role = {role: used - before[role] for role, used in server.cpu_seconds_by_role().items()}
    rows, calls = (after - earlier for after, earlier in zip(server.decoder_calls(), steps_before))
    # How many sentences' rows the engine decoded together: its cost per sentence falls as this grows.
    run["rows_per_decoder_call"] = round(rows / calls, 1) if calls else None
    server_cpu, sentences = sum(by_role.values()), max(run["ok"], 1)
    run["server_cpu_ms_per_sentence"] = round(1000 * server_cpu / sentences, 3)
    run["server_cores"] = round(server_cpu / run["seconds"], 2)
    run["engine_cpu_ms_per_sentence"] = round(1000 * by_role["engine"] / sentences, 3)
    run["frontend_cpu_ms_per_sentence"] = round(1000 * by_role["frontends"] / sentences, 3)
    # Threads put to sleep and woken per sentence, by role: under light load each costs the call latency.
    run["wakeups_per_sentence"] = {role: round((woken - wakeups[role]) / sentences, 1)
                                   for role, woken in server.wakeups_by_role().items()}
    return run


def in_turns(models: Path, texts: list[str], designs: list[tuple[str, dict[str, Any], Path]],
             options: pb.DecodingOptions, seconds: float, processes: int,
             texts_per_call: int = 1) -> dict[str, list[dict[str, Any]]]:
    """The runs of every design (key, settings, checkout: the server in that checkout with ``settings``,
    ``frontends`` and ``engines``; none: that server's defaults, for a commit that has no such settings). Every
    design's server is started first, then each load is measured on each design in turn, the check with one client
    process more last: a slower minute on this shared machine falls on all of them alike, not on whichever design
    had its turn then."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in designs}
    with contextlib.ExitStack() as stack:
        servers = {key: (stack.enter_context(ServerProcess(models, root=root, reload_interval=0, **settings)),
                         settings) for key, settings, root in designs}
        for concurrency in CONCURRENCY:
            for key, (server, settings) in servers.items():
                run = measure(server, texts, concurrency, options, seconds, 1 if concurrency == 1 else processes,
                              texts_per_call)
                run.update(settings)
                runs[key].append(run)
                print(json.dumps({"design": key, **run}), flush=True)
        for key, (server, settings) in servers.items():
            more = measure(server, texts, CONCURRENCY[-1], options, seconds, processes + 1, texts_per_call)
            more.update(settings, check="one client process more")
            runs[key].append(more)
            print(json.dumps({"design": key, **more}), flush=True)
            print(f"{key}: {client_check(runs[key][-2], more)}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="measured seconds per run")
    parser.add_argument("--client-processes", type=positive_int, default=3)
    parser.add_argument("--frontends", type=positive_int, nargs="+", default=[1, 2],
                        help="front-end counts of the new design to measure (0, the old design, always runs)")
    parser.add_argument("--engines", type=positive_int, nargs="*", default=[],
                        help="engine process counts above 1 to measure as well, with the most front-ends")
    parser.add_argument("--baseline", type=checkout, help="a checkout of an earlier commit, measured as the design "
                        "'before' (its server's default process layout)")
    parser.add_argument("--bundled", type=Path, default=ROOT / "models", help="folder holding de-en-bahdanau")
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--texts-per-call", type=positive_int, default=1,
                        help="sentences in each Translate call; above 1 "
                             "the results go to overhead-batched.json and a section of their own")
    parser.add_argument("--out", type=writable_file,
                        help="default: docs/benchmarks/overhead.json (overhead-batched.json with --texts-per-call "
                             "above 1)")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    if not args.skip_bundled and not (args.bundled / "de-en-bahdanau").is_dir():  # measured last: say so first
        parser.error(f"--bundled {args.bundled}: no de-en-bahdanau folder in it (or --skip-bundled)")
    batched = args.texts_per_call > 1
    out = args.out or ROOT / "docs" / "benchmarks" / ("overhead-batched.json" if batched else "overhead.json")
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "seconds_per_run": args.seconds, "client_processes": args.client_processes,
                               "texts_per_call": args.texts_per_call, "commit": commit_of(ROOT),
                               "command": command_line("overhead.py", argv), "results_file": shown(out)}
    designs: list[tuple[str, dict[str, Any], Path]] = [(str(n), {"frontends": n}, ROOT) for n in [0, *args.frontends]]
    designs += [(f"{max(args.frontends)}x{n}", {"frontends": max(args.frontends), "engines": n}, ROOT)
                for n in args.engines]
    if args.baseline:
        results["baseline"] = commit_of(args.baseline)
        designs.insert(0, ("before", {}, args.baseline))

    def measured(models: Path, texts: list[str], options: pb.DecodingOptions) -> dict[str, list[dict[str, Any]]]:
        return in_turns(models, texts, designs, options, args.seconds, args.client_processes, args.texts_per_call)

    capped = pb.DecodingOptions(beam_size=1, max_output_tokens=12, attention=pb.ATTENTION_DETAIL_FULL)
    results["negligible"] = measured(negligible_model(ROOT / "runs" / "bench-overhead"), fixture_sources(), capped)
    if not args.skip_bundled:
        one = only_model(ROOT / "runs" / "bench-models", args.bundled / "de-en-bahdanau")  # the bundled translator
        greedy = pb.DecodingOptions(beam_size=1, attention=pb.ATTENTION_DETAIL_FULL)
        results["bundled"] = measured(one, ding_sentences(), greedy)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    write_section(results, args.report)
    print(f"wrote {out} and the overhead section of {args.report}")
    return 0


def design_name(key: str, results: dict[str, Any]) -> str:
    if key == "before":
        return f"commit {results.get('baseline', '?')} (before)"
    if "x" in key:
        frontends, engines = key.split("x")
        return f"{frontends} front-end(s) + {engines} engines"
    return "one process (`ATTN_FRONTENDS=0`)" if key == "0" else f"{key} front-end(s) + engine"


def table(runs: dict[str, list[dict[str, Any]]], results: dict[str, Any]) -> list[str]:
    lines = ["| design | clients | client processes | sentences/s | target tokens/s | p50 ms | p99 ms | "
             "server CPU ms/sentence | of it engine, front-ends | server cores | rows per decoder call | codes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in runs.items():
        for r in rows:
            split = (f"{r['engine_cpu_ms_per_sentence']}, {r['frontend_cpu_ms_per_sentence']}"
                     if r.get("engine_cpu_ms_per_sentence") else "–")  # one process: no split
            lines.append(f"| {design_name(key, results)} | {r['concurrency']} | {r['client_processes']} | "
                         f"{r['sentences_per_s']} | {r['target_tokens_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{r['server_cpu_ms_per_sentence']} | {split} | {r['server_cores']} | "
                         f"{r.get('rows_per_decoder_call') or '–'} | "
                         f"{', '.join(f'{k} {v}' for k, v in r['codes'].items())} |")
    return lines


def ratios(runs: dict[str, list[dict[str, Any]]], concurrency: int) -> dict[str, dict[str, float]]:
    """Per design at ``concurrency`` (the run with the base number of client processes): throughput, CPU per
    sentence and p50 latency against the earlier commit's server when it was measured, else against the
    one-process design, in the same run."""
    def at(key: str) -> dict[str, Any]:
        return next(r for r in runs[key] if r["concurrency"] == concurrency and "check" not in r)

    base_key = "before" if "before" in runs else "0"
    base = at(base_key)
    return {key: {"throughput": round(at(key)["sentences_per_s"] / base["sentences_per_s"], 2),
                  "cpu_per_sentence": round(at(key)["server_cpu_ms_per_sentence"]
                                            / base["server_cpu_ms_per_sentence"], 2),
                  "p50": round(at(key)["p50_ms"] / base["p50_ms"], 2)} for key in runs if key != base_key}


def write_section(results: dict[str, Any], report: Path) -> None:
    """The overhead section of docs/benchmarks.md, between its markers (replaced on every run); with several
    sentences per call, a section of its own."""
    base = design_name("before" if "baseline" in results else "0", results)
    per_call = results.get("texts_per_call", 1)
    begin, end, title = BEGIN, END, "Front-end processes and an engine process"
    if per_call > 1:
        begin, end = BEGIN.replace("overhead:", "overhead-batched:"), END.replace("overhead", "overhead-batched")
        title = f"The same with {per_call} sentences per call"
    lines = [begin, f"## {title}", "",
             f"Produced by `{results['command']}` at commit {results['commit']} on "
             f"{results['finished']}; raw numbers in `{results['results_file']}`. Machine: "
             f"{results['machine']['cpus']} CPUs, no GPU; {results['seconds_per_run']} s per measured run; the "
             "load generator runs in separate processes on the same cores. Server CPU is the user + system time of "
             "the server's whole process tree over the run (from /proc), per sentence answered, and of it the engine "
             "process's and the front-ends' (together) where the design has them; the clients share one connection "
             "per 8 (`bench/loadgen.py`), so that the front-ends get even shares; every design's server runs from the "
             "start and each load is measured on the designs in turn"
             + (f"; each Translate call carries {per_call} sentences (a client counts as one call in flight)."
                if per_call > 1 else "."), ""]
    for key, title in (("negligible", "A model of negligible compute (widths 8, outputs capped at 12 tokens): the "
                        "serving path's own cost"), ("bundled", "The bundled de-en-bahdanau on this CPU")):
        if key not in results:
            continue
        lines += [f"### {title}", "", *table(results[key], results), ""]
        for concurrency in (1, 64, 256):
            for design_key, r in ratios(results[key], concurrency).items():
                lines.append(f"- {concurrency} client(s), {design_name(design_key, results)}: {r['throughput']}× the "
                             f"throughput of {base}, {r['cpu_per_sentence']}× its CPU per sentence, {r['p50']}× "
                             "its p50 latency.")
        lines.append("")
        lines += [f"- {design_name(design_key, results)}, {check}"
                  for design_key, rows in results[key].items() for check in client_checks(rows)]
        lines.append("")
    lines.append(end)
    replace_section(report, begin, end, lines)


if __name__ == "__main__":
    sys.exit(main())
