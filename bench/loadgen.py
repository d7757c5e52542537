"""A load generator for the serving benchmark: the real server in a child process, N concurrent gRPC clients here.

:class:`ServerProcess` starts ``python -m server`` with the given settings on free ports, reads its JSON log lines
until it is ready, and exposes its pid (for RSS) and metrics (for where the time went). :func:`drive` runs
``concurrency`` clients, each sending one ``Translate`` after another over a shared list of sentences, for a fixed
time or a fixed number of requests, and reports sentences/s, target tokens/s, latency percentiles and status codes.

The clients share connections, one per :data:`CLIENTS_PER_CONNECTION`: a server with several front-end processes
gives each connection to one of them (the kernel picks by a hash of the client's port), so with one connection per
client process two processes would land on the same front-end half the time, and the figure would be a coin's.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from client.connection import MAX_MESSAGE_BYTES, OWN_CONNECTION
from server.processes import process_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_PER_CONNECTION = 8  # clients sharing one connection (the module's docstring says why not all of them)
CHECK_TOLERANCE = 0.05  # a run with one client process more within this of the figure: the clients did not limit it


class ServerProcess:
    """``attn-serve`` in a child process; ``settings`` are ``ATTN_*`` names without the prefix, lower case."""

    def __init__(self, models_dir: Path, root: Path = ROOT, log_path: Path | None = None, **settings: Any) -> None:
        """``root``: the checkout whose server runs (another commit's, to compare with); ``log_path``: a file that
        gets every line the server logs."""
        env = {**os.environ, "ATTN_MODELS_DIR": str(models_dir), "ATTN_PORT": "0", "ATTN_METRICS_PORT": "0",
               "ATTN_HOST": "127.0.0.1", "ATTN_LOG_FORMAT": "json", "ATTN_LOG_LEVEL": "WARNING"}
        env.update({f"ATTN_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                    for k, v in settings.items()})
        env["ATTN_LOG_LEVEL"] = "INFO"  # the listening and ready lines
        self.process = subprocess.Popen([sys.executable, "-m", "server"], env=env, cwd=root,
                                        stderr=subprocess.PIPE, text=True)
        self.port = self.metrics_port = 0
        self.engine_addresses: list[str] = []  # the engine processes' sockets (none in one-process mode)
        assert self.process.stderr is not None
        sink = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115 (the drain's to close)
        for line in self.process.stderr:
            if sink:
                sink.write(line)
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == "listening":
                self.port, self.metrics_port = int(record["port"]), int(record["metrics_port"])
                self.engine_addresses = list(record.get("engines", []))
            if record.get("event") == "ready":
                break
            if record.get("event") == "startup_failed":
                raise RuntimeError(f"the server did not start: {record.get('error')}")
        else:
            raise RuntimeError(f"the server exited with {self.process.wait()} before it was ready")
        # Keep draining its log so that it never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(sink,), daemon=True).start()

    def _drain(self, sink: TextIO | None) -> None:
        for line in self.process.stderr or ():
            if sink:
                sink.write(line)
                sink.flush()
        if sink:
            sink.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident memory of the server and of every live process below it (front-ends, the engine)."""
        return sum(rss for _, rss in self.rss_by_process().values())

    def processes(self) -> dict[int, str]:
        """pid -> name of every live process of the server's tree: the process's own (/proc/PID/comm:
        ``attn-engine-0``, ``attn-frontend-0``); the parent: ``server``."""
        out = {}
        for pid in process_tree(self.process.pid):
            try:
                out[pid] = "server" if pid == self.process.pid else Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:  # exited meanwhile
                continue
        return out

    def rss_by_process(self) -> dict[int, tuple[str, int]]:
        """pid -> (name, resident bytes) of the server's process tree (names as :meth:`processes` gives them)."""
        out = {}
        for pid, name in self.processes().items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:  # exited meanwhile
                continue
            out[pid] = (name, next((int(line.split()[1]) * 1024 for line in status.splitlines()
                                    if line.startswith("VmRSS:")), 0))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and of every live process below it, from /proc (the same for any
        commit's server, whatever its metrics)."""
        return tree_cpu_seconds(self.process.pid)

    def cpu_seconds_by_role(self) -> dict[str, float]:
        """The same split by role: ``engine`` (the engine processes), ``frontends`` (every front-end) and ``parent``
        (the server process itself, which in one-process mode is all of it, and its helpers such as
        multiprocessing's resource tracker). Under load one role at a full core says which process limits the
        server."""
        return self._by_role(process_cpu_seconds)

    def wakeups_by_role(self) -> dict[str, float]:
        """Per role as :meth:`cpu_seconds_by_role`: how many times the processes' threads have gone to sleep to be
        woken later (their voluntary context switches). A wake-up is a fixed cost, however little the thread then
        does: with one request at a time the server pays every one of them on each request."""
        return self._by_role(process_wakeups)

    def roles(self) -> dict[int, str]:
        """pid -> role of every live process of the server's tree, as :meth:`cpu_seconds_by_role` names them."""
        return {pid: ("engine" if name.startswith("attn-engine") else "frontends"
                      if name.startswith("attn-frontend") else "parent") for pid, name in self.processes().items()}

    def _by_role(self, count: Callable[[int], float]) -> dict[str, float]:
        roles = {"parent": 0.0, "engine": 0.0, "frontends": 0.0}
        for pid, role in self.roles().items():
            roles[role] += count(pid)
        return roles

    def metrics(self) -> dict[str, float]:
        """Every unlabelled-or-labelled sample of /metrics, keyed by its exposition line's name and labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def decoder_calls(self) -> tuple[float, float]:
        """(rows, decoder calls) so far, every model's, from the engines' ``attn_batch_hypotheses`` histogram."""
        samples = self.metrics()
        return (sum(v for k, v in samples.items() if k.startswith("attn_batch_hypotheses_sum")),
                sum(v for k, v in samples.items() if k.startswith("attn_batch_hypotheses_count")))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_tree(root: int) -> list[int]:
    """Process ``root`` and every live process below it, from /proc."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        try:
            children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]  # any thread's children
        except FileNotFoundError:  # exited meanwhile
            continue
        found.append(pid)
        pending.extend(int(child) for child in children)
    return found


def process_wakeups(pid: int) -> int:
    """Voluntary context switches of a live process, summed over its threads, from /proc; 0 once it has exited."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread exited meanwhile
            continue
        total += next((int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("voluntary_ctxt_switches:")), 0)
    return total


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of process ``root`` and of every live process below it, from /proc."""
    return sum(process_cpu_seconds(pid) for pid in process_tree(root))


def only_model(folder: Path, model: Path) -> Path:
    """``folder`` as a models folder holding one model, ``model`` (a model's folder: NAME with its versions below),
    through a link: a server started on it loads that model and nothing else. Links an earlier run left there, to
    another copy of the model or to another model, are replaced: the run serves what its own arguments name."""
    target = model.resolve()
    if not target.is_dir():
        raise FileNotFoundError(f"no model folder at {model}")
    folder.mkdir(parents=True, exist_ok=True)
    for link in folder.iterdir():
        if link.is_symlink() and (link.name != model.name or link.resolve() != target):
            link.unlink()
    link = folder / model.name
    if not link.is_symlink():
        link.symlink_to(target)
    return folder


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Stamps ``results`` with the time the benchmark finished and writes them to ``path`` as JSON."""
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def commit_of(checkout: Path = ROOT) -> str:
    """The short hash of ``checkout``'s HEAD, the commit a benchmark measured ("?" outside a git checkout)."""
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def stability(totals: list[float], start: int) -> dict[str, float]:
    """Of a series of memory readings, from index ``start`` on (after the warm-up): the median, the largest
    relative deviation from it, and the drift from the first quarter's mean to the last quarter's (relative to the
    median)."""
    settled = totals[start:]
    median = float(np.median(settled))
    quarter = max(len(settled) // 4, 1)
    return {"median_mib": round(median, 1),
            "max_deviation": round(max(abs(x - median) for x in settled) / median, 4),
            "drift": round(float(np.mean(settled[-quarter:]) - np.mean(settled[:quarter])) / median, 4)}


@dataclass
class Run:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of OK requests
    codes: Counter[str] = field(default_factory=Counter)
    target_tokens: int = 0
    sentences: int = 0  # translated by OK requests
    outputs: dict[int, list[int]] = field(default_factory=dict)  # sentence index -> best hypothesis's ids

    def summary(self) -> dict[str, Any]:
        ok = self.codes.get("OK", 0)
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {
            "concurrency": self.concurrency, "seconds": round(self.seconds, 2), "requests": sum(self.codes.values()),
            "ok": ok, "sentences_per_s": round(self.sentences / self.seconds, 2),
            "target_tokens_per_s": round(self.target_tokens / self.seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
            "codes": dict(self.codes),
        }


async def _drive(target: str, texts: list[str], concurrency: int, options: pb.DecodingOptions,
                 seconds: float, requests: int, deadline: float, texts_per_call: int = 1, start: int = 0) -> Run:
    run = Run(concurrency, 0.0)
    counter = iter(range(10**9))
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                           OWN_CONNECTION])
                for _ in range(-(-concurrency // CLIENTS_PER_CONNECTION))]
    started = time.perf_counter()
    stop_at = started + seconds if seconds else float("inf")

    async def client(stub: pb_grpc.AttentionServiceAsyncStub) -> None:
        while time.perf_counter() < stop_at:
            n = next(counter)
            if requests and n >= requests:
                return
            first = start + n * texts_per_call
            chosen = [(first + j) % len(texts) for j in range(texts_per_call)]
            sent = time.perf_counter()
            try:
                response = await stub.Translate(pb.TranslateRequest(texts=[texts[i] for i in chosen],
                                                                    options=options), timeout=deadline)
            except grpc.aio.AioRpcError as error:
                run.codes[error.code().name] += 1
                continue
            run.latencies.append(time.perf_counter() - sent)
            run.codes["OK"] += 1
            run.sentences += len(chosen)
            for i, translation in zip(chosen, response.translations):
                best = translation.hypotheses[0]
                run.target_tokens += len(best.tokens)
                run.outputs[i] = [t.id for t in best.tokens]

    stubs = [pb_grpc.AttentionServiceStub(channel) for channel in channels]
    await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(concurrency)))
    run.seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return run


def drive(target: str, texts: list[str], concurrency: int, options: pb.DecodingOptions, *, seconds: float = 0.0,
          requests: int = 0, deadline: float = 120.0, texts_per_call: int = 1, start: int = 0) -> Run:
    """``concurrency`` clients sending sentences of ``texts`` in turn from the one at ``start``, ``texts_per_call``
    in each Translate call, for ``seconds`` or ``requests`` calls in all."""
    return asyncio.run(_drive(target, texts, concurrency, options, seconds, requests, deadline, texts_per_call, start))


def _drive_part(args: tuple[str, list[str], int, bytes, float, float, int, int, bool]) -> dict[str, Any]:
    target, texts, concurrency, options, seconds, start_at, texts_per_call, start, outputs = args
    time.sleep(max(0.0, start_at - time.time()))  # every part measures the same window
    cpu, began = time.process_time(), time.time()  # CPU: every thread of this client process, gRPC's included
    run = drive(target, texts, concurrency, pb.DecodingOptions.FromString(options), seconds=seconds,
                texts_per_call=texts_per_call, start=start)
    return {"ok": run.sentences, "codes": dict(run.codes), "target_tokens": run.target_tokens,
            "latencies": run.latencies, "seconds": run.seconds, "cpu_seconds": time.process_time() - cpu,
            "began": began, "ended": time.time(), **({"outputs": run.outputs} if outputs else {})}


class ClientProcesses:
    """The load generator's processes, kept from one run to the next. A spawned process takes a second or two to
    import gRPC and the messages, and every run would wait for it: the GPU script makes some forty runs of 4 s on a
    machine lent for minutes. The pool grows when a run asks for more processes than it has."""

    def __init__(self) -> None:
        self._pool: Any = None
        self.size = 0
        self.warm = False  # a run has gone through every process: they have imported what they need

    def start(self, processes: int) -> float:
        """Makes sure ``processes`` are up; returns when a run on them should start its window, so that every part
        measures the same one: once each has its task (the first time, once each has started and imported)."""
        if processes > self.size:
            import multiprocessing

            self.close()
            self._pool = multiprocessing.get_context("spawn").Pool(processes)
            self.size = processes
        return time.time() + (0.5 if self.warm else 2.0 + 0.5 * processes)

    def map_async(self, fn: Callable[[Any], Any], tasks: list[Any]) -> Any:
        """``fn`` on each task, one per process (after :meth:`start` for as many)."""
        def ran(_: object) -> None:
            self.warm = self.warm or len(tasks) == self.size

        return self._pool.map_async(fn, tasks, chunksize=1, callback=ran)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        self._pool, self.size, self.warm = None, 0, False


CLIENTS = ClientProcesses()
atexit.register(CLIENTS.close)


def drive_processes(target: str, texts: list[str], concurrency: int, options: pb.DecodingOptions, *,
                    seconds: float, processes: int, texts_per_call: int = 1, outputs: bool = False) -> dict[str, Any]:
    """:func:`drive` split over ``processes`` client processes (``concurrency`` clients in all), so that the load
    generator's own Python is not what limits the figure; the parts' counts are summed. Each part starts at its own
    place in ``texts``, so that together they send the same mix as one process would, not the first sentences
    several times over. With ``outputs``, the best hypothesis's ids by sentence index, as :attr:`Run.outputs`. The
    processes stay for the next run (:data:`CLIENTS`)."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    start_at = CLIENTS.start(processes)
    parts = CLIENTS.map_async(_drive_part, [(target, texts, share, options.SerializeToString(), seconds, start_at,
                                             texts_per_call, i * len(texts) // processes, outputs)
                                            for i, share in enumerate(shares)]).get()
    # The window in which the counted answers came: from the first part's start to the last one's end. A part that
    # started late (its process still importing when the others began) widens it rather than adding answers from
    # outside it to a window of one part's length.
    wall = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
    latencies = np.array([x for p in parts for x in p["latencies"]] or [0.0])
    codes: Counter[str] = Counter()
    for p in parts:
        codes.update(p["codes"])
    ok = sum(p["ok"] for p in parts)
    # The load generator's own CPU over the run: a client process near a whole core is what limits the figure
    # (the run with one client process more shows it from outside).
    return {"concurrency": concurrency, "client_processes": processes, "texts_per_call": texts_per_call,
            "seconds": round(wall, 2), "start_spread_s": round(max(p["began"] for p in parts)
                                                                - min(p["began"] for p in parts), 2), "ok": ok,
            "client_cores": round(sum(p["cpu_seconds"] for p in parts) / wall, 2),
            "busiest_client_cores": round(max(p["cpu_seconds"] / p["seconds"] for p in parts), 2),
            "sentences_per_s": round(ok / wall, 1), "target_tokens_per_s": round(sum(p["target_tokens"] for p in parts)
                                                                               / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2), "codes": dict(codes),
            **({"outputs": {i: ids for p in parts for i, ids in p["outputs"].items()}} if outputs else {})}


def client_check(base: dict[str, Any], more: dict[str, Any], figure: str = "sentences_per_s") -> str:
    """The load generator's own check in words: ``more`` is the run of ``base`` again with one client process more.
    A figure that rises with it was the clients', not the server's: the sentence says so, with both figures."""
    ratio = more[figure] / base[figure] if base[figure] else float("inf")
    measured = (f"{more['client_processes']} client processes instead of {base['client_processes']} at "
                f"{base['concurrency']} clients: {more[figure]:,} against {base[figure]:,} "
                f"{figure.replace('_per_s', '/s').replace('_', ' ')} "
                f"({ratio:.2f}×)")
    if ratio <= 1 + CHECK_TOLERANCE:
        return f"{measured}; adding a client process did not raise the figure: the load generator did not limit it."
    return (f"{measured}; adding a client process raised the figure by more than {CHECK_TOLERANCE:.0%}: the load "
            "generator may have limited it, so these rows are a floor, not the server's figure.")


def client_checks(rows: list[dict[str, Any]], figure: str = "sentences_per_s") -> list[str]:
    """:func:`client_check` of every row marked ``check`` against the nearest earlier row of the same concurrency
    without the mark: the run it repeats with one client process more."""
    checks = []
    for i, row in enumerate(rows):
        if row.get("check"):
            base = next((r for r in reversed(rows[:i]) if r["concurrency"] == row["concurrency"]
                         and not r.get("check")), None)
            if base is not None:
                checks.append(client_check(base, row, figure))
    return checks
