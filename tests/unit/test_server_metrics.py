"""Metrics live on the registry they are given, under the names the README documents."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import DESCRIPTIONS, Metrics


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
