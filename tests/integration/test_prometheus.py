"""The ops console against a real Prometheus (Debian's package): it scrapes a running stack with the
shipped alert and recording rules, and every query of every shipped Grafana panel parses and
returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import yaml

from services.cli.datasets import examples
from services.cli.localstack import free_port
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.kafka_helpers import produce_all

pytestmark = pytest.mark.kafka


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:  # Prometheus is up but not ready yet (still loading its TSDB)
            return {}
        return json.loads(exc.read())  # 400 = the expression does not parse: Prometheus explains why
    except urllib.error.URLError:  # not listening yet
        return {}


def _panel_queries(repo_root: Path) -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((repo_root / "infra/grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m").replace('"$model"', '".*"')
                out.append((path.name, panel["title"], expr))
    return out


def test_every_dashboard_query_returns_data_from_a_running_stack(kafka_broker, redis_server, prefix, tmp_path,
                                                                   repo_root):
    promtool = shutil.which("prometheus")
    assert promtool, "install Debian's prometheus package (apt-get install -y prometheus)"
    spec = load_spec("phishing")
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                  extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    port = free_port()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with stack:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in sorted((repo_root / "infra/prometheus/rules").glob("*.yml"))],
            "scrape_configs": [{"job_name": f"streamlearn-{name}",
                                "static_configs": [{"targets": [svc.metrics_url.split("//")[1].split("/")[0]],
                                                    "labels": {"service": name}}]}
                               for name, svc in stack.services.items()],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen([promtool, f"--config.file={prom_dir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={prom_dir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=open(prom_dir / "log", "wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _up(base) == len(stack.services), 60, "Prometheus to scrape every service")
            data = list(examples("phishing", 300, run_id=uuid.uuid4().hex[:6]))
            produce_all(stack.bootstrap, stack.topics.name("events"), [(b"k", b"{not json")])  # one DLQ record
            replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
            replayer.run(data, delay=20, mode=200)
            replayer.close()
            queries = _panel_queries(repo_root)
            assert len(queries) >= 10
            failures = {}

            def all_return_data() -> bool:
                failures.clear()
                for _dashboard, title, expr in queries:
                    answer = _query(base, expr)
                    if answer.get("status") != "success":
                        failures[(title, expr)] = answer.get("error")
                    elif not answer["data"]["result"]:
                        failures[(title, expr)] = "no data"
                return not failures

            try:
                wait_until(all_return_data, 90, "every panel query to return data", step=lambda: _pause(1.0))
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {failures}") from None
            rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
            lint = {}
            for name, svc in stack.services.items():  # every /metrics endpoint passes promtool's linter
                exposition = urllib.request.urlopen(svc.metrics_url, timeout=10).read()
                check = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"],
                                       input=exposition, capture_output=True)
                if check.returncode != 0:
                    lint[name] = (check.stdout + check.stderr).decode()[:500]
        finally:
            prom.terminate()
            prom.wait(20)
    groups = rules["data"]["groups"]
    assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), "every rule evaluates"
    alerts = {rule["name"] for g in groups for rule in g["rules"] if rule["type"] == "alerting"}
    assert len(alerts) >= 8
    print(f"\n{len(queries)} panel queries returned data; {len(alerts)} alert rules healthy")
    assert orjson.dumps(failures) == b"{}"
    assert lint == {}, lint


def _up(base: str) -> int:
    answer = _query(base, 'up{job=~"streamlearn.*"} == 1')
    return len(answer.get("data", {}).get("result", []))


def _pause(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)  # between checks of a deadline-bounded condition
