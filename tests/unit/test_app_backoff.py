"""The runtime's delivery retries with fake Kafka clients: a batch whose outputs the broker refuses is
retried with capped exponential back-off on both delivery paths (at-least-once: produce, wait for
the acknowledgements, commit; exactly-once: one Kafka transaction per batch), counted, logged, and
never committed past. The real-broker form is tests/reliability/test_overload.py."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.runtime.app import BACKOFF_CAP_S, BACKOFF_FIRST_S, StreamApp
from services.runtime.messages import Outgoing
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings

EXPECTED_WAITS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large", txn_requires_abort=True)


class Processor:
    name = "stub"

    def subscriptions(self):
        return {"t.in": lambda raw: raw}

    def handle(self, batch):
        return []


class TxnProducer:
    """A transactional producer whose transactions fail while ``failures`` is positive, the way
    librdkafka reports a refused output: at commit, as an abortable error."""

    def __init__(self, failures: int = 0, error: KafkaError = TOO_LARGE, abort_error: KafkaError | None = None,
                 commit_errors: tuple[KafkaError, ...] = ()):
        self.failures, self.error, self.abort_error = failures, error, abort_error
        self.commit_errors = list(commit_errors)  # raised by the next commits, before anything else
        self.log: list[str] = []
        self.committed: list[list[tuple[str, int]]] = []
        self._open: list[tuple[str, int]] = []

    def begin_transaction(self):
        self.log.append("begin")
        self._open = []

    def produce(self, topic, value, key, headers=None, on_delivery=None):
        self._open.append((topic, value))
        if self.failures and on_delivery:
            on_delivery(self.error, None)

    def send_offsets_to_transaction(self, positions, metadata, timeout):
        self.log.append("offsets")

    def commit_transaction(self, timeout):
        if self.commit_errors:
            self.log.append("commit?")
            raise KafkaException(self.commit_errors.pop(0))
        if self.failures:
            self.failures -= 1
            raise KafkaException(self.error)
        self.log.append("commit")
        self.committed.append(self._open)

    def abort_transaction(self, timeout):
        if self.abort_error is not None:
            raise KafkaException(self.abort_error)
        self.log.append("abort")
        self._open = []


class Consumer:
    def __init__(self):
        self.seeks: list[tuple[str, int, int]] = []
        self.stored: list[tuple[str, int, int]] = []
        self.commits: list[list[tuple[str, int, int]]] = []

    def consumer_group_metadata(self):
        return object()

    def seek(self, tp):
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def store_offsets(self, offsets):
        self.stored.extend((tp.topic, tp.partition, tp.offset) for tp in offsets)

    def commit(self, offsets, asynchronous):
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])


class AckProducer:
    """An at-least-once producer whose deliveries fail while ``failures`` is positive."""

    def __init__(self, failures: int):
        self.failures = failures
        self.pending: list = []
        self.acked: list[bytes] = []

    def produce(self, topic, value, key, headers=None, on_delivery=None):
        self.pending.append((value, on_delivery))

    def flush(self, timeout=None):
        for value, callback in self.pending:
            if self.failures:
                callback(TOO_LARGE, None)
            else:
                self.acked.append(value)
                callback(None, None)
        self.failures = max(0, self.failures - 1)
        self.pending = []
        return 0


@pytest.fixture
def app(monkeypatch) -> StreamApp:
    app = StreamApp(Settings({"STREAMLEARN_TOPIC_PREFIX": "t."}), Processor(), RuntimeMetrics("stub"))
    app.consumer = Consumer()
    app._assigned = {("t.in", 0)}
    app.waits = []
    monkeypatch.setattr(app._stop, "wait", lambda timeout: app.waits.append(timeout) or app._stop.is_set())
    return app


def counter(app: StreamApp, name: str, **labels: str) -> float:
    return app.metrics.registry.get_sample_value(name, {"service": "stub", **labels}) or 0.0


OUTPUTS = [Outgoing("t.out", b"a", b"k"), Outgoing("t.out", b"b", b"k")]


def test_aborted_transactions_are_retried_with_capped_exponential_backoff(app, caplog):
    app.producer = TxnProducer(failures=len(EXPECTED_WAITS))
    for _ in range(len(EXPECTED_WAITS) + 1):  # the loop consumes the batch again after each abort
        app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.waits == EXPECTED_WAITS
    assert app.producer.log.count("abort") == len(EXPECTED_WAITS)
    assert app.consumer.seeks == [("t.in", 0, 40)] * len(EXPECTED_WAITS), "rewound to the batch's first offset"
    assert app.producer.committed == [[("t.out", b"a"), ("t.out", b"b")]], "committed once, after the outage"
    assert app.consumer.stored == [("t.in", 0, 42)], "the lag statistic sees the committed position"
    assert counter(app, "streamlearn_errors_total", kind="transaction_abort") == len(EXPECTED_WAITS)
    assert counter(app, "streamlearn_produce_retries_total") == len(EXPECTED_WAITS)
    assert counter(app, "streamlearn_offset_commits_total") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == len(EXPECTED_WAITS)
    assert "Message size too large" in warnings[0] and "2 outputs refused" in warnings[0]
    assert warnings[0].endswith("retrying in 0.1s") and warnings[-1].endswith("retrying in 5.0s")


def test_the_backoff_starts_over_after_a_committed_transaction(app):
    app.producer = TxnProducer(failures=3)
    for _ in range(4):
        app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    app.producer.failures = 1
    app._transact(OUTPUTS, {("t.in", 0): 44}, {("t.in", 0): 42})
    assert app.waits == [BACKOFF_FIRST_S, 0.2, 0.4, BACKOFF_FIRST_S]


def test_a_produce_into_a_failed_transaction_is_aborted_not_a_crash(app):
    """librdkafka refuses produce() once the transaction has failed (an earlier batch of outputs was
    refused); that raised out of the loop and killed the service."""
    class FailingProduce(TxnProducer):
        def produce(self, topic, value, key, headers=None, on_delivery=None):
            raise KafkaException(KafkaError(KafkaError._STATE, "Unable to produce message: Local: Erroneous state"))

    app.producer = FailingProduce()
    app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.producer.log == ["begin", "abort"]
    assert app.consumer.seeks == [("t.in", 0, 40)] and app.waits == [BACKOFF_FIRST_S]


def test_a_fatal_error_crashes_without_abort(app):
    app.producer = TxnProducer(failures=1, error=KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    with pytest.raises(KafkaException):
        app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert "abort" not in app.producer.log and app.consumer.seeks == [] and app.waits == []


TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Failed to flush all outstanding messages within the API timeout",
                       retriable=True)


def test_a_commit_that_did_not_finish_in_time_is_waited_for(app):
    app.producer = TxnProducer(commit_errors=(TIMED_OUT, TIMED_OUT))
    app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.producer.log == ["begin", "offsets", "commit?", "commit?", "commit"]
    assert len(app.producer.committed) == 1 and app.consumer.seeks == [] and app.waits == []


def test_a_commit_that_did_not_finish_in_time_then_failed_is_aborted_and_retried(app):
    """After a batch refused during an outage, librdkafka holds the next transaction's outputs back
    (a sequence gap needs a new producer epoch, which the abort brings): the commit times out, and
    the retried commit reports the abortable error."""
    abortable = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "skipped sequence numbers", txn_requires_abort=True)
    app.producer = TxnProducer(commit_errors=(TIMED_OUT, abortable))
    app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.producer.log == ["begin", "offsets", "commit?", "commit?", "abort"]
    assert app.consumer.seeks == [("t.in", 0, 40)] and app.waits == [BACKOFF_FIRST_S]
    app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert len(app.producer.committed) == 1


def test_a_failure_that_cannot_be_aborted_crashes_without_rewinding(app):
    """A transaction that librdkafka will not abort may still be committed: re-processing its batch
    could duplicate its outputs; a restart resumes from whatever was committed."""
    app.producer = TxnProducer(commit_errors=(KafkaError(KafkaError._STATE, "Operation not valid in state"),),
                               abort_error=KafkaError(KafkaError._CONFLICT, "commit_transaction in progress"))
    with pytest.raises(KafkaException):
        app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.consumer.seeks == [] and app.waits == []


def test_a_stop_during_the_transaction_backoff_leaves_nothing_committed(app):
    app.producer = TxnProducer(failures=1)
    app.stop()
    app._transact(OUTPUTS, {("t.in", 0): 42}, {("t.in", 0): 40})
    assert app.producer.committed == [] and app.consumer.seeks == [("t.in", 0, 40)]


def test_refused_deliveries_are_retried_with_backoff_then_committed(app):
    app.producer = AckProducer(failures=len(EXPECTED_WAITS))
    app._last_loop = time.monotonic() - 600  # as if the outage had lasted ten minutes
    app._produce_and_wait(OUTPUTS)
    app._commit({("t.in", 0): 42})
    assert app.waits == EXPECTED_WAITS and max(app.waits) == BACKOFF_CAP_S
    assert app.producer.acked == [b"a", b"b"]
    assert app.consumer.commits == [[("t.in", 0, 42)]], "committed only after every output was acknowledged"
    assert counter(app, "streamlearn_produce_retries_total") == len(EXPECTED_WAITS)
    assert counter(app, "streamlearn_errors_total", kind="delivery") == len(EXPECTED_WAITS)
    assert app.healthy(), "waiting out a downstream outage is not a hung loop (/healthz)"


def test_a_stop_during_the_delivery_backoff_commits_nothing(app):
    app.producer = AckProducer(failures=1)
    app.stop()
    with pytest.raises(SystemExit, match="offsets not committed"):
        app._produce_and_wait(OUTPUTS)
    assert app.consumer.commits == []
