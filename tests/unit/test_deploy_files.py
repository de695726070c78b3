"""Deployment files stay consistent with the code: docker-compose.yml, Dockerfile, infra/prometheus,
infra/grafana and infra/k8s.

Environment variable names must be the ones the settings read, topics the ones they default to,
metric names the ones the services declare. The promtool checks need Debian's ``prometheus``
package (``apt-get install -y prometheus``): they fail, not skip, when promtool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import ServiceSettings, TopicSettings, env_var_names, load

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "infra" / "prometheus"
RULES = PROMETHEUS / "rules" / "streamlearn.yml"
DASHBOARDS = ROOT / "infra" / "grafana" / "dashboards"
PROVISIONING = ROOT / "infra" / "grafana" / "provisioning"
K8S = ROOT / "infra" / "k8s"

STREAMLEARN_SERVICES = ("ingestion", "learner", "scorer", "monitor")
COMPOSE_SERVICES = ("kafka", "kafka-init", "redis", "prometheus", "grafana") + STREAMLEARN_SERVICES
SIGNING_SERVICES = {"learner", "scorer"}  # they sign / verify model artifacts
SCALED_SERVICES = ("ingestion", "scorer", "monitor")  # the learner is a single writer

ENV_NAME = re.compile(r"\bSTREAMLEARN_[A-Z0-9_]*[A-Z0-9]\b")
METRIC_LITERAL = re.compile(r"""["'](streamlearn_[a-z_]+)["']""")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "offset", "inf", "nan", "atan2"}
# Grafana's variables, replaced by something PromQL accepts
GRAFANA_VARS = (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h"))


# ---- helpers ---------------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_files() -> list[Path]:
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert files, f"no manifests in {K8S}"
    return files


def _k8s_docs() -> list[dict]:
    return [doc for path in _k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _k8s_docs() if doc.get("kind") == kind}


def _without_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def _env_names_in_text(text: str) -> set[str]:
    return set(ENV_NAME.findall(_without_comments(text)))


def _interpolate(value: str) -> str:
    """docker compose interpolation with the defaults: ${VAR:-default} -> default, ${VAR:?msg} -> a
    stand-in value (the variable is required)."""
    value = re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", str(value))
    return re.sub(r"\$\{[A-Za-z0-9_]+:\?[^}]*\}", "stand-in-value-for-a-required-variable", value)


def _kafka_init_script() -> str:
    command = _compose()["services"]["kafka-init"]["command"]
    return command if isinstance(command, str) else "\n".join(command)


def _created_topics() -> dict[str, str]:
    """Topic name -> its kafka-topics.sh arguments, from the kafka-init command."""
    topics = {}
    for line in _kafka_init_script().splitlines():
        match = re.search(r"--topic\s+(\S+)", line)
        if match:
            topics[match.group(1)] = line
    return topics


def _partitions(args: str) -> int:
    return int(re.search(r"--partitions\s+(\d+)", args).group(1))


def allowed_metric_names() -> set[str]:
    """Every metric the services declare (string literals 'streamlearn_...' under services/), with
    the histogram series suffixes, the series of the collectors every service's registry carries
    (``process_*``, ``python_info``), plus Prometheus' own ``up``."""
    names = set()
    for path in (ROOT / "services").rglob("*.py"):
        names |= set(METRIC_LITERAL.findall(path.read_text()))
    assert "streamlearn_messages_in_total" in names, "metric scan found nothing: did services/ move?"
    return names | {n + s for n in names for s in HISTOGRAM_SUFFIXES} | {"up"} | runtime_collector_names()


def runtime_collector_names() -> set[str]:
    """Series of the runtime registry's non-streamlearn collectors (ProcessCollector, PlatformCollector)."""
    registry = RuntimeMetrics("probe").registry
    return {s.name for family in registry.collect() for s in family.samples if not s.name.startswith("streamlearn_")}


def recorded_names() -> set[str]:
    """Series the recording rules of infra/prometheus/rules record."""
    return {rule["record"] for rule in _rules() if "record" in rule}


def metric_names_in(expr: str) -> set[str]:
    """The metric (or recorded series) names a PromQL expression selects."""
    for var, value in GRAFANA_VARS:
        expr = expr.replace(var, value)
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        name = match.group(0)
        if name in PROMQL_KEYWORDS or re.match(r"\s*\(", expr[match.end():]):
            continue  # keyword, function or aggregation
        names.add(name)
    return names


def _dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return files


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def _dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    out = []
    for path in _dashboard_files():
        for panel in _panels(json.loads(path.read_text()).get("panels", [])):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((path.name, panel.get("title", "?"), target["expr"]))
    return out


def _annotation_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, annotation name, expr) of every Prometheus annotation query."""
    out = []
    for path in _dashboard_files():
        for annotation in json.loads(path.read_text()).get("annotations", {}).get("list", []):
            expr = annotation.get("expr") or annotation.get("target", {}).get("expr")
            if expr:
                out.append((path.name, annotation["name"], expr))
    return out


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_metric_name_parser():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(foo_bucket{model=~"$model", a="b(c)"}'
            '[$__rate_interval]))) / on (x) group_left(y) bar offset 10m > 1e-9 and up unless z:rec:rate5m')
    assert metric_names_in(expr) == {"foo_bucket", "bar", "up", "z:rec:rate5m"}
    assert metric_names_in("sum(rate(a_total[5m])) by (service)") == {"a_total"}


# ---- docker-compose.yml ----------------------------------------------------------------------------

def test_compose_has_every_service():
    services = _compose()["services"]
    missing = [name for name in COMPOSE_SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}"


@pytest.mark.parametrize("name", STREAMLEARN_SERVICES)
def test_compose_streamlearn_service(name):
    service = _compose()["services"][name]
    assert service.get("build"), f"{name}: no build"
    assert service.get("command") == ["python", "-m", f"services.{name}"], f"{name}: command"
    test = service.get("healthcheck", {}).get("test")
    assert test and "http://localhost:9100/healthz" in " ".join(test), f"{name}: healthcheck on /healthz"
    depends = service.get("depends_on", {})
    assert depends.get("kafka-init", {}).get("condition") == "service_completed_successfully"
    assert depends.get("redis", {}).get("condition") == "service_healthy"
    env = service.get("environment", {})
    assert env.get("STREAMLEARN_KAFKA_BOOTSTRAP_SERVERS") == "kafka:9092"
    assert str(env.get("STREAMLEARN_METRICS_PORT")) == "9100"
    assert env.get("STREAMLEARN_METRICS_HOST") == "0.0.0.0"
    assert ("STREAMLEARN_MODEL_SIGNING_KEY" in env) == (name in SIGNING_SERVICES), \
        "the signing key goes to the learner and the scorer only"


@pytest.mark.parametrize("name", STREAMLEARN_SERVICES)
def test_compose_environment_is_valid_settings(name):
    """The compose environment (with its interpolation defaults) passes the settings validation."""
    env = {k: _interpolate(v) for k, v in _compose()["services"][name]["environment"].items()}
    settings = load(env)
    assert settings.service.metrics_port == 9100
    assert settings.kafka.bootstrap_servers == "kafka:9092"


def test_compose_env_vars_exist():
    known = env_var_names()
    used = _env_names_in_text(COMPOSE.read_text())
    for service in _compose()["services"].values():
        env = service.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [item.split("=", 1)[0] for item in env]
        used |= {key for key in keys if key.startswith("STREAMLEARN_")}
    assert used, "no STREAMLEARN_ variable found in docker-compose.yml"
    unknown = sorted(used - known)
    assert not unknown, f"docker-compose.yml uses variables the settings do not read: {unknown}"


def test_kafka_init_creates_every_default_topic():
    created = _created_topics()
    assert "--if-not-exists" in _kafka_init_script()
    defaults = TopicSettings.model_validate({}).all()  # defaults only, whatever the environment
    missing = sorted(set(defaults.values()) - set(created))
    assert not missing, f"kafka-init does not create {missing}"
    for role in ("events", "labels", "features", "predictions"):
        assert _partitions(created[defaults[role]]) == 3, role
    for role in ("models", "drift", "quality", "dlq"):
        assert _partitions(created[defaults[role]]) == 1, role
    assert "cleanup.policy=compact" in created[defaults["models"]]
    kafka_init = _compose()["services"]["kafka-init"]
    assert kafka_init["image"] == _compose()["services"]["kafka"]["image"]
    assert kafka_init["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_infrastructure():
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    volumes = _compose().get("volumes", {})
    assert any(v.split(":")[0] in volumes for v in kafka["volumes"]), "kafka needs a named volume"
    redis = services["redis"]
    assert redis["image"].startswith("redis:7.2")
    assert "--requirepass" in redis["command"] and "--appendonly" in redis["command"]
    assert redis.get("healthcheck")
    assert any(v.startswith("./infra/prometheus:") for v in services["prometheus"]["volumes"])
    grafana_mounts = services["grafana"]["volumes"]
    assert any(v.startswith("./infra/grafana/provisioning:/etc/grafana/provisioning") for v in grafana_mounts)
    assert any(v.startswith("./infra/grafana/dashboards:/var/lib/grafana/dashboards") for v in grafana_mounts)
    demo = services["demo"]
    assert demo.get("profiles") == ["demo"]
    assert "produce events" in " ".join(demo["command"]) and "produce labels" in " ".join(demo["command"])


# ---- Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install \.", text)
    assert re.search(r"^EXPOSE 9100\b", text, re.M)
    assert 'CMD ["python", "-m", "services.ingestion"]' in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".streamlearn", ".git"):
        assert entry in ignored, f".dockerignore lacks {entry}"


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_k8s_env_vars_exist():
    known = env_var_names()
    for path in _k8s_files():
        used = _env_names_in_text(path.read_text())
        unknown = sorted(used - known)
        assert not unknown, f"{path.name} uses variables the settings do not read: {unknown}"
    config = _k8s("ConfigMap")["streamlearn-config"]["data"]
    secret = _k8s("Secret")["streamlearn-secrets"]["stringData"]
    assert set(config) | set(secret) <= known


def test_k8s_config_is_valid_settings():
    config = _k8s("ConfigMap")["streamlearn-config"]["data"]
    secret = _k8s("Secret")["streamlearn-secrets"]["stringData"]
    settings = load({**config, **secret})
    assert settings.service.spec == "phishing"
    assert settings.service.metrics_port == 9100


def test_k8s_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in _k8s_files()} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


@pytest.mark.parametrize("name", STREAMLEARN_SERVICES)
def test_k8s_deployment(name):
    deployment = _k8s("Deployment")[f"streamlearn-{name}"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    # the learner's standby is healthy but not "ready" (it does not consume): see infra/k8s/learner.yaml
    assert container["readinessProbe"]["httpGet"]["path"] == ("/healthz" if name == "learner" else "/readyz")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 9100
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    env_names = {e["name"] for e in container.get("env", [])}
    assert ("STREAMLEARN_MODEL_SIGNING_KEY" in env_names) == (name in SIGNING_SERVICES)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"
    if name == "learner":  # one writer (the lease) and a hot standby, replaced one at a time
        assert deployment["spec"]["replicas"] == 2
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_k8s_scaling():
    scaled = _k8s("ScaledObject")
    budgets = _k8s("PodDisruptionBudget")
    partitions = {topic: _partitions(args) for topic, args in _created_topics().items()}
    group_prefix = ServiceSettings.model_validate({}).group_prefix
    topics = set(TopicSettings.model_validate({}).all().values())
    for name in SCALED_SERVICES:
        obj = scaled[f"streamlearn-{name}"]["spec"]
        assert obj["scaleTargetRef"]["name"] == f"streamlearn-{name}"
        for trigger in obj["triggers"]:
            assert trigger["type"] == "kafka"
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == f"{group_prefix}-{name}"
            assert meta["topic"] in topics
            assert int(meta["lagThreshold"]) > 0
            assert obj["maxReplicaCount"] <= partitions[meta["topic"]], "replicas beyond partitions idle"
        assert f"streamlearn-{name}" in budgets
    assert "streamlearn-learner" not in scaled, "the learner is a single writer: never autoscale it"
    assert budgets["streamlearn-learner"]["spec"]["maxUnavailable"] == 1, "drain the learner's pods one by one"


# ---- Prometheus ------------------------------------------------------------------------------------

def test_prometheus_scrapes_every_service():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    for name in STREAMLEARN_SERVICES:
        assert f"{name}:9100" in targets
    assert all(job["job_name"].startswith("streamlearn") for job in config["scrape_configs"]
               if any(t.endswith(":9100") for sc in job.get("static_configs", []) for t in sc["targets"])), \
        "StreamlearnServiceDown matches up{job=~'streamlearn.*'}"


def test_rules_use_known_metrics_only():
    allowed = allowed_metric_names()
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        unknown = metric_names_in(rule["expr"]) - allowed - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {sorted(unknown)}"


def test_alerts_are_documented():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    expected = {"StreamlearnConsumerLagGrowing", "StreamlearnDLQRateHigh", "StreamlearnNoPredictions",
                "StreamlearnModelQualityLow", "StreamlearnDriftDetected", "StreamlearnServiceDown",
                "StreamlearnLearnerCheckpointStale", "StreamlearnLabelCoverageLow"}
    assert expected <= set(alerts)
    for name, rule in alerts.items():
        assert rule["annotations"].get("summary"), name
        assert rule["annotations"].get("runbook"), name
        assert rule.get("labels", {}).get("severity"), name
    unit_tests = (PROMETHEUS / "tests" / "streamlearn_test.yml").read_text()
    untested = [name for name in alerts if f"alertname: {name}" not in unit_tests]
    assert not untested, f"alerts without a promtool unit test: {untested}"


# ---- Grafana ---------------------------------------------------------------------------------------

# file -> (uid, tag of its own, metrics its panels must query)
DASHBOARD_SET = {
    "streamlearn-overview.json": ("streamlearn-overview", "pipeline", (
        "streamlearn_messages_in_total", "streamlearn_messages_out_total", "streamlearn_predictions_total",
        "streamlearn_prediction_latency_seconds_bucket", "streamlearn_consumer_lag_messages",
        "streamlearn_dlq_messages_total")),
    "streamlearn-models.json": ("streamlearn-models", "models", (
        "model_version:streamlearn_model_quality:combined_1h", "streamlearn_model_quality",
        "streamlearn_learner_progressive_metric", "streamlearn_learner_published_version",
        "streamlearn_model_version", "streamlearn_learner_examples_learned",
        "streamlearn_checkpoint_timestamp_seconds")),
    "streamlearn-drift.json": ("streamlearn-drift", "drift", ("streamlearn_drift_detections_total",)),
    "streamlearn-service-health.json": ("streamlearn-service-health", "health", (
        "up", "streamlearn_ready", "streamlearn_errors_total", "streamlearn_produce_retries_total",
        "streamlearn_offset_commits_total", "streamlearn_handler_latency_seconds_bucket",
        "streamlearn_batch_size_messages_bucket", "streamlearn_last_batch_timestamp_seconds",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "streamlearn_model_loads_total")),
}


def test_dashboards_parse_and_use_known_metrics_only():
    allowed = allowed_metric_names() | recorded_names()
    exprs = _dashboard_exprs()
    assert exprs
    for path in _dashboard_files():
        dashboard = json.loads(path.read_text())
        assert dashboard["schemaVersion"] == 39 and dashboard["uid"] and dashboard["title"]
    for file, title, expr in exprs + _annotation_exprs():
        names = metric_names_in(expr)
        assert names, f"{file} / {title}: {expr!r} selects no metric"
        unknown = names - allowed
        assert not unknown, f"{file} / {title}: unknown metrics {sorted(unknown)} in {expr!r}"


def test_dashboards_use_only_the_variables_the_ops_test_substitutes():
    """tests/integration/test_prometheus.py runs every panel query with ``"$model"`` -> ``".*"`` and
    ``$__rate_interval`` -> ``1m``: any other Grafana variable would reach Prometheus as is."""
    for file, title, expr in _dashboard_exprs():
        rest = expr.replace('"$model"', "").replace("$__rate_interval", "")
        assert "$" not in rest, f"{file} / {title}: {expr!r} uses a variable other than \"$model\" / $__rate_interval"


def test_overview_dashboard_covers_the_pipeline():
    overview = json.loads((DASHBOARDS / "streamlearn-overview.json").read_text())
    assert overview["uid"] == "streamlearn-overview", "docker-compose's home dashboard and links use this uid"
    home = _compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/streamlearn-overview.json"
    exprs = " ".join(e for f, _, e in _dashboard_exprs() if f == "streamlearn-overview.json")
    for needle in DASHBOARD_SET["streamlearn-overview.json"][2]:
        assert needle in exprs, f"overview dashboard lacks {needle}"
    for quantile in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, le) (rate(streamlearn_prediction_latency" in exprs


def test_four_linked_dashboards():
    """Pipeline overview, models, drift and per-service health: each queries its metrics, carries the
    $model variable, and links to the others by tag."""
    dashboards = {path.name: json.loads(path.read_text()) for path in _dashboard_files()}
    assert set(DASHBOARD_SET) <= set(dashboards), f"missing dashboards {sorted(set(DASHBOARD_SET) - set(dashboards))}"
    uids = [d["uid"] for d in dashboards.values()]
    assert len(uids) == len(set(uids)), "dashboard uids must be unique"
    exprs = _dashboard_exprs()
    for file, (uid, tag, needles) in DASHBOARD_SET.items():
        dashboard = dashboards[file]
        assert dashboard["uid"] == uid and "streamlearn" in dashboard["tags"] and tag in dashboard["tags"]
        selected = set().union(*(metric_names_in(e) for f, _, e in exprs if f == file))
        missing = [n for n in needles if n not in selected]
        assert not missing, f"{file} lacks {missing}"
        model = {v["name"]: v for v in dashboard["templating"]["list"]}["model"]
        assert model["includeAll"] and model["allValue"] == ".*" and model["multi"]
        links = [link for link in dashboard["links"] if link["type"] == "dashboards"]
        assert links, f"{file}: no dashboard links"
        for other in dashboards.values():  # every other streamlearn dashboard is reachable by tag
            assert any(set(link["tags"]) <= set(other["tags"]) for link in links), f"{file} misses {other['uid']}"
        panels = list(_panels(dashboard["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{file}: duplicate panel ids"
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels), f"{file}: panel beyond the grid"


def test_models_dashboard_shows_the_combined_quality():
    models = json.loads((DASHBOARDS / "streamlearn-models.json").read_text())
    panels = {p["title"]: p for p in _panels(models["panels"])}
    combined = panels["Quality per version, all monitor replicas combined"]
    (target,) = combined["targets"]
    assert target["expr"].startswith("model_version:streamlearn_model_quality:combined_1h{")
    assert '"$model"' in target["expr"]
    assert "model_version:streamlearn_model_quality:combined_1h" in recorded_names()
    # one recorded series per combined figure, told apart by the metric label
    metrics = {rule["labels"]["metric"] for rule in _rules()
               if rule.get("record") == "model_version:streamlearn_model_quality:combined_1h"}
    assert {"accuracy", "mae", "rmse"} <= metrics
    unit_tests = (PROMETHEUS / "tests" / "streamlearn_test.yml").read_text()
    for metric in metrics:
        assert f'metric="{metric}"' in unit_tests, f"combined {metric}: no promtool unit test"


def test_grafana_provisioning():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (prom,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "streamlearn.yml").read_text())["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ---- promtool --------------------------------------------------------------------------------------

def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install Debian's prometheus package "
                    "(apt-get update && apt-get install -y --no-install-recommends prometheus)")
    return path


def _run(*args: str, cwd: Path = PROMETHEUS) -> None:
    result = subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_config():
    _run("check", "config", "prometheus.yml")


def test_promtool_check_rules():
    _run("check", "rules", "rules/streamlearn.yml")


def test_promtool_test_rules():
    _run("test", "rules", "tests/streamlearn_test.yml")


def test_promtool_dashboard_exprs_are_valid_promql(tmp_path):
    """promtool parses every dashboard expression (as a recording rule)."""
    rules = []
    for i, (_, _, expr) in enumerate(_dashboard_exprs() + _annotation_exprs()):
        for var, value in GRAFANA_VARS:
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables are regexes (allValue .*)
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run("check", "rules", "dashboard.yml", cwd=tmp_path)
