"""The operations files under deploy/ and docker-compose.yml, checked offline: Kubernetes manifests against the
Kubernetes schemas (kubernetes-validate), the Grafana dashboard and the Prometheus rules against the metrics the
server really exports. tests/integration/test_prometheus.py evaluates the same expressions on a real Prometheus and
imports the helpers below."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "attention-serving.json"
COMPOSE = ROOT / "docker-compose.yml"

JOB = "attention"  # the scrape job the rules select (`up{job="attention"}`)
BUILTINS = {"up"}  # series Prometheus writes itself for every target
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
# Oldest Kubernetes the manifests must suit: native gRPC probes are GA since 1.27.
K8S_VERSIONS = ("1.27.0", "latest")
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# An alert is `QUANTITY OP THRESHOLD` (see the head of deploy/alerts.yml), so the quantity can be evaluated alone.
ALERT_FORM = re.compile(r"^(?P<quantity>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9][0-9.eE+-]*)$", re.S)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
             "inf", "nan"}


def exposed_names() -> set[str]:
    """Every series name the server exports (histograms as their _bucket, _sum and _count series)."""
    names = set()
    for name, kind, _labels, _help in DESCRIPTIONS:
        names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name})
    return names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords, label names and durations left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d[0-9.eE+-]*", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if m.group().lower() in _KEYWORDS or e[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows (rows may nest panels when collapsed)."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of every `label_values(SELECTOR, LABEL)` template variable."""
    found = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {query!r}"
        found.append((var["name"], m.group(1), m.group(2)))
    return found


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"].strip() for r in load_rules() if "record" in r}


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in load_rules() if "alert" in r]


def alert_quantity(expr: str) -> str:
    m = ALERT_FORM.match(" ".join(expr.split()))
    assert m, f"alert expression {expr!r} is not QUANTITY OP THRESHOLD"
    return m.group("quantity")


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests(kind: str) -> list[dict[str, Any]]:
    return [doc for path in K8S_MANIFESTS for doc in load_yaml_documents(path) if doc["kind"] == kind]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    docs = load_yaml_documents(path)
    assert docs, f"{path.name} holds no manifest"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} against {version}: {exc}")


def test_k8s_validation_is_strict() -> None:
    """The schema check above would catch a misspelt field (a guard against a validator that accepts anything)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    (deployment,) = manifests("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_the_server_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in resources), resources
    # Everything but the batch Job and its volume, which are created on their own (a Job runs once per create).
    assert resources == {p.name for p in K8S_MANIFESTS} - {"batch-job.yaml", "batch-pvc.yaml"}


def test_server_deployment_probes_ports_and_grace() -> None:
    (deployment,) = manifests("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    variables = env(container)
    assert (variables["ATTN_PORT"], variables["ATTN_METRICS_PORT"]) == ("50051", "9464")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe  # grpc.health.v1, the server's overall status
    # Liveness must outlast the drain, during which health says NOT_SERVING.
    live = container["livenessProbe"]
    grace = float(variables["ATTN_GRACE_SECONDS"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert live["periodSeconds"] * live["failureThreshold"] > grace + pre_stop
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_and_autoscaler_point_at_the_deployment() -> None:
    (deployment,) = manifests("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {s["metadata"]["name"]: s for s in manifests("Service")}
    assert set(services) == {"attention", "attention-headless"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert {p["name"]: p["port"] for p in services["attention"]["spec"]["ports"]} == {"grpc": 50051, "metrics": 9464}
    (hpa,) = manifests("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = manifests("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_grpc_service_ports_name_the_protocol_the_server_speaks() -> None:
    """kubernetes.io/h2c is HTTP/2 over cleartext: right while the Deployment runs without TLS. With ATTN_TLS_CERT
    the port speaks HTTP/2 over TLS, and a mesh or gateway told h2c would fail every call; the manifest says so
    where the value is set."""
    (deployment,) = manifests("Deployment")
    tls = "ATTN_TLS_CERT" in env(deployment["spec"]["template"]["spec"]["containers"][0])
    for service in manifests("Service"):
        (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc["appProtocol"] == ("https" if tls else "kubernetes.io/h2c"), service["metadata"]["name"]
    text = (K8S / "service.yaml").read_text()
    lines = [line for line in text.splitlines() if "appProtocol: kubernetes.io/h2c" in line]
    assert lines and all("ATTN_TLS_CERT" in line and "https" in line for line in lines), lines


def test_batch_job_runs_one_shard_per_index() -> None:
    (job,) = manifests("Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["attn", "batch"]
    shard = argv[argv.index("--shard") + 1]
    assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"  # N is the number of indexes
    assert spec["parallelism"] <= spec["completions"]
    assert "JOB_COMPLETION_INDEX" in {e["name"] for e in container["env"]}  # so that $(...) expands
    host, port = argv[argv.index("--target") + 1].split(":")
    services = {s["metadata"]["name"]: s for s in manifests("Service")}
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    claims = {c["metadata"]["name"] for c in manifests("PersistentVolumeClaim")}
    volumes = spec["template"]["spec"]["volumes"] + manifests("Deployment")[0]["spec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} <= claims


def test_batch_job_outlasts_a_rollout_and_does_not_retry_what_cannot_succeed(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shard's pod giving up while the server rolls out would use up the Job's retries (a limit for all
    indexes together): `attn batch` retries for minutes. A shard whose `attn batch` refuses its options or files
    (exit 2, the same for every shard) fails the Job at once, and an evicted pod's failure is not counted."""
    from client import batch
    from client.cli import main

    (job,) = manifests("Job")
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    retries = int(container["args"][container["args"].index("--max-retries") + 1])
    monkeypatch.setattr(batch.random, "uniform", lambda low, high: low)  # the jitter at its shortest
    assert sum(batch.backoff(attempt) for attempt in range(retries)) > 120
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                 "values": [2]}, "onPodConditions": []} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # the only one podFailurePolicy allows
    # Exit 2 is what `attn batch` answers to an input that is not there (no server needed to find out).
    assert main(["batch", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "out.jsonl")]) == 2


def test_batch_job_arguments_parse() -> None:
    """The Job's command line is one `attn batch` accepts (index 0 standing in for the expanded variable)."""
    from client.cli import parser

    (job,) = manifests("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container["args"]]
    parsed = parser().parse_args(args)
    assert parsed.command == "batch" and parsed.shard == (0, job["spec"]["completions"])


# Grafana


def test_dashboard_parses_and_every_panel_queries() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard_panels(dashboard)
    nested = [q for p in dashboard["panels"] if p["type"] == "row" for q in p.get("panels", [])]
    ids = [p["id"] for p in dashboard["panels"] + nested]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_covers_every_exported_metric() -> None:
    used = {name for _title, expr in dashboard_expressions(load_dashboard()) for name in metric_names(expr)}
    missing = [name for name, kind, _l, _h in DESCRIPTIONS
               if not ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}) & used]
    assert not missing, f"metrics with no panel: {missing}"
    titles = " / ".join(p["title"].lower() for p in dashboard_panels(load_dashboard()))
    for topic in ("requests/s", "tokens/s", "latency", "queue", "batch size", "errors by code", "by model",
                  "encoder vs decoder", "cpu", "memory"):
        assert topic in titles, topic


def test_dashboard_variables_are_defined() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    queries = [expr for _t, expr in dashboard_expressions(dashboard)]
    queries += [selector for _n, selector, _l in variable_queries(dashboard)]
    for expr in queries:
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined, f"${name} in {expr!r}"


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    known = exposed_names() | BUILTINS
    recorded = set(recording_rules())
    dashboard = load_dashboard()
    sources = [("dashboard: " + title, expr) for title, expr in dashboard_expressions(dashboard)]
    sources += [("variable: " + name, selector) for name, selector, _l in variable_queries(dashboard)]
    sources += [("record: " + name, expr) for name, expr in recording_rules().items()]
    unknown = [(where, name) for where, expr in sources for name in metric_names(expr) if name not in known]
    assert not unknown, f"not exported by server/metrics.py: {unknown}"
    for rule in alert_rules():  # alerts read the recorded quantities (or builtins)
        names = metric_names(rule["expr"])
        assert names and names <= recorded | BUILTINS, (rule["alert"], names)
    assert {"attn_requests_total", "attn_request_duration_seconds_bucket", "attn_queue_requests",
            "attn_refused_requests_total", "attn_models_loaded"} <= {
        name for expr in recording_rules().values() for name in metric_names(expr)}


def test_metric_names_helper() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, rpc) (rate(attn_request_duration_seconds_bucket'
            '{job="$job", rpc=~"Translate|Caption"}[$__rate_interval]))) or vector(0) * on(job) up')
    assert metric_names(expr) == {"attn_request_duration_seconds_bucket", "up"}
    assert metric_names("job:attn_requests:error_ratio_rate5m > 0.05") == {"job:attn_requests:error_ratio_rate5m"}


# Prometheus


def test_alert_rules_are_complete() -> None:
    alerts = alert_rules()
    names = {a["alert"] for a in alerts}
    assert {"AttentionHighErrorRatio", "AttentionHighLatency", "AttentionQueueSaturated", "AttentionShedding",
            "AttentionModelsNotReady", "AttentionTargetDown", "AttentionNoHealthyTargets"} <= names
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
        alert_quantity(alert["expr"])
    # Client mistakes are not server errors.
    error_ratio = recording_rules()["job:attn_requests:error_ratio_rate5m"]
    server_codes = set(re.search(r'code=~"([^"]+)"', error_ratio).group(1).split("|"))  # type: ignore[union-attr]
    assert "INTERNAL" in server_codes and not {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"} & server_codes


def test_prometheus_config_loads_the_rules_and_scrapes_the_job() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]
    (scrape,) = config["scrape_configs"]
    assert scrape["job_name"] == JOB and scrape.get("metrics_path", "/metrics") == "/metrics"
    assert scrape["static_configs"][0]["targets"] == ["attention:9464"]
    assert f'up{{job="{JOB}"}}' in ALERTS.read_text()


# Docker Compose


def test_compose_runs_server_prometheus_and_grafana() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"attention", "prometheus", "grafana"} <= services.keys()
    server = services["attention"]
    assert server["healthcheck"]["test"][:3] == ["CMD", "attn", "health"]  # grpc.health.v1 through the client
    grace = float(server["environment"]["ATTN_GRACE_SECONDS"])
    assert float(server["stop_grace_period"].rstrip("s")) > grace
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
                mounts[target] = (ROOT / source).resolve()
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG.resolve()
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS.resolve()
    # The dashboards folder the provider reads is the one mounted, and the data source is the compose Prometheus.
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/attention.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == DASHBOARD.parent.resolve()
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"] == next(v for v in load_dashboard()["templating"]["list"]
                                 if v["name"] == "datasource")["current"]["value"]
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


def published_ports(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port) of a compose service's short-syntax ``ports`` (no address: all
    interfaces, "")."""
    published = {}
    for entry in service.get("ports", []):
        *address, host, container = str(entry).split(":")
        published[int(container)] = (address[0] if address else "", int(host))
    return published


def test_compose_publishes_only_grpc_beyond_this_host() -> None:
    """Metrics, Prometheus and Grafana ask nobody who is looking (Grafana's password defaults to admin): published
    on the loopback address, an operator cannot expose them to the network by accident. gRPC stays on every
    interface, as before."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert published_ports(services["attention"]) == {50051: ("", 50051), 9464: ("127.0.0.1", 9464)}
    assert published_ports(services["prometheus"]) == {9090: ("127.0.0.1", 9090)}
    assert published_ports(services["grafana"]) == {3000: ("127.0.0.1", 3000)}
    for name, service in services.items():
        assert all(address == "127.0.0.1" for port, (address, _) in published_ports(service).items()
                   if port != 50051), name


def test_kubernetes_and_compose_serve_the_same_default_translator() -> None:
    """A request (or an ``attn batch`` Job) that names no model gets the model ``make run`` makes the default, on
    Kubernetes as under compose; left unset it would be the first model by name."""
    (deployment,) = manifests("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["attention"]["environment"]
    default = env(container).get("ATTN_DEFAULT_MODEL")
    assert default == compose["ATTN_DEFAULT_MODEL"] == "de-en-mixed"
    assert (ROOT / "models" / default).is_dir()


def test_the_loaded_models_panel_leaves_out_retired_versions() -> None:
    # attn_model_info is 1 for a loaded version. A server sets a retired version's series (and a version's former
    # serving="true" one) to 0 before it removes it, or, with front-end processes, leaves it out of /metrics: a
    # table of every series would list a 0 as loaded, and as serving, were one ever scraped.
    queries = [expr for _title, expr in dashboard_expressions(load_dashboard()) if "attn_model_info" in expr]
    assert queries and all(" ".join(expr.split()).endswith("== 1") for expr in queries), queries


# The RPCs that run a model: every latency expression that picks RPCs by name must pick all of them. A V2 stream's
# messages are calls of their own, counted under rpc="ModelStreamInfer" (server/triton.py), not under ModelInfer.
MODEL_RPCS = {"Translate", "Caption", "ModelInfer", "ModelStreamInfer"}


def test_latency_alert_and_panels_watch_every_rpc_that_runs_a_model() -> None:
    sources = [("record: " + name, expr) for name, expr in recording_rules().items()]
    sources += [("dashboard: " + title, expr) for title, expr in dashboard_expressions(load_dashboard())]
    checked = 0
    for where, expr in sources:
        if "attn_request_duration_seconds" not in expr:
            continue
        for chosen in re.findall(r'rpc=~"([^"]*)"', expr):
            checked += 1
            assert set(chosen.split("|")) == MODEL_RPCS, f"{where}: rpc=~{chosen!r} leaves out or adds RPCs"
    assert checked >= 5  # the alert's quantity, the p99 stat and the three percentiles
    titles = [p["title"] for p in dashboard_panels(load_dashboard()) if p["title"].startswith("Latency percentiles")]
    assert titles and all("ModelStreamInfer" in t for t in titles), titles


def test_every_server_variable_the_deployment_files_set_is_a_valid_setting() -> None:
    """A misspelt ATTN_ variable would be ignored without a word (the server reads only its own names), and a bad
    value would stop the pod; the image's ENV, compose with its CPU override, and the Deployment, layered as they
    are at run time, must each make settings the server accepts."""
    from server.settings import Settings
    from tests.unit.test_dockerfile import DOCKERFILE, instructions

    image: dict[str, str] = {}
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "ENV":
            for word in rest.split():
                name, _, value = word.partition("=")
                image[name] = value
    compose = {k: str(v) for k, v in yaml.safe_load(COMPOSE.read_text())["services"]["attention"]
               ["environment"].items()}
    class ComposeLoader(yaml.SafeLoader):  # an override file's `!reset` tag empties what it names
        pass

    ComposeLoader.add_constructor("!reset", lambda loader, node: None)
    cpu = yaml.load((DEPLOY / "docker-compose.cpu.yml").read_text(), ComposeLoader)["services"]["attention"][
        "environment"]
    (deployment,) = manifests("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    known = {Settings.env_name(f) for f in Settings.__dataclass_fields__}
    for layers in ((image, compose), (image, compose, cpu), (image, env(container))):
        environ = {k: v for layer in layers for k, v in layer.items() if k.startswith("ATTN_")}
        assert environ.keys() <= known, environ.keys() - known
        Settings.from_sources([], environ=environ)  # exits (SystemExit) on a value the server refuses
