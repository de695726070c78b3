"""Consumer lag from librdkafka statistics: the stored-offset lag (what transactional services
report after each commit) wins over the committed-offset lag, which they never move."""

from __future__ import annotations

import json

from services.runtime.metrics import RuntimeMetrics


def _lag(metrics: RuntimeMetrics, partition: str) -> float | None:
    return metrics.registry.get_sample_value("streamlearn_consumer_lag_messages",
                                             {"service": "svc", "topic": "t", "partition": partition})


def _stats(**partitions: dict) -> str:
    return json.dumps({"topics": {"t": {"partitions": {"-1": {"consumer_lag": 5}, **partitions}}}})


def test_stored_offset_lag_is_preferred_then_committed_lag():
    metrics = RuntimeMetrics("svc")
    metrics.on_stats(_stats(**{"0": {"consumer_lag": 900, "consumer_lag_stored": 12},
                               "1": {"consumer_lag": 7, "consumer_lag_stored": -1},
                               "2": {"consumer_lag": -1, "consumer_lag_stored": -1}}))
    assert _lag(metrics, "0") == 12  # transactional: committed through the producer, stored here
    assert _lag(metrics, "1") == 7  # at-least-once: committed on the consumer
    assert _lag(metrics, "2") is None and _lag(metrics, "-1") is None  # unknown yet; the internal partition


def test_malformed_statistics_are_ignored():
    metrics = RuntimeMetrics("svc")
    metrics.on_stats("{not json")
    assert _lag(metrics, "0") is None
