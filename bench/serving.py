"""The serving benchmark (issue 6): the real server under load, against what a user without it would do.

    .venv/bin/python bench/serving.py      # docs/benchmarks.md, docs/benchmarks/serving.json and serving.png

In one run, on the test split's full sentences of the Ding dictionary and the bundled ``de-en-bahdanau`` model:

(a) PyTorch eager greedy decoding of the model's checkpoint, one sentence after another (``--checkpoint``, made by
    ``make models``; skipped with a note when absent);
(b) the server with batching off (``ATTN_BATCHING=false``: one request at a time);
(c) the server with batching on;

over concurrency 1, 4, 16, 64, 256 (greedy, full attention), and at concurrency 64 greedy and beam 4, with and
without attention in the responses. Then: the overload case (concurrency 256 against a queue of 16), the server's
RSS over 20,000 requests with every bundled model loaded, the machine's matrix-multiply rate and the decoder's
achieved rate at the highest concurrency, and where the server's time went (its own metrics). The server runs in a
child process; the load generator (:func:`bench.loadgen.drive_processes`) in ``--client-processes`` processes of its
own, and (c) at 256 clients runs once more with one process more, to show that the clients did not limit the figure.
The RSS soak, which counts requests rather than timing them, sends them from this process.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.arguments import non_negative_int, positive_float, positive_int, writable_folder  # noqa: E402
from bench.loadgen import ServerProcess, client_check, drive, drive_processes, only_model, stability  # noqa: E402
from bench.sections import command_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the defaults are this checkout's, from whatever folder it is run
CONCURRENCY = [1, 4, 16, 64, 256]
FULL, NONE = pb.ATTENTION_DETAIL_FULL, pb.ATTENTION_DETAIL_NONE


def test_sentences(limit: int) -> list[str]:
    from training.data.corpus import load_corpus, split
    from training.evaluate import group_references

    sources, _, is_sentence = group_references(split(load_corpus("ding"))["test"])
    sentences = [s for s, full in zip(sources, is_sentence) if full]
    return sentences[:limit] if limit else sentences


def eager(checkpoint: Path, tokenizer: Path, texts: list[str], seconds: float) -> dict[str, Any]:
    """(a): the checkpoint in PyTorch, greedy, one sentence after another, as a user without a server would."""
    import sentencepiece as spm
    import torch

    from training import checkpoint as ckpt
    from training.models.decoding import greedy

    model = ckpt.build_model(ckpt.load(checkpoint))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    eos = model.cfg.eos_id
    outputs: dict[int, list[int]] = {}
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - started < seconds:
            i = len(outputs)
            ids = sp.encode(texts[i % len(texts)])[:127] + [eos]
            src = torch.tensor([ids])
            found, _ = greedy(model, src, torch.tensor([len(ids)]), 2 * len(ids) + 10)
            outputs[i] = found[0] + [eos]
            tokens += len(outputs[i])
    elapsed = time.perf_counter() - started
    return {"sentences_per_s": round(len(outputs) / elapsed, 2), "target_tokens_per_s": round(tokens / elapsed, 1),
            "sentences": len(outputs), "seconds": round(elapsed, 2), "torch_threads": torch.get_num_threads(),
            "outputs": {i % len(texts): o for i, o in outputs.items()}}


def matmul_gflops(size: int = 1024, repeats: int = 10) -> dict[str, float]:
    """The machine's float32 matrix-multiply rate, best of three, through numpy's BLAS and through ONNX Runtime's
    MatMul (the kernel the server uses) with one thread and with every core."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)

    def rate(fn: Any) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                fn()
            best = min(best, time.perf_counter() - started)
        return round(2 * size**3 * repeats / best / 1e9, 1)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rates = {"numpy": rate(lambda: a @ b)}
    for threads in (1, os.cpu_count() or 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        matmul = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rates[f"onnxruntime_{threads}_threads"] = rate(functools.partial(matmul.run, None, {"a": a}))
    return rates


def decoder_flops_per_row(decoder: Path) -> int:
    """Multiply-adds ×2 of the decoder step's weight matrices for one row (MatMul/Gemm against initialisers);
    attention over the source adds a length-dependent term that this leaves out."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(decoder)).graph
    weights = {init.name: numpy_helper.to_array(init).shape for init in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                shape = weights.get(name)
                if shape is not None and len(shape) == 2:
                    total += 2 * shape[0] * shape[1]
    return total


def step_costs(model_dir: Path, texts: list[str], sizes: tuple[int, ...] = (1, 4, 16, 64, 256)) -> list[
        dict[str, float]]:
    """The graphs alone, in this process, with the server's thread setting: encoder milliseconds per sentence and
    decoder milliseconds per row by batch size. Batching can win at most the ratio of the first row to the best."""
    from server.artifacts import Manifest
    from server.device import choose, default_threads
    from server.translation import TranslationModel

    model = TranslationModel(model_dir, Manifest.load(model_dir), choose("cpu"), "", default_threads())
    costs = []
    for n in sizes:
        sources = [s.ids for s in model.prepare([texts[i % len(texts)] for i in range(n)])]
        state, static = model.encode(sources)
        tokens = np.full(n, model.bos_id)
        model.step(tokens, state, static)
        encoder = min(_seconds(model.encode, sources) for _ in range(3))
        decoder = min(_seconds(model.step, tokens, state, static) for _ in range(10))
        costs.append({"batch": n, "encoder_ms_per_sentence": round(encoder * 1000 / n, 3),
                      "decoder_ms_per_row": round(decoder * 1000 / n, 4)})
    return costs


def _seconds(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def decoder_weights(decoder: Path) -> list[dict[str, Any]]:
    """The decoder step's weight matrices by their share of its multiply-adds: what a faster step must shrink."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(decoder)).graph
    shapes = {init.name: numpy_helper.to_array(init).shape for init in graph.initializer}
    found = [(name, shapes[name]) for node in graph.node if node.op_type in ("MatMul", "Gemm")
             for name in node.input[:2] if name in shapes and len(shapes[name]) == 2]
    total = sum(a * b for _, (a, b) in found)
    return [{"weight": name, "shape": list(shape), "share": round(shape[0] * shape[1] / total, 3)}
            for name, shape in sorted(found, key=lambda f: -f[1][0] * f[1][1])]


ENTRY = ("server/cli.py", "server/__main__.py", "server/app.py", "server/processes.py")  # below all a process runs


def _category(frames: list[str]) -> str:
    """What a working sample was doing: ONNX Runtime's calls wherever they are, else the innermost of the server's
    own frames below its entry points."""
    if any("Session.run (onnxruntime" in f for f in frames):
        return "ONNX Runtime calls (encoder and decoder)"
    own = [f for f in frames if "(server/" in f and not any(e in f for e in ENTRY)]
    leaf = own[-1] if own else ""
    if "(server/ipc/" in leaf:
        return "records to and from the engine (server/ipc/)"
    if any(m in leaf for m in ("(server/search.py", "(server/reductions.py", "(server/engine/lanes.py")):
        return "search and lanes between steps"
    if "(server/engine/" in leaf:
        return "scheduling: joins, finishes (server/engine/core.py)"
    if any(m in leaf for m in ("translation.py", "codec.py", "artifacts/", "captioning.py")):
        return "tokenizing and building responses"
    if "logs.py" in leaf:
        return "log lines (server/logs.py)"
    if leaf:
        return "RPC handlers and metrics"
    if any(m in f for f in frames for m in ("grpc", "asyncio", "selectors.py")):
        return "gRPC and the event loop"
    return "other"


def profile(server: ServerProcess, seconds: float, out: Path) -> dict[str, float] | None:
    """Samples every process of the server with py-spy (the dev extra installs it): :func:`sample_shares`."""
    import shutil
    import subprocess

    spy = Path(sys.executable).parent / "py-spy"  # the virtual environment's, whether or not it is on PATH
    found = str(spy) if spy.exists() else shutil.which("py-spy")
    if found is None:
        return None
    roles = server.roles()
    done = subprocess.run([found, "record", "-p", str(server.process.pid), "-d", str(int(seconds)), "-f", "raw",
                           "-o", str(out), "--nonblocking", "--subprocesses"], capture_output=True)
    if done.returncode != 0 or not out.exists():
        return None
    return sample_shares(out.read_text(), roles)


def sample_shares(raw: str, roles: dict[int, str]) -> dict[str, float]:
    """py-spy's raw samples (``--subprocesses``: one line per stack and count) as shares of the working samples by
    "role: :func:`_category`", the process's role from ``roles`` (pid -> role; the parent's where it is missing)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in ("select (selectors.py", "wait (threading.py", "_worker (concurrent")):
            continue  # a thread waiting for work
        # With --subprocesses a stack starts with its process and the processes above it: "process PID:cmdline"
        process = next((f for f in reversed(frames) if f.startswith("process ")), "process 0:")
        role = roles.get(int(process.split()[1].split(":")[0]), "parent")
        key = f"{role.replace('frontends', 'front-ends')}: {_category(frames)}"
        counts[key] = counts.get(key, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def server_run(server: ServerProcess, texts: list[str], concurrency: int, options: pb.DecodingOptions,
               seconds: float, processes: int, model: str = "de-en-bahdanau") -> tuple[dict[str, Any],
                                                                                   dict[int, list[int]]]:
    """One measured run from ``processes`` client processes, with the server's own account of where its time went;
    and the best hypothesis's ids by sentence index."""
    drive(server.target, texts, min(concurrency, 8), options, requests=min(concurrency, 8) * 2)  # warm-up
    before = server.metrics()
    summary = drive_processes(server.target, texts, concurrency, options, seconds=seconds, processes=processes,
                              outputs=True)
    after = server.metrics()  # the scrapes also cover the client processes' start: the server idles in it

    def delta(prefix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))

    outputs = summary.pop("outputs")
    steps = delta("attn_batch_hypotheses_count")
    summary["server"] = {
        "cpu_seconds": round(delta("attn_process_cpu_seconds_total"), 2), "wall_seconds": summary["seconds"],
        "decoder_seconds": round(delta(f'attn_compute_duration_seconds_sum{{model="{model}",stage="decoder"'), 2),
        "encoder_seconds": round(delta(f'attn_compute_duration_seconds_sum{{model="{model}",stage="encoder"'), 2),
        "decoder_steps": int(steps),
        "mean_rows_per_step": round(delta("attn_batch_hypotheses_sum") / steps, 1) if steps else 0.0,
        "mean_requests_per_step": round(delta("attn_batch_requests_sum") / steps, 1) if steps else 0.0,
        "rows_decoded": int(delta("attn_batch_hypotheses_sum")),
    }
    return summary, outputs


def rss_stability(rss: list[float]) -> dict[str, float]:
    """:func:`bench.loadgen.stability` after the first chunk (allocator warm-up)."""
    settled = stability(rss, 1)
    return {f"rss_{key}": value for key, value in settled.items()}


def identical(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict[str, int]:
    both = sorted(set(a) & set(b))
    return {"compared": len(both), "identical": sum(a[i] == b[i] for i in both)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="de-en-bahdanau")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "de-en-bahdanau" / "best.pt")
    parser.add_argument("--seconds", type=positive_float, default=12.0, help="measured seconds per run")
    parser.add_argument("--sentences", type=non_negative_int, default=0,
                        help="test sentences to cycle through (0: all)")
    parser.add_argument("--client-processes", type=positive_int, default=3,
                        help="processes the load generator runs in (at most one per client)")
    parser.add_argument("--soak-requests", type=positive_int, default=20_000)
    parser.add_argument("--out", type=writable_folder, default=ROOT / "docs")
    args = parser.parse_args(argv)

    started = time.monotonic()
    texts = test_sentences(args.sentences)
    only = args.models_dir / args.model / "1"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sentences": len(texts), "seconds_per_run": args.seconds, "model": args.model,
        "client_processes": args.client_processes,
    }
    print(f"{len(texts)} test sentences; {args.seconds:.0f} s per run", flush=True)
    results["matmul_rates"] = matmul_gflops()
    results["matmul_gflops"] = max(results["matmul_rates"].values())
    results["decoder_flops_per_row"] = decoder_flops_per_row(only / "decoder_step.onnx")
    results["decoder_weights"] = decoder_weights(only / "decoder_step.onnx")
    results["step_costs"] = step_costs(only, texts)

    outputs: dict[str, dict[int, list[int]]] = {}
    if args.checkpoint.exists():
        a = eager(args.checkpoint, only / "spm.model", texts, args.seconds)
        outputs["a"] = a.pop("outputs")
        results["a"] = a
        print(f"(a) eager: {a['sentences_per_s']} sentences/s", flush=True)
    else:
        results["a"] = None
        print(f"(a) skipped: no checkpoint at {args.checkpoint} (make models writes it)", flush=True)

    one_model = only_model(ROOT / "runs" / "bench-models", only.parent)  # the benchmarked model alone, for (b) and (c)
    for label, batching in (("b", False), ("c", True)):
        runs: list[dict[str, Any]] = []
        with ServerProcess(one_model, batching=batching) as server:
            for concurrency in CONCURRENCY:
                summary, outputs[f"{label}-greedy-{concurrency}"] = server_run(
                    server, texts, concurrency, pb.DecodingOptions(beam_size=1), args.seconds, args.client_processes,
                    args.model)
                summary.update(beam=1, attention=True)
                runs.append(summary)
                print(f"({label}) c={concurrency}: {summary['sentences_per_s']} sentences/s, "
                      f"p99 {summary['p99_ms']} ms", flush=True)
            if batching:
                highest = max(CONCURRENCY)
                more, _ = server_run(server, texts, highest, pb.DecodingOptions(beam_size=1), args.seconds,
                                     args.client_processes + 1, args.model)
                results["c_more_clients"] = {**more, "beam": 1, "attention": True}
                print(f"({label}) {client_check(runs[-1], more)}", flush=True)
                with ThreadPoolExecutor(1) as spy:  # a separate run under the profiler: its cost is in no number
                    shares = spy.submit(profile, server, max(args.seconds - 2, 1),
                                       ROOT / "runs" / "bench-profile.txt")
                    drive_processes(server.target, texts, highest, pb.DecodingOptions(beam_size=1),
                                    seconds=args.seconds, processes=args.client_processes)
                results["profile_c256"] = shares.result()
            for beam in (1, 4):
                for attention in (True, False):
                    if beam == 1 and attention:
                        continue  # measured in the sweep above
                    options = pb.DecodingOptions(beam_size=beam, attention=FULL if attention else NONE)
                    summary, outputs[f"{label}-beam{beam}-{'attn' if attention else 'noattn'}-64"] = server_run(
                        server, texts, 64, options, args.seconds, args.client_processes, args.model)
                    summary.update(beam=beam, attention=attention)
                    runs.append(summary)
                    print(f"({label}) c=64 beam {beam} attention {attention}: {summary['sentences_per_s']} "
                          "sentences/s", flush=True)
        results[label] = runs

    results["identical"] = {
        "c64_vs_b64_greedy": identical(outputs["c-greedy-64"], outputs["b-greedy-64"]),
        "c64_vs_b64_beam4": identical(outputs["c-beam4-attn-64"], outputs["b-beam4-attn-64"]),
        **({"c64_vs_a_greedy": identical(outputs["c-greedy-64"], outputs["a"])} if "a" in outputs else {}),
    }

    with ServerProcess(one_model, variant="int8") as server:  # the dynamically quantised graphs of the same model
        summary, int8_outputs = server_run(server, texts, 64, pb.DecodingOptions(beam_size=1), args.seconds,
                                           args.client_processes, args.model)
        results["int8"] = {**summary, "identical_to_fp32": identical(int8_outputs, outputs["c-greedy-64"])}
        print(f"int8 c=64: {summary['sentences_per_s']} sentences/s", flush=True)

    with ServerProcess(one_model, max_queue_requests=16) as server:
        summary, _ = server_run(server, texts, 256, pb.DecodingOptions(beam_size=1), args.seconds,
                                args.client_processes, args.model)
        results["overload"] = {**summary, "max_queue_requests": 16}
        print(f"overload: {summary['codes']}", flush=True)

    with ServerProcess(args.models_dir) as server:  # every bundled model loaded
        chunk = max(args.soak_requests // 20, 1)  # 20 readings: the requests sent are a multiple of 20
        soak: dict[str, Any] = {"requests": 20 * chunk, "rss_mib": []}
        soak["rss_mib_loaded"] = round(server.rss_bytes() / 2**20, 1)
        codes: dict[str, int] = {}
        for _ in range(20):
            run = drive(server.target, texts, 64, pb.DecodingOptions(beam_size=1, attention=FULL), requests=chunk)
            for code, n in run.codes.items():
                codes[code] = codes.get(code, 0) + n
            soak["rss_mib"].append(round(server.rss_bytes() / 2**20, 1))
        soak["codes"] = codes
        rss = soak["rss_mib"]
        soak.update(rss_stability(rss))
        results["soak"] = soak
        print(f"soak: RSS {rss[0]} .. {rss[-1]} MiB", flush=True)

    top = results["c"][CONCURRENCY.index(max(CONCURRENCY))]["server"]
    flops = top["rows_decoded"] * results["decoder_flops_per_row"]
    results["saturation"] = {
        "decoder_gflops_in_calls": round(flops / max(top["decoder_seconds"], 1e-9) / 1e9, 2),
        "decoder_gflops_over_wall": round(flops / max(top["wall_seconds"], 1e-9) / 1e9, 2),
    }
    for key in ("in_calls", "over_wall"):
        results["saturation"][f"fraction_{key}"] = round(
            results["saturation"][f"decoder_gflops_{key}"] / results["matmul_gflops"], 3)

    from bench.serving_report import write_report

    results["minutes"] = round((time.monotonic() - started) / 60, 1)

    doc = write_report(results, args.out, command_line("serving.py", argv))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
