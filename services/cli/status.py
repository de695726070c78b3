"""``streamlearn status``: one screen for operators, read from the services' metrics endpoints and
the topics: per service up / ready / throughput / lag, the models being served, the last drift
events."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field

import orjson
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class ServiceStatus:
    name: str
    up: bool
    ready: bool
    in_per_s: float = 0.0
    out_per_s: float = 0.0
    lag: float = 0.0
    guarantee: str = "?"
    extra: dict[str, float] = field(default_factory=dict)


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def _samples(text: str | None) -> list:
    if not text:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _sum(samples: list, name: str) -> float:
    return sum(s.value for s in samples if s.name == name)


def service_status(services: dict[str, dict], interval: float = 1.0) -> list[ServiceStatus]:
    """Two scrapes ``interval`` apart give each service's rates."""
    first = {n: _samples(_get(s["metrics_url"])) for n, s in services.items()}
    threading.Event().wait(interval)
    out = []
    for name, svc in services.items():
        text = _get(svc["metrics_url"])
        now = _samples(text)
        base = svc["metrics_url"].removesuffix("/metrics")
        st = ServiceStatus(name, up=text is not None, ready=_get(base + "/readyz") is not None)
        if now:
            def rate(metric: str, now=now, before=first[name]) -> float:
                return (_sum(now, metric) - _sum(before, metric)) / interval

            st.in_per_s = rate("streamlearn_messages_in_total")
            st.out_per_s = rate("streamlearn_messages_out_total")
            st.lag = _sum(now, "streamlearn_consumer_lag_messages")
            info = [s for s in now if s.name == "streamlearn_service_info"]
            st.guarantee = info[0].labels.get("guarantee", "?") if info else "?"
            for s in now:
                if s.name == "streamlearn_learner_examples_learned":
                    st.extra["examples_learned"] = s.value
                if s.name == "streamlearn_model_version" and s.value:
                    st.extra[f"serving {s.labels['model']}"] = s.value
        out.append(st)
    return out


def latest_models(announcements: list[bytes]) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for raw in announcements:
        ann = orjson.loads(raw)
        latest[ann["model"]] = ann
    return latest


def render(statuses: list[ServiceStatus], models: dict[str, dict], drift: list[bytes]) -> str:
    lines = [f"{'service':12} {'up':4} {'ready':6} {'in/s':>9} {'out/s':>9} {'lag':>8}  guarantee       notes"]
    for s in statuses:
        notes = ", ".join(f"{k} {v:g}" for k, v in s.extra.items())
        lines.append(f"{s.name:12} {'yes' if s.up else 'NO':4} {'yes' if s.ready else 'no':6} {s.in_per_s:9.1f} "
                     f"{s.out_per_s:9.1f} {s.lag:8.0f}  {s.guarantee:15} {notes}")
    lines.append("")
    lines.append("models:" if models else "models: none announced yet")
    for name, ann in sorted(models.items()):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in ann.get("metrics", {}).items())
        lines.append(f"  {name:32} v{ann['version']:<6} {ann['stage']:10} examples {ann['examples_seen']:<8} {metrics}")
    lines.append("")
    lines.append("last drift events:" if drift else "last drift events: none")
    for raw in drift:
        d = orjson.loads(raw)
        lines.append(f"  {d['model']} v{d.get('model_version')}: {d['detector']} on {d['kind']}/{d['target']} "
                     f"after {d['window']} updates ({d['severity']})")
    return "\n".join(lines)


def as_json(statuses: list[ServiceStatus], models: dict[str, dict], drift: list[bytes]) -> str:
    return json.dumps({"services": [s.__dict__ for s in statuses], "models": models,
                       "drift": [orjson.loads(d) for d in drift]}, indent=2)
