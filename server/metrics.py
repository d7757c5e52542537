"""Prometheus metrics, built on a registry the caller owns (every test gets a fresh one), served on their own port.

Every name is under ``attn_``; durations are in seconds, sizes in bytes, distributions are histograms (summaries
cannot be aggregated across replicas). Label values stay low-cardinality: rpc and status code names, and the model
name and version only once the model was found (requests for unknown models are counted under ``model=""``).
:data:`METRICS` is the one list: the collectors are built from it and the README's table is checked against it.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "attn"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A request waits for the engine's next decoder step when the engine is not saturated (a fraction of a millisecond to
# a few), for seconds when its queue is long: the request latency buckets (5 ms the smallest) put every unsaturated
# wait in their first bucket.
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BYTES_BUCKETS = tuple(float(4**k) for k in range(4, 14))  # 256 B .. 64 MiB


@dataclass(frozen=True)
class Metric:
    attr: str  # the attribute of :class:`Metrics` holding it
    name: str  # the exposed name (counters get ``_total`` appended by the client library)
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()
    # Gauges with several server processes (prometheus_client's multiprocess mode): how the processes' values
    # combine on /metrics. Counters and histograms are summed.
    aggregate: str = "livesum"

    @property
    def exposed(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name


MODEL = ("model", "version")
METRICS = [
    Metric("requests", "attn_requests", "counter", ("rpc", "model", "version", "code"),
           "RPCs answered, by final status code."),
    Metric("latency", "attn_request_duration_seconds", "histogram", ("rpc", "model", "version"),
           "Time from receiving an RPC to answering it.", LATENCY_BUCKETS),
    Metric("queue_time", "attn_queue_duration_seconds", "histogram", MODEL,
           "Time a request waited in its model's queue before the engine admitted it (one decoded in parts: its "
           "parts' waits together).", QUEUE_BUCKETS),
    Metric("compute_time", "attn_compute_duration_seconds", "histogram", (*MODEL, "stage"),
           "ONNX Runtime time per call: stage=encoder for one admitted group, stage=decoder for one step of the "
           "whole batch.", COMPUTE_BUCKETS),
    Metric("batch_requests", "attn_batch_requests", "histogram", MODEL,
           "Requests sharing one decoder step.", BATCH_BUCKETS),
    Metric("batch_rows", "attn_batch_hypotheses", "histogram", MODEL,
           "Active hypotheses (rows: sentences × beams) in one decoder step.", BATCH_BUCKETS),
    Metric("queue_requests", "attn_queue_requests", "gauge", MODEL, "Requests waiting for admission."),
    Metric("queue_tokens", "attn_queue_tokens", "gauge", MODEL, "Source tokens of the requests waiting."),
    Metric("queue_capacity", "attn_queue_capacity_requests", "gauge", MODEL,
           "Requests that may wait before more are refused: max_queue_requests for each engine process serving the "
           "version."),
    Metric("active_requests", "attn_active_requests", "gauge", MODEL, "Requests being decoded."),
    Metric("inflight", "attn_inflight_requests", "gauge", ("rpc",),
           "RPCs being handled right now (queued, decoding or being answered)."),
    Metric("source_tokens", "attn_source_tokens", "counter", MODEL, "Source tokens read (end of sentence included)."),
    Metric("target_tokens", "attn_target_tokens", "counter", MODEL,
           "Target tokens generated over all returned hypotheses (end of sentence included)."),
    Metric("images", "attn_images", "counter", MODEL, "Images captioned."),
    Metric("refusals", "attn_refused_requests", "counter", ("rpc", "reason"),
           "Requests refused or stopped: queue_full, inflight_full (the server's max_inflight), deadline, "
           "cancelled, invalid, unauthenticated, too_large (an answer over the largest message sent)."),
    Metric("attention_bytes", "attn_attention_payload_bytes", "histogram", ("rpc", "model"),
           "Bytes of attention (matrices and alignments) in one response.", BYTES_BUCKETS),
    Metric("models_loaded", "attn_models_loaded", "gauge", (), "Model versions loaded and warmed up.",
           aggregate="livemax"),
    Metric("model_info", "attn_model_info", "gauge", (*MODEL, "family", "device", "variant", "serving"),
           "1 for every loaded model version; serving=\"true\" for the versions requests get by default.",
           aggregate="livemax"),
    Metric("load_time", "attn_model_load_duration_seconds", "gauge", MODEL,
           "Seconds it took to load and warm a model version.", aggregate="livemax"),
    Metric("load_failures", "attn_model_load_failures", "counter", ("model",),
           "Model versions refused at load or reload (invalid, broken or failing warm-up)."),
]
# A model version's gauges (labels: model and version alone): on /metrics while the version is loaded, gone once a
# reload retires it, as its attn_model_info series is. Its counters and histograms stay: they count what it did.
VERSION_GAUGES = [m for m in METRICS if m.kind == "gauge" and m.labels == MODEL]
# Collected on every scrape, not held in attributes.
COLLECTED = [
    Metric("", "attn_process_cpu_seconds", "counter", (),
           "CPU time of the server (user + system), every process of it."),
    Metric("", "attn_process_resident_memory_bytes", "gauge", (), "Resident memory of the server, every process."),
    Metric("", "attn_process_restarts", "counter", ("role",),
           "Engine or front-end processes that died and were restarted (multi-process mode)."),
    Metric("", "attn_gpu_memory_used_bytes", "gauge", ("gpu",), "GPU memory in use (CUDA only)."),
    Metric("", "attn_gpu_utilization_ratio", "gauge", ("gpu",), "GPU busy fraction, 0..1 (CUDA only)."),
]
# (name as exposed, type, labels, meaning): the README's metrics table.
DESCRIPTIONS = [(m.exposed, m.kind, ", ".join(m.labels), m.help) for m in METRICS + COLLECTED]


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every ``v`` of ``values`` (a labelled child), as one update of its sum and one per
    bucket that got any. The engine observes three histograms per decoder step; in multiprocess mode each update is
    a lock and a write into a shared file, a sixth of the engine's time under load, so it tallies steps (and each
    request's wait and each encoder call) and calls this a few times a second. prometheus_client has no bulk
    observe: this writes the child's ``_sum`` and ``_buckets`` as its ``observe`` does
    (tests/unit/test_server_metrics.py checks the two agree)."""
    if not len(values):
        return
    bounds = histogram._upper_bounds  # ascending, +Inf last: the first bound >= v is v's bucket, as observe finds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(values)))
    for bucket in np.flatnonzero(counts).tolist():
        histogram._buckets[bucket].inc(int(counts[bucket]))


def help_of(name: str) -> str:
    return next(m.help for m in METRICS + COLLECTED if m.name == name)


class GpuCollector(Collector):
    """GPU memory and utilisation from NVML, read at scrape time; registered only when serving on CUDA."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py; present wherever the CUDA provider is

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def collect(self) -> Any:
        memory = GaugeMetricFamily("attn_gpu_memory_used_bytes", help_of("attn_gpu_memory_used_bytes"), labels=["gpu"])
        busy = GaugeMetricFamily("attn_gpu_utilization_ratio", help_of("attn_gpu_utilization_ratio"), labels=["gpu"])
        for i, handle in enumerate(self._handles):
            memory.add_metric([str(i)], float(self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
            busy.add_metric([str(i)], self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        yield memory
        yield busy


class ProcessTotals(Collector):
    """CPU time and resident memory of this process, read at scrape time: the two process metrics the README
    documents, and no more (prometheus_client's ProcessCollector adds open and maximum descriptors, virtual memory
    and start time, which the multi-process server's parent, collecting for the whole tree, does not export)."""

    def collect(self) -> Any:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield from process_usage(usage.ru_utime + usage.ru_stime, resident_bytes(os.getpid()))


def process_usage(cpu_seconds: float, memory_bytes: float) -> Iterator[Any]:
    """attn_process_cpu_seconds_total and attn_process_resident_memory_bytes as a collector yields them: of this
    process (:class:`ProcessTotals`), or of a multi-process server's whole tree (``server.processes``)."""
    yield CounterMetricFamily("attn_process_cpu_seconds", help_of("attn_process_cpu_seconds"), value=cpu_seconds)
    yield GaugeMetricFamily("attn_process_resident_memory_bytes", help_of("attn_process_resident_memory_bytes"),
                            value=memory_bytes)


def resident_bytes(pid: int) -> float:
    """Resident memory of a live process, from /proc; 0 once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0.0
    return float(int(fields[1]) * os.sysconf("SC_PAGE_SIZE"))


class LoadedVersionsOnly(Collector):
    """A multi-process server's metrics as its processes' files hold them (``source``: prometheus_client's
    MultiProcessCollector), less the series of model versions no longer loaded: an engine process sets a retired
    version's attn_model_info to 0 but cannot remove it, nor its :data:`VERSION_GAUGES`, from its file, so they would
    stay on /metrics until the process ends, the load time and queue of a version that is gone. A version is loaded
    while some process reports its attn_model_info at 1, as the one-process server, which removes the series, shows."""

    def __init__(self, source: Collector) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        families = list(self.source.collect())
        loaded = {(s.labels["model"], s.labels["version"]) for f in families if f.name == "attn_model_info"
                  for s in f.samples if s.value > 0}
        per_version = {m.name for m in VERSION_GAUGES} | {"attn_model_info"}
        for family in families:
            if family.name in per_version:
                family.samples = [s for s in family.samples if (s.labels["model"], s.labels["version"]) in loaded
                                  and (s.value > 0 or family.name != "attn_model_info")]
            yield family


def watch_gpu(registry: CollectorRegistry) -> None:
    """Adds the GPU gauges to ``registry`` (call once, when the models run on CUDA); without NVML they are left out,
    with a log line, rather than stopping the server."""
    try:
        registry.register(GpuCollector())
    except Exception as exc:  # pynvml missing, or NVML cannot initialise in this container
        logging.getLogger("attn.metrics").warning("GPU metrics unavailable: %s", exc)


class Metrics:
    requests: Counter
    latency: Histogram
    queue_time: Histogram
    compute_time: Histogram
    batch_requests: Histogram
    batch_rows: Histogram
    queue_requests: Gauge
    queue_tokens: Gauge
    queue_capacity: Gauge
    active_requests: Gauge
    inflight: Gauge
    source_tokens: Counter
    target_tokens: Counter
    images: Counter
    refusals: Counter
    attention_bytes: Histogram
    models_loaded: Gauge
    model_info: Gauge
    load_time: Gauge
    load_failures: Counter

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # No <name>_created series: Prometheus would store each as a series of its own, and the multi-process
        # server's /metrics (MultiProcessCollector) has none, so the two modes export the same series.
        disable_created_metrics()
        for m in METRICS:
            kinds: dict[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
            extra: dict[str, Any] = {"buckets": m.buckets} if m.kind == "histogram" else {}
            if m.kind == "gauge":
                extra["multiprocess_mode"] = m.aggregate
            setattr(self, m.attr, kinds[m.kind](m.name, m.help, list(m.labels), registry=registry, **extra))
        registry.register(ProcessTotals())  # attn_process_cpu_seconds_total, attn_process_resident_memory_bytes
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, rpc: str, model: str, version: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, model, version, code).inc()
        self.latency.labels(rpc, model, version).observe(seconds)

    def count_tokens(self, model: str, version: str, source: int, target: int) -> None:
        self.source_tokens.labels(model, version).inc(source)
        self.target_tokens.labels(model, version).inc(target)

    def forget_version(self, model: str, version: str) -> None:
        """Removes a retired version's :data:`VERSION_GAUGES` from this process's registry. With several server
        processes prometheus_client cannot remove a series from a process's file: there :class:`LoadedVersionsOnly`
        leaves them out of /metrics instead."""
        for m in VERSION_GAUGES:
            try:
                getattr(self, m.attr).remove(model, version)
            except KeyError:  # never set here (older prometheus_client raises where newer ones pass)
                pass

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
