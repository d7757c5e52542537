"""Metrics live on the registry they are given, under the names the README documents."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server.metrics import BATCH_BUCKETS, COMPUTE_BUCKETS, DESCRIPTIONS, Metrics, observe_many


def test_every_documented_metric_exists_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe("Translate", "m", "1", "OK", 0.02)
    metrics.count_tokens("m", "1", 7, 5)
    text = generate_latest(registry).decode()
    for name, kind, _, _ in DESCRIPTIONS:
        # GPU gauges: collected only when serving on CUDA; restarts: by the parent of several server processes
        if not name.startswith(("attn_gpu_", "attn_process_restarts")):
            assert f"# TYPE {name} {kind}" in text
    assert 'attn_requests_total{code="OK",model="m",rpc="Translate",version="1"} 1.0' in text
    assert 'attn_source_tokens_total{model="m",version="1"} 7.0' in text


def test_two_servers_two_registries() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.models_loaded.set(3)
    assert b.registry.get_sample_value("attn_models_loaded") == 0.0


def test_serves_http_on_a_free_port() -> None:
    metrics = Metrics(CollectorRegistry())
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"attn_models_loaded" in response.read()
    finally:
        metrics.close()


@pytest.mark.parametrize("values, buckets", [
    ([1, 2, 3, 4, 5, 64, 65, 256, 1024, 5000, 1, 1], BATCH_BUCKETS),  # on bounds, between them, past the last
    ([0.0001, 0.0005, 0.0007, 0.003, 0.2, 2.5, 9.0, 0.0005], COMPUTE_BUCKETS),
    ([], BATCH_BUCKETS),
])
def test_observe_many_writes_what_observing_each_value_writes(values: list[float], buckets: tuple[float, ...]) -> None:
    """observe_many writes prometheus_client's private bucket and sum values: if a release changes them, this fails."""
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "", ["m"], buckets=buckets, registry=registry).labels("x")
    at_once = Histogram("many", "", ["m"], buckets=buckets, registry=registry).labels("x")
    for value in values:
        one_by_one.observe(value)
    observe_many(at_once, values)
    for bound in [*buckets, "+Inf"]:
        le = {"m": "x", "le": str(float(bound)) if bound != "+Inf" else "+Inf"}
        assert registry.get_sample_value("many_bucket", le) == registry.get_sample_value("one_bucket", le), bound
    assert registry.get_sample_value("many_count", {"m": "x"}) == len(values)
    assert registry.get_sample_value("many_sum", {"m": "x"}) == pytest.approx(
        registry.get_sample_value("one_sum", {"m": "x"}), rel=1e-12)


def test_the_one_process_server_exports_only_documented_metrics() -> None:
    """The one-process server's /metrics holds the README's metrics and nothing else, as the multi-process one does
    (its parent collects CPU and memory itself): prometheus_client's ProcessCollector added attn_process_open_fds,
    _max_fds, _virtual_memory_bytes and _start_time_seconds, which only one of the two modes exported."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics(CollectorRegistry())
    metrics.observe("Translate", "m", "1", "OK", 0.02)
    families = {f.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    documented = {name.removesuffix("_total") for name, *_ in DESCRIPTIONS}
    assert families <= documented, sorted(families - documented)
    cpu = metrics.registry.get_sample_value("attn_process_cpu_seconds_total")
    memory = metrics.registry.get_sample_value("attn_process_resident_memory_bytes")
    assert cpu is not None and cpu > 0 and memory is not None and memory > 10 * 2**20


def test_queue_time_buckets_resolve_waits_shorter_than_a_decoder_step() -> None:
    """An engine that is not saturated admits a request at its next decoder step: waits of a fraction of a
    millisecond to a few (0.1-0.3 ms on the bundled model). With the request latency buckets (5 ms the smallest)
    every such wait fell in the first bucket, and the dashboard's queue time p50 read 2.5 ms for a 0.15 ms wait.
    Waits up to a long deadline (a saturated queue) stay measurable too."""
    metrics = Metrics(CollectorRegistry())
    for wait in (0.00015, 0.0008, 0.004, 45.0):
        metrics.queue_time.labels("m", "1").observe(wait)

    def below(bound: str) -> float | None:
        return metrics.registry.get_sample_value("attn_queue_duration_seconds_bucket",
                                                 {"model": "m", "version": "1", "le": bound})

    assert below("0.0005") == 1 and below("0.001") == 2 and below("0.005") == 3 and below("60.0") == 4


def test_the_multi_process_metrics_leave_out_the_gauges_of_versions_no_longer_loaded() -> None:
    """An engine process sets a retired version's attn_model_info to 0 and cannot remove its series from its file:
    the parent's /metrics shows neither them nor that version's gauges, and keeps its counters."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from server.metrics import LoadedVersionsOnly

    class Files:  # what MultiProcessCollector reads from the processes' files after version 1 was retired
        def collect(self) -> Iterator[Any]:
            info = GaugeMetricFamily("attn_model_info", "", labels=["model", "version", "serving"])
            info.add_metric(["m", "1", "true"], 0)
            info.add_metric(["m", "2", "false"], 0)  # version 2's labels before version 3 came
            info.add_metric(["m", "2", "true"], 1)
            loaded = GaugeMetricFamily("attn_model_load_duration_seconds", "", labels=["model", "version"])
            loaded.add_metric(["m", "1"], 4.0)
            loaded.add_metric(["m", "2"], 5.0)
            queue = GaugeMetricFamily("attn_queue_requests", "", labels=["model", "version"])
            queue.add_metric(["m", "1"], 0)
            queue.add_metric(["m", "2"], 0)
            tokens = CounterMetricFamily("attn_target_tokens", "", labels=["model", "version"])
            tokens.add_metric(["m", "1"], 7)
            yield from (info, loaded, queue, tokens)

    registry = CollectorRegistry()
    registry.register(LoadedVersionsOnly(Files()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in registry.collect() for s in family.samples}
    assert samples == {
        ("attn_model_info", (("model", "m"), ("serving", "true"), ("version", "2"))): 1,
        ("attn_model_load_duration_seconds", (("model", "m"), ("version", "2"))): 5.0,
        ("attn_queue_requests", (("model", "m"), ("version", "2"))): 0,
        ("attn_target_tokens_total", (("model", "m"), ("version", "1"))): 7,
    }


def test_forgetting_a_version_removes_its_gauges_alone() -> None:
    metrics = Metrics(CollectorRegistry())
    for version in ("1", "2"):
        metrics.load_time.labels("m", version).set(3.0)
        metrics.queue_capacity.labels("m", version).set(256)
        metrics.count_tokens("m", version, 4, 2)
    metrics.forget_version("m", "1")
    metrics.forget_version("n", "1")  # never set: nothing to remove, no error
    sample = metrics.registry.get_sample_value
    assert sample("attn_model_load_duration_seconds", {"model": "m", "version": "1"}) is None
    assert sample("attn_queue_capacity_requests", {"model": "m", "version": "1"}) is None
    assert sample("attn_model_load_duration_seconds", {"model": "m", "version": "2"}) == 3.0
    assert sample("attn_source_tokens_total", {"model": "m", "version": "1"}) == 4.0
