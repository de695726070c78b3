"""How the runtime forms a batch (fake consumer): the first message is waited for up to the poll
timeout; then what is already fetched is taken at once, or, with ``STREAMLEARN_BATCH_LINGER_MS``,
whatever arrives until the linger has passed since the first message or the batch is full."""

from __future__ import annotations

import time

from services.runtime.app import StreamApp
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from tests.unit.test_app_backoff import Processor


class TimedConsumer:
    """Messages that become available at given times (seconds after the consumer is made)."""

    def __init__(self, arrivals: list[float]):
        self.start = time.monotonic()
        self.arrivals = sorted(arrivals)
        self.calls: list[tuple[str, int, float]] = []

    def _ready(self) -> int:
        now = time.monotonic() - self.start
        return sum(1 for a in self.arrivals if a <= now)

    def _take(self, n: int) -> list[str]:
        k = min(n, self._ready())
        taken, self.arrivals = self.arrivals[:k], self.arrivals[k:]
        return [f"m{a}" for a in taken]

    def poll(self, timeout: float):
        self.calls.append(("poll", 1, timeout))
        deadline = time.monotonic() + timeout
        while not self._ready() and time.monotonic() < deadline:
            time.sleep(0.001)  # the fake's own clock; the code under test does not sleep
        got = self._take(1)
        return got[0] if got else None

    def consume(self, n: int, timeout: float):
        self.calls.append(("consume", n, timeout))
        deadline = time.monotonic() + timeout
        while self._ready() < n and time.monotonic() < deadline:
            time.sleep(0.001)
        return self._take(n)


def app(consumer) -> StreamApp:
    a = StreamApp(Settings(), Processor(), RuntimeMetrics("stub"))
    a.consumer = consumer
    return a


def test_without_linger_a_batch_is_what_is_already_there():
    consumer = TimedConsumer([0.0, 0.0, 0.0, 0.3])
    batch = app(consumer)._next_batch(10, 1.0)
    assert len(batch) == 3  # the fourth arrives later: not waited for
    assert [c[0] for c in consumer.calls] == ["poll", "consume"] and consumer.calls[1][2] == 0


def test_linger_collects_until_it_has_passed_since_the_first_message():
    consumer = TimedConsumer([0.0, 0.02, 0.05, 0.6])
    started = time.monotonic()
    batch = app(consumer)._next_batch(10, 1.0, linger=0.15)
    took = time.monotonic() - started
    assert len(batch) == 3  # the one at 0.6 s is past the linger
    assert 0.14 <= took < 0.5


def test_linger_ends_as_soon_as_the_batch_is_full():
    consumer = TimedConsumer([0.0, 0.01, 0.02, 0.03, 0.04])
    started = time.monotonic()
    batch = app(consumer)._next_batch(4, 1.0, linger=2.0)
    assert len(batch) == 4
    assert time.monotonic() - started < 1.0


def test_an_idle_consumer_returns_an_empty_batch_after_the_poll_timeout():
    consumer = TimedConsumer([])
    assert app(consumer)._next_batch(10, 0.05, linger=1.0) == []
    assert [c[0] for c in consumer.calls] == ["poll"]


def test_the_linger_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_BATCH_LINGER_MS", "15")
    assert Settings().service.batch_linger_ms == 15
