"""Prometheus metrics, built on a registry the caller owns (every test gets a fresh one), served on their own port.

Label values stay low-cardinality: rpc and status code names, and the model name and version only once the model
was found (requests for unknown models are counted under ``model=""``).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name, type, labels, meaning: the README's metrics table is checked against this list.
DESCRIPTIONS = [
    ("attn_requests_total", "counter", "rpc, model, version, code", "RPCs answered, by final status code."),
    ("attn_request_duration_seconds", "histogram", "rpc, model, version",
     "Time from receiving an RPC to answering it."),
    ("attn_source_tokens_total", "counter", "model, version", "Source tokens read (end of sentence included)."),
    ("attn_target_tokens_total", "counter", "model, version",
     "Target tokens generated over all returned hypotheses (end of sentence included)."),
    ("attn_inflight_requests", "gauge", "rpc", "RPCs being handled right now (running or waiting for a worker)."),
    ("attn_models_loaded", "gauge", "", "Model versions loaded and warmed up."),
]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "attn_requests", DESCRIPTIONS[0][3], ["rpc", "model", "version", "code"], registry=registry
        )
        self.latency = Histogram(
            "attn_request_duration_seconds", DESCRIPTIONS[1][3], ["rpc", "model", "version"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.source_tokens = Counter("attn_source_tokens", DESCRIPTIONS[2][3], ["model", "version"], registry=registry)
        self.target_tokens = Counter("attn_target_tokens", DESCRIPTIONS[3][3], ["model", "version"], registry=registry)
        self.inflight = Gauge("attn_inflight_requests", DESCRIPTIONS[4][3], ["rpc"], registry=registry)
        self.models_loaded = Gauge("attn_models_loaded", DESCRIPTIONS[5][3], registry=registry)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, rpc: str, model: str, version: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, model, version, code).inc()
        self.latency.labels(rpc, model, version).observe(seconds)

    def count_tokens(self, model: str, version: str, source: int, target: int) -> None:
        self.source_tokens.labels(model, version).inc(source)
        self.target_tokens.labels(model, version).inc(target)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP server in a daemon thread; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
