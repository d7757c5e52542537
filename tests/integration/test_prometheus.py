"""A real Prometheus scraping a real server under load: every expression of the Grafana dashboard and every quantity
of the alert rules must return data, the rules must load and evaluate cleanly, and promtool must accept the rules,
the config and the exposition. Needs the prometheus and promtool binaries (Debian package `prometheus`, installed by
`make setup`); skipped, saying so, where they are absent."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from attention_pb.v1 import attention_pb2 as pb
from tests.integration.serving import RunningServer, settings
from tests.unit.test_deploy import (
    ALERTS,
    DEPLOY,
    JOB,
    PROMETHEUS_CONFIG,
    alert_quantity,
    alert_rules,
    dashboard_expressions,
    load_dashboard,
    recording_rules,
    variable_queries,
)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
NO_PROMETHEUS = "the prometheus binary is absent (Debian package `prometheus`; `make setup` installs it)"
NO_PROMTOOL = "the promtool binary is absent (Debian package `prometheus`; `make setup` installs it)"
needs_prometheus = pytest.mark.skipif(not Path(PROMETHEUS).is_file(), reason=NO_PROMETHEUS)
needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).is_file(), reason=NO_PROMTOOL)

MODELS = ("tiny-de-en", "tiny-scenes")
# How Grafana fills the dashboard's variables when one server and both models are selected. $__rate_interval is
# at least four scrape intervals in Grafana; a minute holds dozens of the test's 1 s scrapes.
RATE_INTERVAL = "1m"
# Only a server on CUDA exports these (the GPU collector is registered only then): expected empty on a CPU server.
CUDA_ONLY = ("attn_gpu_memory_used_bytes", "attn_gpu_utilization_ratio")
# Only the parent of several server processes exports this; the server here runs in one process.
MULTI_PROCESS_ONLY = ("attn_process_restarts_total",)
SCRAPES = 5  # scrapes under load before anything is evaluated
DATA_WAIT = 30.0  # seconds an expression may take to show data after that (recorded series need rule evaluations)


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus process on 127.0.0.1, with its own storage, for one test module."""

    def __init__(self, config: Path, storage: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = storage.parent / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={storage}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"prometheus not ready after 60 s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now; a PromQL error fails the test with Prometheus' message."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{expr!r}: {exc.code} {exc.read().decode()}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Load:
    """Calls in a loop on a thread until stopped: OK translations, INVALID_ARGUMENT ones (empty text), captions, and
    model listings; counts what came back."""

    def __init__(self, server: RunningServer, image: bytes) -> None:
        self.server, self.image = server, image
        self.codes: dict[str, int] = {}
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prometheus-test-load", daemon=True)
        self._thread.start()

    def _call(self, method: Any, request: Any) -> None:
        try:
            method(request, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        self.codes[code.name] = self.codes.get(code.name, 0) + 1

    def _run(self) -> None:
        stub = self.server.stub
        texts = ["Ich hoffe, es geht dir gut.", "Das Wetter ist heute schön.", "Guten Morgen."]
        try:
            while not self._stop.is_set():
                options = pb.DecodingOptions(beam_size=2)
                self._call(stub.Translate, pb.TranslateRequest(texts=texts, options=options))
                self._call(stub.Translate, pb.TranslateRequest(texts=[""]))  # INVALID_ARGUMENT
                self._call(stub.Caption, pb.CaptionRequest(image=self.image, options=pb.DecodingOptions(beam_size=1)))
                self._call(stub.ListModels, pb.ListModelsRequest())
                self._stop.wait(0.2)  # the machine running the suite is shared: a trickle is enough
        except BaseException as exc:  # reported by the test, not lost on the thread
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Both tiny models (translation and captioning), so that every per-model series has data."""
    if not Path(PROMETHEUS).is_file():
        pytest.skip(NO_PROMETHEUS)  # before the models are built
    models_dir: Path = request.getfixturevalue("models_dir")
    caption_models_dir: Path = request.getfixturevalue("caption_models_dir")
    root = tmp_path_factory.mktemp("prometheus-models")
    shutil.copytree(models_dir / "tiny-de-en", root / "tiny-de-en")
    shutil.copytree(caption_models_dir / "tiny-scenes", root / "tiny-scenes")
    running = RunningServer(settings(root))  # metrics on port 0: running.server.metrics_port
    yield running
    running.close()


@pytest.fixture(scope="module")
def scrape_config(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/prometheus.yml itself, pointed at the test server, scraping and evaluating every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{server.server.metrics_port}"]
    path = tmp_path_factory.mktemp("prometheus-config") / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def load(server: RunningServer) -> Iterator[Load]:
    from tests.unit.test_caption_imaging import encode
    from training.data.scenes import render, scenes

    running = Load(server, encode(render(scenes("test", 1)[0]), "PNG"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(scrape_config: Path, load: Load, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus running, having scraped the server under load at least SCRAPES times."""
    instance = Prometheus(scrape_config, tmp_path_factory.mktemp("prometheus") / "data")
    try:
        deadline = time.monotonic() + 60
        while True:
            scraped = instance.query(f'count_over_time(up{{job="{JOB}"}}[1m]) and up{{job="{JOB}"}} == 1')
            if scraped and float(scraped[0]["value"][1]) >= SCRAPES and load.codes.get("OK", 0):
                break
            assert time.monotonic() < deadline, f"not {SCRAPES} scrapes in 60 s: {instance.api('targets')}"
            time.sleep(0.5)
        yield instance
    finally:
        instance.close()


def grafana_regex(value: str) -> str:
    """A value as Grafana writes it into a Prometheus regex matcher: regex characters escaped inside a PromQL
    string (so the backslash itself is doubled)."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def substitute(expr: str, instance: str) -> str:
    values = {"job": JOB, "instance": grafana_regex(instance), "model": f"({'|'.join(map(grafana_regex, MODELS))})",
              "__rate_interval": RATE_INTERVAL}
    filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in filled, filled
    return filled


def expressions(instance: str) -> dict[str, str]:
    """Every expression the dashboard and the rules evaluate, concrete, keyed by where it comes from."""
    found = {}
    for title, expr in dashboard_expressions(load_dashboard()):
        found[f"dashboard {title!r}: {expr}"] = substitute(expr, instance)
    for name, expr in recording_rules().items():
        found[f"record {name}: {' '.join(expr.split())}"] = expr
    # An alert compares a quantity with a threshold and returns nothing while all is well, which would prove
    # nothing; the rules are written as QUANTITY OP THRESHOLD (see deploy/alerts.yml), so the quantity alone is
    # evaluated: once recorded by the rules above, it must have data whether the alert fires or not.
    for rule in alert_rules():
        found[f"alert {rule['alert']}: {rule['expr']}"] = alert_quantity(rule["expr"])
    return found


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@needs_prometheus
def test_every_dashboard_and_alert_expression_returns_data(prometheus: Prometheus, server: RunningServer,
                                                           load: Load) -> None:
    instance = f"127.0.0.1:{server.server.metrics_port}"
    pending = expressions(instance)
    assert len(pending) > 40
    deadline = time.monotonic() + DATA_WAIT
    while pending and time.monotonic() < deadline:
        pending = {where: expr for where, expr in pending.items() if not has_finite_value(prometheus.query(expr))}
        time.sleep(1.0)
    assert load.failure is None, load.failure
    assert load.codes.get("OK") and load.codes.get("INVALID_ARGUMENT"), load.codes
    cuda = any(prometheus.query(f'{name}{{job="{JOB}"}}') for name in CUDA_ONLY)
    empty = [where for where, expr in pending.items()
             if (cuda or not any(name in expr for name in CUDA_ONLY))
             and not any(name in expr for name in MULTI_PROCESS_ONLY)]
    assert not empty, "no data (or only NaN) from:\n" + "\n".join(empty)


@needs_prometheus
def test_dashboard_variables_list_the_server_and_models(prometheus: Prometheus, server: RunningServer) -> None:
    instance = f"127.0.0.1:{server.server.metrics_port}"
    expected = {"job": {JOB}, "instance": {instance}, "model": set(MODELS)}
    for name, selector, label in variable_queries(load_dashboard()):
        values = {s["metric"].get(label) for s in prometheus.query(substitute(selector, instance))}
        assert expected[name] <= values, (name, selector, values)


@needs_prometheus
def test_rules_evaluate_cleanly_and_nothing_fires(prometheus: Prometheus) -> None:
    """Every rule loads and evaluates without error, and a healthy server whose only failures are client errors
    (INVALID_ARGUMENT) has a server error ratio of 0 and no alert pending or firing."""
    deadline = time.monotonic() + DATA_WAIT
    while not (ratio := prometheus.query("job:attn_requests:error_ratio_rate5m")):
        assert time.monotonic() < deadline, "the error ratio was never recorded"
        time.sleep(1.0)
    assert [float(s["value"][1]) for s in ratio] == [0.0]
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(recording_rules()) + len(alert_rules())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert prometheus.api("alerts")["alerts"] == []


@needs_promtool
def test_promtool_checks_the_rules_and_their_tests() -> None:
    checked = run(PROMTOOL, "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # deploy/alerts_test.yml: synthetic series for which every alert must fire (or stay quiet) as stated.
    tested = run(PROMTOOL, "test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_promtool_checks_the_config() -> None:
    checked = run(PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_prometheus
@needs_promtool
def test_promtool_checks_the_scraped_metrics(prometheus: Prometheus, server: RunningServer,
                                             scrape_config: Path) -> None:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        exposition = response.read().decode()
    assert "attn_requests_total{" in exposition
    checked = run(PROMTOOL, "check", "metrics", stdin=exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = run(PROMTOOL, "check", "config", str(scrape_config))  # the test's own variant of the config
    assert checked.returncode == 0, checked.stdout + checked.stderr
