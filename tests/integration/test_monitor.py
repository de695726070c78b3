"""Two monitor replicas share the partitions of predictions and labels; the quality of a model
version is still one figure: the replicas' additive terms (``streamlearn_monitor_quality_terms_total``)
summed, then divided — what the Prometheus recording rules do. Checked against River's metrics
computed offline on the same predictions and labels, read back from the topics."""

from __future__ import annotations

import ast
import uuid
from collections import defaultdict

import pytest
from river import metrics

from services.cli.datasets import examples
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.monitor.quality import as_positive
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.kafka_helpers import read_topic, scrape, scrape_samples, values

pytestmark = pytest.mark.kafka

MONITORS = ("monitor", "monitor-2")


def _assignment(log_text: str) -> set[tuple[str, int]]:
    """The partitions of the last "assigned [...]" line of a service log."""
    lines = [line for line in log_text.splitlines() if " assigned [" in line]
    if not lines:
        return set()
    return {(t, p) for t, p, _ in ast.literal_eval(lines[-1][lines[-1].index(" assigned [") + 10:])}


def _terms(url: str) -> dict[tuple[str, str, str], float]:
    return {(s.labels["model"], s.labels["model_version"], s.labels["term"]): s.value
            for s in scrape_samples(url, "streamlearn_monitor_quality_terms_total")}


def test_two_monitor_replicas_report_one_figure_per_version(kafka_broker, redis_server, prefix, tmp_path):
    spec = load_spec("phishing")
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                  partitions=4, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    data = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    labels = {e.label["event_id"]: e.label["label"] for e in data}
    try:
        stack.start_servers()
        for alias in ("ingestion", "scorer", "learner", *MONITORS):
            stack.start_service(alias.split("-")[0], alias=alias)
        stack.wait_ready(120)
        predictions_topic = stack.topics.name("predictions")

        def split() -> bool:  # after the rebalance: each replica owns half of predictions and of labels
            owned = [_assignment(stack.services[m].log_path.read_text()) for m in MONITORS]
            mine = [{p for t, p in o if t == predictions_topic} for o in owned]
            return all(len(m) == 2 for m in mine) and not (mine[0] & mine[1])

        wait_until(split, 60, "the two monitors to split the partitions")
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        replayer.run(data, delay=50, mode=400)
        replayer.close()
        urls = [stack.services[m].metrics_url for m in MONITORS]

        def labelled_everywhere() -> list[float]:
            shares = [_terms(u).get((spec.model.name, "all", "labelled"), 0.0) for u in urls]
            return shares if sum(shares) == len(data) else []

        shares = wait_until(labelled_everywhere, 90, "the monitors to join every label with its prediction")
        terms = [_terms(u) for u in urls]
        # each replica's own gauge is a figure over its share only; the combination is what is reported
        own = [scrape(u, "streamlearn_model_quality", metric="accuracy", model_version="all", window="cumulative")
               for u in urls]
        predictions = [p for p in values(read_topic(stack.bootstrap, predictions_topic)) if not p["shadow"]]
    finally:
        stack.stop()

    assert all(0 < s < len(data) for s in shares), f"both replicas had a share of the labels: {shares}"
    # the figures River computes offline on the same (label, prediction) pairs, per version and over all
    expected: dict[str, dict[str, metrics.base.Metric]] = defaultdict(
        lambda: {"accuracy": metrics.Accuracy(), "precision": metrics.Precision(), "recall": metrics.Recall()})
    counts: dict[str, int] = defaultdict(int)
    for p in predictions:
        y, y_pred = as_positive(labels[p["event_id"]]), as_positive(p["prediction"])
        for version in (str(p["model_version"]), "all"):
            counts[version] += 1
            for metric in expected[version].values():
                metric.update(y, y_pred)
    assert counts["all"] == len(data)

    def combined(version: str, term: str) -> float:
        return sum(t[(spec.model.name, version, term)] for t in terms)

    checked = ["all"] + sorted({v for (_, v, _) in terms[0]} & {v for (_, v, _) in terms[1]} - {"all"})
    assert len(checked) >= 2, "the newest versions are tracked by both replicas"
    for version in checked:
        labelled, correct = combined(version, "labelled"), combined(version, "correct")
        tp, fp, fn = (combined(version, t) for t in ("tp", "fp", "fn"))
        assert labelled == counts[version], version
        assert correct / labelled == pytest.approx(expected[version]["accuracy"].get(), abs=1e-12), version
        assert tp / max(tp + fp, 1) == pytest.approx(expected[version]["precision"].get(), abs=1e-12), version
        assert tp / max(tp + fn, 1) == pytest.approx(expected[version]["recall"].get(), abs=1e-12), version
    print(f"\nlabels per replica {shares}; combined accuracy {combined('all', 'correct') / len(data):.4f} = River "
          f"{expected['all']['accuracy'].get():.4f}; per-replica gauges {own}; versions checked {checked}")
