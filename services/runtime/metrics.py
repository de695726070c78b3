"""All Prometheus metrics of the shared runtime, in one place.

Naming: ``streamlearn_<what>_<unit>``; labels ``service``, ``topic``, ``partition``, ``reason``,
``field``, ``model``, ``model_version`` only (bounded cardinality: never per entity or per event).
Each service gets its own registry so that ``/metrics`` shows that service alone; services declare
their domain metrics on the same registry with :meth:`RuntimeMetrics.counter` and friends.
"""

from __future__ import annotations

import json

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


ERROR_KINDS = ("consume", "delivery", "handler", "transient", "commit", "transaction_abort")


class RuntimeMetrics:
    """The runtime's metrics for one service."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        s = ["service"]
        self.info = self.gauge("streamlearn_service_info", "Static service info (value 1)",
                               ["service", "version", "guarantee"])
        self.messages_in = self.counter("streamlearn_messages_in_total", "Messages consumed",
                                        s + ["topic"])
        self.messages_out = self.counter("streamlearn_messages_out_total",
                                         "Messages produced and acknowledged by the broker", s + ["topic"])
        self.handler_latency = self.histogram(
            "streamlearn_handler_latency_seconds", "Time to handle one consumed batch", s,
            buckets=LATENCY_BUCKETS)
        self.batch_size = self.histogram("streamlearn_batch_size_messages", "Messages per consumed batch",
                                         s, buckets=BATCH_BUCKETS)
        self.errors = self.counter("streamlearn_errors_total", "Errors by kind", s + ["kind"])
        self.dlq = self.counter("streamlearn_dlq_messages_total", "Messages sent to the DLQ",
                                s + ["topic", "reason", "field"])
        self.lag = self.gauge("streamlearn_consumer_lag_messages",
                              "Consumer lag per partition (from librdkafka statistics)",
                              s + ["topic", "partition"])
        self.commits = self.counter("streamlearn_offset_commits_total", "Offset commits", s)
        self.produce_retries = self.counter("streamlearn_produce_retries_total",
                                            "Batches re-produced after a delivery failure", s)
        self.ready = self.gauge("streamlearn_ready", "1 when the service is ready", s)
        self.last_batch = self.gauge("streamlearn_last_batch_timestamp_seconds",
                                     "Wall-clock time the loop last completed an iteration", s)
        # known label values start at 0, so rates and alerts see a series before the first event
        for kind in ERROR_KINDS:
            self.errors.labels(service, kind)
        self.produce_retries.labels(service)
        self.commits.labels(service)

    def counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, labels: list[str], buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def on_stats(self, stats_json: str) -> None:
        """librdkafka ``stats_cb``: export consumer lag per assigned partition."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        for topic, tstats in stats.get("topics", {}).items():
            for partition, pstats in tstats.get("partitions", {}).items():
                # transactional services commit offsets through the producer, which the consumer's
                # committed-offset lag (consumer_lag) never sees: they store them after each commit,
                # so the stored-offset lag is theirs; at-least-once services commit on the consumer
                lag = pstats.get("consumer_lag_stored", -1)
                if lag is None or lag < 0:
                    lag = pstats.get("consumer_lag", -1)
                if partition != "-1" and lag is not None and lag >= 0:
                    self.lag.labels(self.service, topic, partition).set(lag)
