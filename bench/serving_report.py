"""Writes the serving benchmark's results: ``docs/benchmarks/serving.json``, ``serving.png`` (throughput and p99
against concurrency) and ``docs/benchmarks.md`` (the tables and every target with its measured value)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.loadgen import client_check
from bench.sections import replace_section, shown

BEGIN, END = "<!-- serving: written by bench/serving.py -->", "<!-- /serving -->"
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _by(runs: list[dict[str, Any]], concurrency: int, beam: int = 1, attention: bool = True) -> dict[str, Any]:
    return next(r for r in runs if (r["concurrency"], r["beam"], r["attention"]) == (concurrency, beam, attention))


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of the issue."""
    b, c, a = results["b"], results["c"], results["a"]
    c64, b64 = _by(c, 64), _by(b, 64)
    rows = []
    if a:
        ratio = c64["sentences_per_s"] / a["sentences_per_s"]
        rows.append(("(c) at concurrency 64 ≥ 10× (a) PyTorch eager", f"{ratio:.1f}×", ratio >= 10))
    ratio = c64["sentences_per_s"] / b64["sentences_per_s"]
    rows.append(("(c) at concurrency 64 ≥ 5× (b) batching off", f"{ratio:.1f}×", ratio >= 5))
    for name, same in results["identical"].items():
        rows.append((f"identical outputs, {name.replace('_', ' ')}", f"{same['identical']} of {same['compared']}",
                     same["identical"] == same["compared"]))
    noattn = _by(c, 64, attention=False)["sentences_per_s"]
    cost = 1 - c64["sentences_per_s"] / noattn
    rows.append(("attention in the response costs ≤ 15% at concurrency 64", f"{cost:.1%}", cost <= 0.15))
    p99_16, p50_1 = _by(c, 16)["p99_ms"], _by(c, 1)["p50_ms"]
    rows.append(("p99 at concurrency 16 ≤ 3× p50 at concurrency 1",
                 f"{p99_16:.0f} ms vs 3 × {p50_1:.0f} ms ({p99_16 / p50_1:.1f}×)", p99_16 <= 3 * p50_1))
    codes = results["overload"]["codes"]
    rows.append(("concurrency 256, queue of 16: only OK and RESOURCE_EXHAUSTED",
                 ", ".join(f"{k} {v}" for k, v in sorted(codes.items())),
                 set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}))
    soak = results["soak"]
    top = max(soak["rss_mib"])
    rows.append(("RSS ≤ 1 GiB with all bundled models loaded", f"{top:.0f} MiB at most", top <= 1024))
    rows.append((f"RSS stable (±5%) over {soak['requests']:,} requests, warm-up included (after it: the long "
                 "soak below)",
                 f"within ±{soak['rss_max_deviation']:.1%} of {soak['rss_median_mib']:.0f} MiB after the first "
                 f"{soak['requests'] // 20:,} (sampled every {soak['requests'] // 20:,}); drift first to last "
                 f"quarter {soak['rss_drift']:+.1%}", soak["rss_max_deviation"] <= 0.05))
    return rows


def _table(runs: list[dict[str, Any]], label: str) -> list[str]:
    lines = []
    for r in runs:
        s = r["server"]
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        lines.append(
            f"| {label} | {r['concurrency']} | {r['client_processes']} | {r['beam']} | "
            f"{'yes' if r['attention'] else 'no'} | "
            f"{r['sentences_per_s']:.1f} | {r['target_tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {s['mean_requests_per_step']} | {s['mean_rows_per_step']} | {codes} |")
    return lines


def _bounds_lines(results: dict[str, Any]) -> list[str]:
    """What the graph costs allow at all, from the numbers of this run: the ceiling on batching's gain, and the
    latency that Little's law gives at 16 clients."""
    costs, b1, c = results["step_costs"], _by(results["b"], 1), results["c"]
    tokens = b1["target_tokens_per_s"] / b1["sentences_per_s"]  # mean target tokens per sentence, EOS included
    alone = costs[0]["encoder_ms_per_sentence"] + tokens * costs[0]["decoder_ms_per_row"]
    best = (min(x["encoder_ms_per_sentence"] for x in costs) + tokens * min(x["decoder_ms_per_row"] for x in costs))
    ceiling = alone / best
    c16, c64, c256 = _by(c, 16), _by(c, 64), _by(c, 256)
    needed = 16 / (3 * _by(c, 1)["p50_ms"] / 1000)
    missed = sum(not met for _, _, met in targets(results))
    lines = [
        f"## Why {NUMBERS.get(missed, missed)} target{'s are' if missed != 1 else ' is'} missed" if missed
        else "## What bounds the targets",
        "",
        f"- **Batching's ceiling.** A test sentence has {tokens:.1f} target tokens on average. Alone, its graphs "
        f"cost {alone:.2f} ms (encoder + {tokens:.1f} decoder steps of one row); in the cheapest batch sizes above, "
        f"{best:.2f} ms. No scheduler can make batched decoding more than **{ceiling:.1f}×** faster than one "
        f"request at a time on this machine; the engine reaches {c64['sentences_per_s'] / b1['sentences_per_s']:.1f}× "
        f"at 64 clients and {c256['sentences_per_s'] / b1['sentences_per_s']:.1f}× at 256 "
        f"({c256['sentences_per_s'] / b1['sentences_per_s'] / ceiling:.0%} of the ceiling). The 5× target needs a "
        "model whose one-row step leaves most of the core idle (wider layers, a larger vocabulary), or a GPU, "
        "where one row leaves almost all of the device idle.",
    ]
    if results["a"]:
        a = results["a"]
        lines.append(
            f"- **PyTorch eager is not slow here.** One sentence after another, PyTorch decodes "
            f"{a['sentences_per_s']:.0f} sentences/s ({1000 / a['sentences_per_s']:.1f} ms each), as fast as the "
            f"server with batching off ({b1['sentences_per_s']:.0f}/s, which adds gRPC and building the response "
            "with its alignments): a GRU this small runs well in eager mode on a CPU. 10× over it would need 10× "
            f"over one-at-a-time serving, beyond the {ceiling:.1f}× ceiling.")
    lines += [
        f"- **Latency at 16 clients.** By Little's law the mean latency at 16 clients is 16 ÷ throughput: "
        f"{16 / c16['sentences_per_s'] * 1000:.0f} ms at the measured {c16['sentences_per_s']:.0f} sentences/s. A p99 "
        f"within 3× the p50 of one client ({3 * _by(c, 1)['p50_ms']:.0f} ms) would need at least {needed:.0f} "
        f"sentences/s even for the mean, {needed / b1['sentences_per_s']:.1f}× one-at-a-time serving, again beyond "
        f"the ceiling; and long sentences alone put the p99 of one client at {_by(c, 1)['p99_ms']:.0f} ms, "
        f"{_by(c, 1)['p99_ms'] / _by(c, 1)['p50_ms']:.1f}× its p50.",
        *_rest_lines(results),
        "",
    ]
    return lines


def _rest_lines(results: dict[str, Any]) -> list[str]:
    """Where the server's time goes beyond the graphs, from the run's profile when py-spy sampled one."""
    shares = results.get("profile_c256")
    inside = ("The largest single cost inside the decoder is its vocabulary projection (the first weight matrix "
              "below) and the log-softmax over its 8,000 outputs per row.")
    if not shares:
        return [f"- **Where the rest goes.** Not sampled in this run (py-spy was not installed). {inside}"]

    def share(role: str, *, graphs: bool) -> float:
        return sum(v for k, v in shares.items() if k.startswith(role) and ("ONNX Runtime" in k) == graphs)

    return [
        f"- **Where the rest goes.** Of the server's working samples at 256 clients (profile below), ONNX Runtime's "
        f"calls took {share('engine', graphs=True):.0%}; the engine's own Python (search, scheduling, records to the "
        f"front-ends) {share('engine', graphs=False):.0%}; the front-ends (gRPC, tokenizing, building responses with "
        f"their word alignments) {share('front-ends', graphs=False):.0%}. The load generator needs the same "
        f"{results['machine']['cpus']} cores. {inside}"]


def _profile_lines(results: dict[str, Any]) -> list[str]:
    weights, costs = results["decoder_weights"], results["step_costs"]
    one, best = costs[0], min(costs, key=lambda c: c["decoder_ms_per_row"])
    lines = ["The graphs alone, by batch size (this process, the server's thread setting, best of several calls):",
             "", "| batch | encoder ms per sentence | decoder ms per row and step |", "|---:|---:|---:|",
             *(f"| {c['batch']} | {c['encoder_ms_per_sentence']:.2f} | {c['decoder_ms_per_row']:.3f} |"
               for c in costs), "",
             f"So on this machine batching can make a decoder step at most "
             f"{one['decoder_ms_per_row'] / best['decoder_ms_per_row']:.1f}× cheaper per row, and the encoder "
             f"{one['encoder_ms_per_sentence'] / min(c['encoder_ms_per_sentence'] for c in costs):.1f}× cheaper per "
             "sentence: one row is already a matrix-vector product that ONNX Runtime runs near the core's speed, "
             "and larger batches are bound by memory (the vocabulary projection writes 8,000 log-probabilities per "
             "row, which the search then reads). That bounds what (c) can gain over (b) whatever the scheduling.",
             "",
             "The decoder step's weight matrices by share of its multiply-adds: "
             + ", ".join(f"`{w['weight']}` {w['shape'][0]}×{w['shape'][1]} {w['share']:.0%}" for w in weights[:4])
             + ".", ""]
    shares = results.get("profile_c256")
    if shares:
        lines += ["A py-spy profile of the server's processes at 256 clients (a separate run; samples of threads "
                  "that were working, not waiting, by process and by what they ran; under 0.5 % left out):", "",
                  "| process: where | share of samples |", "|---|---:|",
                  *(f"| {k} | {v:.0%} |" for k, v in shares.items() if v >= 0.005), ""]
    else:
        lines += ["(py-spy was not installed, so there is no sampled profile; the dev extra installs it.)", ""]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, name in (("b", "batching off"), ("c", "batching on")):
        runs = [r for r in results[label] if r["beam"] == 1 and r["attention"]]
        xs = [r["concurrency"] for r in runs]
        left.plot(xs, [r["sentences_per_s"] for r in runs], marker="o", label=f"server, {name}")
        right.plot(xs, [r["p99_ms"] for r in runs], marker="o", label=f"server, {name}")
    if results["a"]:
        left.axhline(results["a"]["sentences_per_s"], color="gray", linestyle="--", label="PyTorch eager, serial")
    for ax, title in ((left, "throughput (sentences/s)"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("de-en-bahdanau, greedy, attention in the response (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path, command: str) -> Path:
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serving.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(results, folder / "serving.png")
    a, sat, m, more = results["a"], results["saturation"], results["machine"], results["c_more_clients"]
    top = results["c"][[r["concurrency"] for r in results["c"]].index(256)]["server"]
    other = max(top["wall_seconds"] - top["decoder_seconds"] - top["encoder_seconds"], 0.0)
    lines = [
        "# Serving benchmark",
        "",
        f"Produced by `{command}` ({results['minutes']} minutes); raw numbers in `{shown(folder / 'serving.json')}`.",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; no GPU. Model `{results['model']}` "
        f"(the bundled Bahdanau model), {results['sentences']} full sentences of the Ding test split, cycled; "
        f"{results['seconds_per_run']:.0f} s per measured run after a warm-up. The load generator runs in "
        f"{results['client_processes']} processes of its own (`bench/loadgen.py`; as many as there are clients where "
        "there are fewer) "
        f"and shares the {m['cpus']} cores with the server, as clients on the same host would.",
        "",
        "- **(a)** PyTorch eager greedy decoding of the same checkpoint, one sentence after another: "
        + (f"**{a['sentences_per_s']:.1f} sentences/s** ({a['target_tokens_per_s']:.0f} target tokens/s, "
           f"{a['torch_threads']} torch threads)." if a else "not measured (no checkpoint; `make models` makes it)."),
        "- **(b)** the server with batching off (`ATTN_BATCHING=false`: one request decodes at a time).",
        "- **(c)** the server with iteration-level batching (the default).",
        "",
        "![throughput and p99 against concurrency](benchmarks/serving.png)",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(results)],
        "",
        "## Runs",
        "",
        "| server | clients | client processes | beam | attention | sentences/s | target tokens/s | p50 ms | "
        "p95 ms | p99 ms | requests/step | hypotheses/step | status codes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *_table(results["b"], "(b) off"),
        *_table(results["c"], "(c) on"),
        *_table([results["c_more_clients"]], "(c) on, one client process more"),
        *_table([{**results["int8"], "beam": 1, "attention": True}], "(c) on, int8"),
        "",
        f"(c), {client_check(_by(results['c'], more['concurrency']), more)}",
        "",
        f"The int8 variant (`ATTN_VARIANT=int8`) gave the same greedy output as fp32 for "
        f"{results['int8']['identical_to_fp32']['identical']} of {results['int8']['identical_to_fp32']['compared']} "
        "sentences.",
        "",
        *_bounds_lines(results),
        "## The machine's limit and where the time goes",
        "",
        f"The machine's float32 matrix-multiply rate: **{results['matmul_gflops']:.1f} GFLOP/s**, the best of "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in results["matmul_rates"].items())
        + " (1024×1024 by 1024×1024, best of three). One decoder step costs "
        f"{results['decoder_flops_per_row'] / 1e6:.1f} MFLOP per hypothesis in its "
        "weight matrices (attention over the source comes on top and is left out).",
        "",
        f"At 256 clients with batching, the server decoded {top['rows_decoded']:,} hypothesis-steps in "
        f"{top['wall_seconds']:.1f} s, {top['mean_rows_per_step']} hypotheses per step:",
        "",
        f"- inside the decoder's ONNX Runtime calls: **{sat['decoder_gflops_in_calls']:.1f} GFLOP/s**, "
        f"{sat['fraction_in_calls']:.0%} of the matmul rate;",
        f"- over the wall clock: **{sat['decoder_gflops_over_wall']:.1f} GFLOP/s**, "
        f"{sat['fraction_over_wall']:.0%} of the matmul rate.",
        "",
        f"Of the {top['wall_seconds']:.1f} s, the decoder calls took {top['decoder_seconds']:.1f} s, the encoder "
        f"calls {top['encoder_seconds']:.1f} s, and {other:.1f} s went elsewhere: the search's numpy work between "
        "steps, turning hypotheses into responses, gRPC, and the load generator itself, which shares the "
        f"{m['cpus']} cores (the server's processes used {top['cpu_seconds']:.1f} CPU-seconds of the "
        f"{m['cpus'] * top['wall_seconds']:.1f} available on its {m['cpus']} cores).",
        "",
        *_profile_lines(results),
        "## GPU",
        "",
        "No GPU was available for this run. On a CUDA machine the same command runs the server with the CUDA "
        "provider (`ATTN_DEVICE=auto`).",
        "",
    ]
    doc = out / "benchmarks.md"
    replace_section(doc, BEGIN, END, [BEGIN, *lines, END])  # the other benchmarks' sections stay
    return doc
