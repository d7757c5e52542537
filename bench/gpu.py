"""The GPU table of the serving targets (issue "GPU-grade serving"), measured in one run of a few minutes.

    bench/gpu-run.sh                      # on the GPU machine: python3 bench/gpu.py --sentences ... --out $OUT
    bench/gpu-run.sh --parts ceiling serving       # the same in two commands, where each has a time limit
    .venv/bin/python bench/gpu.py --device cpu --seconds 1 --clients 1 16 --out /tmp/gpu-dry   # its dry run here

docs/benchmarks.md ("Measuring on a GPU") says how to bring the project and its dependencies to a GPU machine
without network (``bench/gpu-pack.sh``). Everything below runs from one command and writes ``OUT/gpu.json`` and
``OUT/gpu.md`` a part at a time, so that what was measured comes back even if the machine is taken away before the
end (``--results OUT/gpu.json``, back here, writes its section of docs/benchmarks.md):

1. **environment**: the GPU (``nvidia-smi -L``), ONNX Runtime's version and providers, the cores;
2. **the model's own ceiling**: one decoder step of the translator for 1 to 4,096 rows (16 source tokens), with
   every output left on the device (I/O binding), and as the server runs it (the greedy reduction on the device;
   the candidates and attention rows copied back): milliseconds per step and row-steps per second;
3. **serving**: the real server (``python -m server``, ``ATTN_DEVICE``) at each client count, greedy and beam 4,
   full attention and none, fp32 and the fp16 variant (converted here from the fp32 graphs, as
   ``attn-export --fp16`` converts them): sentences/s, p50/p99, server cores (the engine process's and the
   front-ends' apart), and GPU utilisation sampled by ``nvidia-smi`` during the window; each server's first setting
   at the largest count once more with one client process more, to show that the load generator does not limit the
   figure; then the same with more rows decoded together than the default (``--batch-rows``), with the default
   lanes (by source length above 128 rows: a decoder call per lane and step) and with one lane up to that many
   rows (``ATTN_MIXED_LANE_ROWS``), and with more
   engine processes than one (``--engines``); as a batch job calls it, several sentences in each call
   (``--texts-per-call``), with as many engine processes as the most of ``--engines``; and one engine process
   driven on its socket without front-ends (``bench/engine_ceiling.py``): the cap of its Python, which says how
   many engines a device needs;
4. **the same outputs as on the CPU**: greedy and beam-4 tokens of the device's server against a CPU server's on the
   first sentences, and the largest attention difference where the tokens agree;
5. **Caption**: the bundled captioner's first call after ``ready`` and the p50 of the calls after it, on the device
   and on the CPU (the first measurement on an H200 found one image taking 175 ms on CUDA against 29 ms on the CPU);
   then its two graphs alone on the device, first call and later ones, and ONNX Runtime's profile of them: the
   time per provider and the costliest operators, which say whether nodes fell back to the CPU; and the same graphs
   with cuDNN's HEURISTIC convolution search instead of the default EXHAUSTIVE one, which says whether that search
   is what a first call pays; and the image encoder's first and second call at each of several batch sizes (under
   load the engine encodes the images it admits together, in batches of sizes the warm-up never ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench import engine_ceiling  # noqa: E402
from bench.arguments import non_negative_int, positive_float, positive_int, writable_file, writable_folder  # noqa: E402
from bench.loadgen import ServerProcess, client_checks, commit_of, drive, drive_processes, only_model  # noqa: E402
from bench.sections import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "docs" / "scenes-sat-example-1-input.png"
WAVE = 6  # Caption calls sent together
BEGIN, END = "<!-- gpu: written by bench/gpu.py -->", "<!-- /gpu -->"
ATTENTION = {"full": pb.ATTENTION_DETAIL_FULL, "none": pb.ATTENTION_DETAIL_NONE}
BATCH_CLIENTS = 128  # clients of the batch-job runs, each call holding --texts-per-call sentences
PARTS = ["ceiling", "serving", "batch_rows", "engines", "batch_jobs", "engine_ceiling", "same_outputs", "caption",
         "caption_graphs"]


class GpuUtilisation:
    """``nvidia-smi`` sampling the device's utilisation every 200 ms while it runs (nothing where there is none),
    each sample with the time it was read, so that a run's mean covers its measured window only (not the seconds its
    client processes take to start)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuUtilisation:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    def mean_since(self, start: float) -> float | None:
        window = [value for at, value in self.samples if at >= start]
        return round(statistics.fmean(window), 1) if window else None


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("nvidia-smi") else ""
    return {"gpus": gpus or "none", "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "device": device, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit_of(ROOT)}


def ceiling(model_dir: Path, texts: list[str], device_name: str, sizes: list[int], steps: int) -> list[
        dict[str, Any]]:
    """The decoder step alone at each row count: its outputs left on the device (the model's ceiling), and as the
    engine runs it (greedy reduction where the step ran, candidates and attention copied back). Both run from a
    state already on the device, as every step after a sentence's first does."""
    from server.artifacts import Manifest
    from server.device import choose, default_threads
    from server.iobinding import BoundStep
    from server.translation import TranslationModel

    device = choose(device_name)
    model = TranslationModel(model_dir, Manifest.load(model_dir), device, threads=default_threads())
    bound = BoundStep(model.decoder, device)
    binding = model.manifest.decoder
    names = list(binding.state.values())
    token_type = next(i.type for i in model.decoder.get_inputs() if i.name == binding.token_input)
    short = [t for t in texts if 12 <= len(model.prepare([t])[0].ids) <= 16] or texts  # about 16 source tokens
    rows = []
    for n in sizes:
        sources = [model.prepare([short[i % len(short)]])[0].ids for i in range(n)]
        state, static = model.encode(sources)
        tokens = np.full(n, model.bos_id, dtype=np.int64 if "int64" in token_type else np.int32)
        feeds = {binding.token_input: tokens}
        _, kept, _ = bound.run_outputs([], names, [], feeds, static, state)
        on_device_state = dict(zip(binding.state, kept, strict=True))
        _, _, served_state, _ = model.step_reduced(tokens, state, static, False, 1, [])

        steps_of: dict[str, Callable[[], Any]] = {
            "outputs_on_device": partial(bound.run_outputs, [], names, [binding.log_probs_output,
                                         binding.attention_output], feeds, static, on_device_state),
            "as_served": partial(model.step_reduced, tokens, served_state, static, False, 1, []),
        }
        row: dict[str, Any] = {"rows": n}
        for name, fn in steps_of.items():
            fn()  # the first call at a new shape pays for its allocations (and cuDNN's choices)
            started = time.perf_counter()
            for _ in range(steps):
                fn()
            ms = 1000 * (time.perf_counter() - started) / steps
            row[f"{name}_ms"] = round(ms, 3)
            row[f"{name}_row_steps_per_s"] = round(n * 1000 / ms)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fp16_copy(source: Path, target: Path) -> Path:
    """``source``'s model with an fp16 variant converted from its fp32 graphs by exporter.fp16, as ``attn-export
    --fp16`` converts them (that command also checks the variant's parity against PyTorch; here only its speed is
    measured, and the checkpoint need not be at hand)."""
    from exporter.fp16 import to_fp16

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    files = {}
    for graph in ("encoder", "decoder_step"):
        files[graph] = f"{graph}.fp16.onnx"
        to_fp16(target / f"{graph}.onnx", target / files[graph])
    manifest.setdefault("variants", {})["fp16"] = files
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def models_dir(work: Path, name: str, model: Path) -> Path:
    """A models folder holding ``model`` alone (a link), so that a server loads and warms up nothing else."""
    return only_model(work / name, model.parent)


def serving(models: Path, texts: list[str], device: str, variant: str, clients: list[int], beams: list[int],
            attention: list[str], seconds: float, processes: int, texts_per_call: int = 1,
            **settings: Any) -> list[dict[str, Any]]:
    """``settings``: more of the server's (``max_batch_rows=1024``), recorded with each row; ``texts_per_call``:
    sentences in each Translate call."""
    rows: list[dict[str, Any]] = []
    with ServerProcess(models, device=device, variant=variant, reload_interval=0, **settings) as server:
        for beam in beams:
            for detail in attention:
                options = pb.DecodingOptions(beam_size=beam, attention=ATTENTION[detail])
                drive(server.target, texts, min(clients[-1], 64), options, requests=256)  # warm-up
                checked = not rows  # each server's first setting: one client process more at the largest count
                for i, concurrency in enumerate([*clients, clients[-1]] if checked else clients):
                    extra = i == len(clients)
                    before, steps_before = server.cpu_seconds_by_role(), server.decoder_calls()
                    with GpuUtilisation() as gpu:
                        run = drive_processes(server.target, texts, concurrency, options, seconds=seconds,
                                              processes=(processes + 1 if extra else
                                                         1 if concurrency == 1 else processes),
                                              texts_per_call=texts_per_call)
                    ended = time.time()
                    cores = {role: round((seconds_now - before[role]) / run["seconds"], 2)
                             for role, seconds_now in server.cpu_seconds_by_role().items()}
                    decoded, calls = (now - earlier for now, earlier in zip(server.decoder_calls(), steps_before))
                    run.update(variant=variant or "fp32", beam=beam, attention=detail,
                               server_cores=round(sum(cores.values()), 2), engine_cores=cores["engine"],
                               frontend_cores=cores["frontends"], settings=settings,
                               rows_per_decoder_call=round(decoded / calls, 1) if calls else None,
                               gpu_utilisation=gpu.mean_since(ended - run["seconds"]),
                               check="one client process more" if extra else "")
                    rows.append(run)
                    print(json.dumps(run), flush=True)
    return rows


def answers(target: str, texts: list[str], beam: int) -> list[tuple[list[int], np.ndarray]]:
    """The best hypothesis of each text, one call each: token ids and the token-level attention matrix."""
    import grpc

    from attention_pb.v1 import attention_pb2_grpc as pb_grpc

    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        for text in texts:
            response = stub.Translate(pb.TranslateRequest(texts=[text], options=pb.DecodingOptions(
                beam_size=beam, attention=pb.ATTENTION_DETAIL_FULL)), timeout=60)
            best = response.translations[0].hypotheses[0]
            matrix = np.array(best.attention.values, dtype=np.float32).reshape(best.attention.rows,
                                                                                 best.attention.cols)
            out.append(([t.id for t in best.tokens], matrix))
    return out


def same_outputs(models: Path, texts: list[str], device: str, beams: list[int]) -> list[dict[str, Any]]:
    results = {}
    for where in ("cpu", device):
        with ServerProcess(models, device=where, reload_interval=0) as server:
            results[where] = {beam: answers(server.target, texts, beam) for beam in beams}
    rows = []
    for beam in beams:
        pairs = list(zip(results["cpu"][beam], results[device][beam]))
        equal = [(a, b) for a, b in pairs if a[0] == b[0]]
        diff = max((float(np.abs(a[1] - b[1]).max()) for a, b in equal if a[1].size), default=0.0)
        rows.append({"beam": beam, "sentences": len(pairs), "identical_tokens": len(equal),
                     "max_attention_difference": diff})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def caption(models: Path, where: str, calls: int) -> dict[str, Any]:
    import grpc

    from attention_pb.v1 import attention_pb2_grpc as pb_grpc

    image = IMAGE.read_bytes()
    with ServerProcess(models, device=where, reload_interval=0) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        latencies = []
        for _ in range(calls + 1):
            started = time.perf_counter()
            stub.Caption(pb.CaptionRequest(image=image), timeout=60)
            latencies.append(1000 * (time.perf_counter() - started))
        # Waves of calls sent together, which the engine encodes in batches larger than its warm-up's: the first wave
        # meets those batch sizes first, the second again.
        waves = []
        for _ in range(2):
            started = time.perf_counter()
            for future in [stub.Caption.future(pb.CaptionRequest(image=image), timeout=60) for _ in range(WAVE)]:
                future.result()
            waves.append(round(1000 * (time.perf_counter() - started), 1))
    row = {"device": where, "first_ms": round(latencies[0], 1), "p50_ms": round(statistics.median(latencies[1:]), 1),
           "min_ms": round(min(latencies[1:]), 1), "calls": calls, "wave": WAVE, "waves_ms": waves}
    print(json.dumps(row), flush=True)
    return row


def caption_graphs(model_dir: Path, device_name: str, calls: int, work: Path) -> dict[str, Any]:
    """Where a caption's time goes on ``device_name``: the image encoder and one decoder step (beam 4's rows), each
    timed at its first call and over the calls after it, then run once more under ONNX Runtime's profiler, whose
    per-node records say which provider ran each node and for how long (a node the GPU provider cannot take runs on
    the CPU, with copies across the bus around it)."""
    import onnxruntime as ort

    from server.artifacts import Manifest
    from server.captioning import CaptionModel
    from server.device import CPU, CUDA, choose, default_threads
    from server.imaging import decode

    device = choose(device_name)
    model = CaptionModel(model_dir, Manifest.load(model_dir), device, threads=default_threads())
    pixels = model.pixels(decode(IMAGE.read_bytes()))
    binding = model.manifest.decoder
    rows = 4
    state, static = model.encode([pixels] * rows)
    tokens = np.full(rows, model.bos_id, dtype=np.int64)
    out: dict[str, Any] = {"device": device.name}
    graphs: dict[str, tuple[str, dict[str, np.ndarray]]] = {
        "image_encoder": (model.manifest.encoder.file, {model.image_spec["input"]: pixels[None]}),
        "decoder_step": (model.manifest.decoder_step.file, {binding.token_input: tokens, **static, **state}),
    }
    for name, (file, feeds) in graphs.items():
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(work / f"profile-{name}")
        options.intra_op_num_threads = default_threads()
        session, timings = _timed_session(model_dir / file, options, device.providers, feeds, calls)
        trace = json.loads(Path(session.end_profiling()).read_text())
        nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
        by_provider: dict[str, float] = {}
        by_op: dict[str, float] = {}
        for e in nodes:
            provider, op = e["args"].get("provider", "?"), e["args"].get("op_name", "?")
            by_provider[provider] = by_provider.get(provider, 0.0) + e["dur"] / 1000
            by_op[f"{op} ({provider})"] = by_op.get(f"{op} ({provider})", 0.0) + e["dur"] / 1000
        runs = 2 + calls  # the profile covers every run of the session
        out[name] = {
            **timings,
            "node_ms_per_call_by_provider": {k: round(v / runs, 3) for k, v in by_provider.items()},
            "top_ops_ms_per_call": dict(sorted(((k, round(v / runs, 3)) for k, v in by_op.items()),
                                               key=lambda kv: -kv[1])[:8]),
        }
        print(json.dumps({name: out[name]}), flush=True)
    out["encoder_batches"] = _batch_shapes(model_dir / model.manifest.encoder.file, model.image_spec["input"],
                                           pixels, device.providers)
    print(json.dumps({"encoder_batches": out["encoder_batches"]}), flush=True)
    if device.name == "cuda":
        try:  # a failure here must not lose the profile above
            out.update(_heuristic_search(model_dir, graphs, calls))
            out["encoder_batches_heuristic"] = _batch_shapes(
                model_dir / model.manifest.encoder.file, model.image_spec["input"], pixels,
                [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU])
            print(json.dumps({"encoder_batches_heuristic": out["encoder_batches_heuristic"]}), flush=True)
        except Exception as exc:  # noqa: BLE001 - reported beside the results
            out["heuristic_error"] = repr(exc)
    return out


ENCODER_BATCHES = (1, 2, 3, 4, 6, 8, 16)


def _batch_shapes(graph: Path, name: str, pixels: np.ndarray, providers: list[Any]) -> dict[str, list[float]]:
    """The image encoder's first call at each batch size of :data:`ENCODER_BATCHES` (in that order, one session)
    and a second call at the same size, ms. The engine encodes the images it admits together in one call, so under
    load a captioner meets batch sizes its warm-up (1 and 2 images) never ran; where a new size's first call costs
    far more than its second, each new size pays a search of its own (cuDNN's EXHAUSTIVE one on CUDA)."""
    import onnxruntime as ort

    from server.device import default_threads

    options = ort.SessionOptions()
    options.intra_op_num_threads = default_threads()
    session = ort.InferenceSession(str(graph), options, providers=providers)
    session.run(None, {name: pixels[None]})  # the session's own first call, timed in the table above
    out = {}
    for size in ENCODER_BATCHES:
        feeds = {name: np.repeat(pixels[None], size, axis=0)}
        times = []
        for _ in range(2):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(round(1000 * (time.perf_counter() - started), 2))
        out[str(size)] = times
    return out


def _timed_session(graph: Path, options: Any, providers: list[Any], feeds: dict[str, np.ndarray],
                   calls: int) -> tuple[Any, dict[str, float]]:
    """A session for ``graph`` and what it cost: to create, its first call, the median of ``calls`` after it."""
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(str(graph), options, providers=providers)
    created = time.perf_counter()
    session.run(None, feeds)
    first = time.perf_counter()
    later = []
    for _ in range(calls):
        begun = time.perf_counter()
        session.run(None, feeds)
        later.append(time.perf_counter() - begun)
    return session, {"session_ms": round(1000 * (created - started), 1),
                     "first_call_ms": round(1000 * (first - created), 2),
                     "later_p50_ms": round(1000 * statistics.median(later), 3)}


def _heuristic_search(model_dir: Path, graphs: dict[str, tuple[str, dict[str, np.ndarray]]],
                      calls: int) -> dict[str, Any]:
    """The CUDA provider's default cuDNN convolution search (EXHAUSTIVE) benchmarks every algorithm at a shape's
    first call; HEURISTIC picks one from cuDNN's heuristics at once. The same graphs with it, unprofiled, say whether
    that search is what a first call pays."""
    import onnxruntime as ort

    from server.device import CPU, CUDA, default_threads

    providers: list[Any] = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    out: dict[str, Any] = {}
    for name, (file, feeds) in graphs.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads()
        out[f"{name}_heuristic"] = _timed_session(model_dir / file, options, providers, feeds, calls)[1]
        print(json.dumps({f"{name}_heuristic": out[f"{name}_heuristic"]}), flush=True)
    return out


def load_sentences(path: Path | None) -> list[str]:
    """The sentences to translate: a file of one per line (brought to the GPU machine), else Ding's held-out full
    sentences (``make data``)."""
    if path is not None:
        return [line for line in path.read_text().splitlines() if line.strip()]
    from bench.overhead import ding_sentences

    return ding_sentences()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "de-en-bahdanau" / "1")
    parser.add_argument("--captioner", type=Path, default=ROOT / "models" / "scenes-sat" / "1")
    parser.add_argument("--sentences", type=Path, help="one sentence per line (default: Ding's test split)")
    parser.add_argument("--write-sentences", type=writable_file, help="write the Ding test split's full sentences here "
                        "(to bring them to a machine without the corpus) and stop")
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--beams", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--attention", nargs="+", default=["full", "none"], choices=list(ATTENTION))
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--seconds", type=positive_float, default=4.0, help="measured seconds per serving run")
    parser.add_argument("--client-processes", type=positive_int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                        help="load generator processes (16 cores: 4, beside the server's front-ends and engine)")
    parser.add_argument("--batch-rows", type=positive_int, nargs="*", default=[1024],
                        help="ATTN_MAX_BATCH_ROWS settings to serve with besides the default, fp32, full attention, "
                             "at the largest client count")
    parser.add_argument("--engines", type=positive_int, nargs="*", default=[2, 4],
                        help="ATTN_ENGINES settings to serve with besides the default (one engine process), fp32, "
                             "full attention, at the largest client count")
    parser.add_argument("--texts-per-call", type=positive_int, default=16,
                        help=f"sentences in each call of the batch-job runs ({BATCH_CLIENTS} clients; 1: none)")
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[1, 64, 256, 1024, 4096])
    parser.add_argument("--steps", type=positive_int, default=50, help="timed decoder steps per row count")
    parser.add_argument("--compare", type=non_negative_int, default=200,
                        help="sentences compared with the CPU's outputs")
    parser.add_argument("--caption-calls", type=positive_int, default=30)
    parser.add_argument("--work", type=writable_folder, default=ROOT / "runs" / "bench-gpu")
    parser.add_argument("--out", type=writable_folder, default=ROOT / "runs" / "gpu-results",
                        help="writes OUT/gpu.json and OUT/gpu.md")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                        help="the parts to measure (a machine that limits each command's time can run them in two "
                             "commands, each writing its own gpu.json)")
    parser.add_argument("--results", type=Path, nargs="+",
                        help="measure nothing: write the section of these gpu.json files (the parts of one or more "
                             "runs) into --report")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    if args.results:
        replace_section(args.report, BEGIN, END, [BEGIN, *report(merged(args.results)), END])
        print(f"wrote the GPU section of {args.report}")
        return 0

    texts = load_sentences(args.sentences)
    if args.write_sentences:
        args.write_sentences.parent.mkdir(parents=True, exist_ok=True)
        args.write_sentences.write_text("".join(f"{t}\n" for t in texts))
        print(f"wrote {len(texts)} sentences to {args.write_sentences}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(args.device), "sentences": len(texts),
                               "seconds_per_run": args.seconds, "client_processes": args.client_processes}
    print(json.dumps(results["environment"]), flush=True)

    def save() -> None:  # after every part: what was measured survives a machine taken away mid-run
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "gpu.md").write_text("\n".join(report(results)) + "\n")

    def part(name: str, measure: Callable[[], Any]) -> None:
        """One part, saved when it ends; a part that fails is recorded and the next one runs (a machine lent for
        minutes should not lose the serving table to, say, the profiler)."""
        if name not in args.parts:
            return
        try:
            results[name] = measure()
        except Exception as error:  # noqa: BLE001 - recorded in the results and printed, then the next part
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
            print(f"{name} failed: {results['errors'][name]}", flush=True)
        save()

    translator = models_dir(args.work, "translator", args.model)

    def serving_table() -> list[dict[str, Any]]:
        rows = []
        for variant in args.variants:
            models = translator
            if variant == "fp16":
                models = models_dir(args.work, "translator-fp16",
                                    fp16_copy(args.model, args.work / "fp16" / args.model.parent.name / "1"))
            rows += serving(models, texts, args.device, "" if variant == "fp32" else variant, args.clients,
                            args.beams, args.attention, args.seconds, args.client_processes)
            results["serving"] = rows
            save()
        return rows

    captioner = models_dir(args.work, "captioner", args.captioner)
    part("ceiling", lambda: ceiling(args.model, texts, args.device, args.rows, args.steps))
    part("serving", serving_table)
    # Each number of rows with the default lanes (by source length above ATTN_MIXED_LANE_ROWS, 128: several
    # decoder calls per step) and with every source of up to 64 tokens in one call per step.
    part("batch_rows", lambda: [row for rows in args.batch_rows for mixed in (None, rows) for row in serving(
        translator, texts, args.device, "", args.clients[-1:], args.beams, ["full"], args.seconds,
        args.client_processes, max_batch_rows=rows, **({} if mixed is None else {"mixed_lane_rows": mixed}))])
    part("engines", lambda: [row for engines in args.engines for row in serving(
        translator, texts, args.device, "", args.clients[-1:], args.beams, ["full"], args.seconds,
        args.client_processes, engines=engines)])
    if args.texts_per_call > 1:
        # A batch job's calls: the call's own cost (gRPC, a front-end's turn) is paid once per many sentences. Its
        # queue limits are raised so that every client's call fits: BATCH_CLIENTS calls of this many sentences.
        part("batch_jobs", lambda: serving(
            translator, texts, args.device, "", [BATCH_CLIENTS], [1], ["full"], args.seconds, args.client_processes,
            texts_per_call=args.texts_per_call, engines=max([1, *args.engines]), max_batch_rows=1024,
            max_queue_tokens=BATCH_CLIENTS * args.texts_per_call * 128, max_texts=args.texts_per_call))
    part("engine_ceiling", lambda: engine_ceiling.ceiling(
        translator / args.model.parent.name / args.model.name, texts,
        pb.DecodingOptions(beam_size=1, attention=pb.ATTENTION_DETAIL_FULL),
        [args.client_processes, args.client_processes + 1], window=256, seconds=args.seconds, device=args.device,
        max_batch_rows=1024, max_queue_requests=1024))
    if args.device != "cpu" and args.compare:
        part("same_outputs", lambda: same_outputs(translator, texts[: args.compare], args.device, args.beams))
    part("caption", lambda: [caption(captioner, where, args.caption_calls)
                             for where in dict.fromkeys([args.device, "cpu"])])
    part("caption_graphs", lambda: caption_graphs(args.captioner, args.device, args.caption_calls, args.work))
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


def merged(files: list[Path]) -> dict[str, Any]:
    """The results of runs that measured different parts, as one: the first file's environment, every file's
    parts and errors (a later file's part replaces an earlier one's, and its error then goes)."""
    results: dict[str, Any] = {}
    for file in files:
        run = json.loads(file.read_text())
        errors = {name: error for name, error in results.get("errors", {}).items() if name not in run}
        results = {**run, **results, **{name: run[name] for name in PARTS if name in run}}
        results["errors"] = {**errors, **run.get("errors", {})}
    return results


def report(results: dict[str, Any]) -> list[str]:
    """The GPU section of docs/benchmarks.md."""
    env = results["environment"]
    lines = ["## The GPU table", "", f"Produced by `python bench/gpu.py` at commit {env['commit']} on "
             f"{results.get('finished', '?')}: {env['gpus']}; {env['cpus']} CPUs; onnxruntime {env['onnxruntime']} "
             f"({', '.join(env['providers'])}); device `{env['device']}`. {results['sentences']} sentences cycled, "
             f"{results['seconds_per_run']} s per run, {results['client_processes']} client processes.", ""]
    if results.get("ceiling"):
        lines += ["### The decoder step alone", "",
                  "| rows | outputs on the device: ms/step | row-steps/s | as the server runs it: ms/step | "
                  "row-steps/s |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['rows']} | {r['outputs_on_device_ms']} | {r['outputs_on_device_row_steps_per_s']:,} | "
                  f"{r['as_served_ms']} | {r['as_served_row_steps_per_s']:,} |" for r in results["ceiling"]]
        lines.append("")
    if results.get("serving"):
        lines += ["### The server", "", *_serving_table(results["serving"]), ""]
    if results.get("batch_rows"):
        lines += ["### Larger batches", "", "The server with more rows decoded together than its default "
                  "(`ATTN_MAX_BATCH_ROWS`, 256), fp32, at the largest client count; with the default lanes (above "
                  "`ATTN_MIXED_LANE_ROWS`, 128 rows, one decoder call per source-length lane and step) and with one "
                  "lane up to that many rows:", "",
                  *_serving_table(results["batch_rows"]), ""]
    if results.get("engines"):
        lines += ["### More engine processes", "", "The server with several engine processes on the device "
                  "(`ATTN_ENGINES`; the default is one), fp32, at the largest client count; engine cores are all "
                  "of them together:", "", *_serving_table(results["engines"]), ""]
    if results.get("batch_jobs"):
        lines += ["### Batch jobs", "", "Several sentences in each call, as a batch job sends them (`texts`), fp32, "
                  "greedy, full attention, 1,024 rows per batch, as many engine processes as the most measured "
                  "above. The call's own cost is paid once per call, not per sentence:", "",
                  *_serving_table(results["batch_jobs"]), ""]
    if results.get("engine_ceiling"):
        lines += ["### One engine process without front-ends", "", "Submitter processes speaking the engine's "
                  "records on its socket (`bench/engine_ceiling.py`), greedy, full attention, 1,024 rows per batch: "
                  "what one engine process answers when no front-end limits it.", "",
                  *engine_ceiling.table(results["engine_ceiling"]), ""]
    if results.get("same_outputs"):
        lines += ["### The same outputs as on the CPU", "", "| beam | sentences | identical tokens | largest attention "
                  "difference where they agree |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['beam']} | {r['sentences']} | {r['identical_tokens']} | {r['max_attention_difference']:.2e} |"
                  for r in results["same_outputs"]]
        lines.append("")
    if results.get("caption"):
        lines += ["### Caption, one image at a time", "", "| device | first call ms | p50 ms | fastest ms | calls | "
                  "calls sent together: first wave ms, second wave ms |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['device']} | {r['first_ms']} | {r['p50_ms']} | {r['min_ms']} | {r['calls']} | "
                  f"{r.get('wave', '–')}: {', '.join(str(w) for w in r.get('waves_ms', []))} |"
                  for r in results["caption"]]
        lines.append("")
    if results.get("caption_graphs"):
        graphs = results["caption_graphs"]
        lines += [f"The captioner's graphs alone on `{graphs['device']}` (the decoder step with beam 4's rows):", "",
                  "| graph | session ms | first call ms | later p50 ms | node ms per call by provider | costliest "
                  "operators (ms per call) |", "|---|---:|---:|---:|---|---|"]
        for name in ("image_encoder", "decoder_step"):
            g = graphs[name]
            providers = ", ".join(f"{k} {v}" for k, v in g["node_ms_per_call_by_provider"].items())
            ops = ", ".join(f"{k} {v}" for k, v in list(g["top_ops_ms_per_call"].items())[:5])
            lines.append(f"| {name} | {g['session_ms']} | {g['first_call_ms']} | {g['later_p50_ms']} | {providers} | "
                         f"{ops} |")
            if f"{name}_heuristic" in graphs:
                h = graphs[f"{name}_heuristic"]
                lines.append(f"| {name}, cuDNN search HEURISTIC | {h['session_ms']} | {h['first_call_ms']} | "
                             f"{h['later_p50_ms']} | | |")
        if "heuristic_error" in graphs:
            lines.append(f"\nThe graphs with cuDNN's HEURISTIC search failed: {graphs['heuristic_error']}")
        if "encoder_batches" in graphs:
            searches = [("default", graphs["encoder_batches"])]
            if "encoder_batches_heuristic" in graphs:
                searches.append(("cuDNN search HEURISTIC", graphs["encoder_batches_heuristic"]))
            lines += ["", "The image encoder at batch sizes its warm-up did not run (one session; first and second "
                      "call at each size, ms):", "",
                      "| search | " + " | ".join(f"{b} images" for b in graphs["encoder_batches"]) + " |",
                      "|---|" + "---:|" * len(graphs["encoder_batches"])]
            lines += [f"| {label} | " + " | ".join(f"{t[0]} / {t[1]}" for t in batches.values()) + " |"
                      for label, batches in searches]
        lines.append("")
    for name, error in results.get("errors", {}).items():
        lines += [f"- `{name}` failed: {error}"]
    return lines



def _serving_table(rows: list[dict[str, Any]]) -> list[str]:
    """Client cores: the load generator's processes together, and the busiest one (near 1.0: the clients limit);
    server CPU in cores: the whole tree, then the engine process and the front-ends apart (one at 1.0 is a
    process that limits the server); rows per decoder call: how many sentences' rows (× beam) each step decoded
    together, which a device's cost per sentence falls with."""
    lines = ["| variant | settings | beam | attention | clients | client processes | client cores (busiest process) | "
             "sentences/s | p50 ms | p99 ms | server cores | engine cores | front-end cores | rows per decoder call | "
             "GPU utilisation % | codes |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        per_call = r.get("texts_per_call", 1)
        clients = f"{r['concurrency']}" + (f" × {per_call} sentences" if per_call > 1 else "") + \
            (" (check)" if r["check"] else "")
        gpu = "–" if r["gpu_utilisation"] is None else r["gpu_utilisation"]
        settings = ", ".join(f"{k} {v}" for k, v in r.get("settings", {}).items()) or "default"
        client_cores = f"{r['client_cores']} ({r['busiest_client_cores']})" if "client_cores" in r else "–"
        lines.append(f"| {r['variant']} | {settings} | {r['beam']} | {r['attention']} | {clients} | "
                     f"{r['client_processes']} | {client_cores} | {r['sentences_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | "
                     f"{r['server_cores']} | {r.get('engine_cores', '–')} | {r.get('frontend_cores', '–')} | "
                     f"{r.get('rows_per_decoder_call') or '–'} | {gpu} | "
                     f"{', '.join(f'{k} {v}' for k, v in r['codes'].items())} |")
    checks = client_checks(rows)  # the (check) rows in words: did one client process more raise the figure?
    return lines + (["", *(f"- {check}" for check in checks)] if checks else [])


if __name__ == "__main__":
    sys.exit(main())
