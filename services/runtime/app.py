"""The one loop every service runs: consume -> decode -> handle -> produce -> commit.

A service provides a :class:`Processor`: the topics it reads with their decoders, and ``handle``, a
plain function of a batch of decoded messages returning the messages to emit. The runtime owns
everything else: batching, DLQ routing (decode errors and handler rejects, with the reason in
headers), waiting for the broker to acknowledge the outputs *before* committing the offsets that
produced them (at-least-once; nothing is lost when a process dies mid-batch), retries with
back-off, metrics, the HTTP endpoints and graceful shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from services.runtime.http import Route, ServiceHTTP
from services.runtime.kafka import make_consumer, make_producer
from services.runtime.messages import Decoder, Incoming, Outgoing, Reject, Rejected, Transient
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_FIELD_LABELS = 100
DLQ_PREFIX = "streamlearn."

# Cyclic garbage collection for a long-running consume loop (measured with tests/bench/bench_pipeline.py):
# a service imports River, pandas and pydantic, some 140,000 tracked objects that every full collection
# walks (~180 ms on a 2-core VM, several times a minute under load: 12-28 us per message and 100+ ms
# stalls in the latency tail). gc.freeze() moves them to a permanent generation once the service is
# built. The first threshold is raised from 700 to 50,000 because a batch of 500 messages keeps a few
# thousand objects alive until its outputs are produced, which the default collected (and promoted)
# several times per batch. Reference counting still frees almost everything at once; cycles are
# collected at the next collection, after at most 50,000 net allocations.
GC_THRESHOLDS = (50_000, 10, 10)
TXN_RETRY_BACKOFF_MS = 10
# Back-off between attempts to deliver a batch whose outputs the broker refused (a downstream topic
# unwritable or gone, a broker away), or to handle one after a transient failure: the first retry
# after 0.1 s, doubling up to one every 5 s, so an outage of N seconds costs about N / 5 + 6 attempts
# (each counted and logged), not a busy loop.
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0
# commit_transaction flushes the transaction's outputs first; when that does not finish in time it
# raises a retriable error and the commit goes on in the background: calling it again waits for it
# and returns its outcome (committed, or an abortable error)
TXN_COMMIT_TIMEOUT_S = 10


def tune_gc() -> None:
    """Freeze what exists now (imports, the built processor) and raise the first GC threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@runtime_checkable
class Processor(Protocol):
    """What a service contributes to the runtime. Optional hooks are looked up with ``getattr``:

    - ``tick(now) -> list[Outgoing]``: called every loop iteration (timers, periodic events);
    - ``assigned(partitions) -> dict[(topic, partition), offset]``: start offsets to seek to;
    - ``revoked(partitions)``;
    - ``committable(offsets) -> offsets | None``: which offsets may be committed now (a processor
      that checkpoints its own state commits only what its checkpoint covers);
    - ``ready() -> bool``; ``routes() -> {(method, path): handler}``; ``close()``.
    """

    name: str

    def subscriptions(self) -> dict[str, Decoder]: ...

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]: ...


class StreamApp:
    """Runs one :class:`Processor` against Kafka until stopped."""

    def __init__(self, settings: Settings, processor: Processor, metrics: RuntimeMetrics,
                 group_id: str | None = None):
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.name = processor.name
        self.client_id = f"streamlearn-{self.name}"  # names this service's connections in broker logs and quotas
        self.group_id = group_id or f"{settings.service.group_prefix}-{self.name}"
        self.decoders = processor.subscriptions()
        self.dlq_topic = settings.topics.name("dlq")
        self._stop = threading.Event()
        self._assigned: set[tuple[str, int]] = set()
        self._delivery_errors: list[tuple[Outgoing, KafkaError]] = []
        self._last_loop = time.monotonic()
        self.http: ServiceHTTP | None = None
        self.transactional = False
        self.copartitioned = False
        self._field_labels: set[str] = set()
        self._acked: dict[str, object] = {}  # topic -> messages_out child (labels() costs ~2 us per call)
        self._txn_backoff = BACKOFF_FIRST_S  # wait before re-processing after the next aborted transaction

    # ---- lifecycle -------------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def healthy(self) -> bool:
        return time.monotonic() - self._last_loop < 30.0

    def ready(self) -> bool:
        hook = getattr(self.processor, "ready", None)
        return bool(self._assigned) and (hook() if hook else True)

    def start_http(self) -> ServiceHTTP:
        routes: dict[tuple[str, str], Route] = {}
        if hasattr(self.processor, "routes"):
            routes = self.processor.routes()
        svc = self.settings.service
        self.http = ServiceHTTP(svc.metrics_host, svc.metrics_port, self.metrics.exposition,
                                self.healthy, self.ready, routes).start()
        return self.http

    def wants_transactions(self) -> bool:
        """Exactly-once (Kafka transactions) for processors that ask for it (``exactly_once = True``)
        unless ``STREAMLEARN_KAFKA_TRANSACTIONS=off``; ``on`` extends it to every processor that does
        not manage its own offsets."""
        mode = self.settings.kafka.transactions
        if mode == "off" or hasattr(self.processor, "committable"):
            return False
        return mode == "on" or bool(getattr(self.processor, "exactly_once", False))

    def run(self) -> None:
        """Consume until :meth:`stop`; then finish the batch in hand, commit, leave the group."""
        svc = self.settings.service
        self.transactional = self.wants_transactions()
        if self.transactional:
            self.producer = make_producer(self.settings.kafka, **{
                "transactional.id": f"{self.group_id}-{uuid.uuid4().hex[:12]}",
                "transaction.timeout.ms": 60000,
                # A transaction that starts right after the previous commit gets CONCURRENT_TRANSACTIONS
                # from the coordinator until the previous markers are written; librdkafka retries after
                # retry.backoff.ms, 100 ms by default, so back-to-back transactions took ~105 ms each
                # (measured: a scorer capped at ~10 batches/s, +100 ms of latency per hop). The Java
                # client uses 20 ms for this case; 10 ms measured best here (~17 ms per transaction).
                # Other retries still back off exponentially up to retry.backoff.max.ms (1 s).
                "retry.backoff.ms": TXN_RETRY_BACKOFF_MS, "client.id": self.client_id})
            self.producer.init_transactions(60)
        else:
            self.producer = make_producer(self.settings.kafka, **{"client.id": self.client_id})
        guarantee = "exactly_once" if self.transactional else "at_least_once"
        self.metrics.info.clear()
        self.metrics.info.labels(self.name, VERSION, guarantee).set(1)
        log.info("%s delivery guarantee: %s", self.name, guarantee)
        # a processor that joins two topics by key (the monitor: predictions with labels) needs the
        # same partition numbers of both on one replica: the range assignor gives that (eagerly)
        self.copartitioned = bool(getattr(self.processor, "copartitioned", False))
        strategy = {"partition.assignment.strategy": "range"} if self.copartitioned else {}
        self.consumer = make_consumer(self.settings.kafka, self.group_id, stats_cb=self.metrics.on_stats,
                                      **{"client.id": self.client_id, **strategy})
        self.consumer.subscribe(list(self.decoders), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("%s consuming %s as group %s", self.name, list(self.decoders), self.group_id)
        tune_gc()
        try:
            while not self._stop.is_set():
                self._process(self._next_batch(svc.batch_size, svc.poll_timeout_s, svc.batch_linger_ms / 1000))
                self._last_loop = time.monotonic()
                self.metrics.last_batch.labels(self.name).set(time.time())
        finally:
            self._shutdown()

    def _next_batch(self, size: int, timeout: float, linger: float = 0.0) -> list[Message]:
        """Block until one message is there (or ``timeout``), then take whatever else is already
        fetched, up to ``size``: low latency when idle, big batches under load. With ``linger``
        (seconds), keep collecting until the batch is full or ``linger`` has passed since its first
        message."""
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        if size == 1:
            return [first]
        batch = [first, *self.consumer.consume(size - 1, 0)]
        if linger > 0:
            deadline = time.monotonic() + linger
            while len(batch) < size and (left := deadline - time.monotonic()) > 0:
                batch += self.consumer.consume(size - len(batch), left)
        return batch

    def _shutdown(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            self.consumer.close()
            closer = getattr(self.processor, "close", None)
            if closer:
                closer()
            if self.http:
                self.http.stop()
            log.info("%s stopped", self.name)

    # ---- rebalance -------------------------------------------------------------------------------

    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        hook = getattr(self.processor, "assigned", None)
        if hook:
            starts = hook([(p.topic, p.partition) for p in partitions])
            for p in partitions:
                if (p.topic, p.partition) in starts:
                    p.offset = starts[(p.topic, p.partition)]
        if self.copartitioned:
            consumer.assign(partitions)
        else:
            consumer.incremental_assign(partitions)
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("%s assigned %s", self.name, [(p.topic, p.partition, p.offset) for p in partitions])

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        hook = getattr(self.processor, "revoked", None)
        if hook:
            hook([(p.topic, p.partition) for p in partitions])
        if self.copartitioned:
            consumer.unassign()
        elif partitions:
            consumer.incremental_unassign(partitions)
        self._assigned -= {(p.topic, p.partition) for p in partitions}

    # ---- one batch -------------------------------------------------------------------------------

    def _process(self, messages: Sequence[Message]) -> None:
        outputs: list[Outgoing] = []
        decoded: list[Incoming] = []
        offsets: dict[tuple[str, int], int] = {}
        starts: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        for msg in messages:
            if msg.error():
                self._broker_error(msg.error())
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if (topic, partition) not in self._assigned:
                # revoked while this batch was being fetched: its new owner processes it; producing
                # outputs for it here, without being able to commit its offset, would duplicate them
                continue
            offsets[(topic, partition)] = offset + 1
            starts.setdefault((topic, partition), offset)
            raw = msg.value() or b""
            incoming = Incoming(topic, partition, offset, msg.key(), raw,
                                timestamp_ms=msg.timestamp()[1])
            counts[topic] = counts.get(topic, 0) + 1
            try:
                incoming.value = self.decoders[topic](raw)
            except Reject as reject:
                outputs.append(self._dlq(incoming, reject))
                continue
            decoded.append(incoming)
        for topic, count in counts.items():
            self.metrics.messages_in.labels(self.name, topic).inc(count)
        if decoded:
            self.metrics.batch_size.labels(self.name).observe(len(decoded))
            started = time.perf_counter()
            outputs.extend(self._handle(decoded))
            self.metrics.handler_latency.labels(self.name).observe(time.perf_counter() - started)
        tick = getattr(self.processor, "tick", None)
        if tick:
            outputs.extend(tick(time.time()))
        if self.transactional:
            if outputs or offsets:
                self._transact(outputs, offsets, starts)
            return
        if outputs:
            self._produce_and_wait(outputs)
        self._commit(offsets)

    def _transact(self, outputs: list[Outgoing], offsets: dict[tuple[str, int], int],
                  starts: dict[tuple[str, int], int]) -> None:
        """Outputs and the consumed offsets in one Kafka transaction: a ``read_committed`` reader
        sees the batch's outputs exactly once, or not at all if the process dies before the commit.

        A transaction that fails (an output refused by the broker, then a produce into the failed
        transaction) is aborted, the consumer is rewound to the batch's first offsets, and the loop
        waits with exponential back-off before it consumes and handles the batch again: an
        unwritable topic costs one attempt per back-off, not a busy loop of aborted transactions.
        A fatal error (fenced by a newer instance), or a failure that cannot be aborted, crashes the
        service: it restarts from the committed offsets."""
        self._delivery_errors = []
        positions = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in self._assigned]
        try:
            self.producer.begin_transaction()
            for out in outputs:
                self._produce(out)
            if positions:
                self.producer.send_offsets_to_transaction(positions, self.consumer.consumer_group_metadata(), 30)
            self._commit_transaction()
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                raise  # e.g. fenced by a newer instance: crash, restart, resume from committed
            self._abort_and_rewind(err, starts)
            return
        self.metrics.commits.labels(self.name).inc()
        self._txn_backoff = BACKOFF_FIRST_S
        if positions:
            # the consumer does not see offsets committed through the producer: stored here, they
            # keep librdkafka's consumer_lag_stored statistic right (never committed by the consumer:
            # enable.auto.commit is off)
            try:
                self.consumer.store_offsets(offsets=positions)
            except KafkaException as exc:
                log.debug("%s: storing offsets for the lag statistic: %s", self.name, exc)

    def _commit_transaction(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(TXN_COMMIT_TIMEOUT_S)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or err.txn_requires_abort() or err.fatal() or self._stop.is_set():
                    raise
                # e.g. outputs held back by librdkafka after a sequence gap (a failed transaction's
                # refused batches); the retried call returns the abortable error once it is known
                log.warning("%s: transaction commit not finished (%s); waiting for its outcome", self.name, err)
                self._last_loop = time.monotonic()

    def _abort_and_rewind(self, err: KafkaError, starts: dict[tuple[str, int], int]) -> None:
        refused = self._delivery_errors  # the abort purges what is still queued: not refusals
        self._delivery_errors = []
        try:
            # succeeds only if nothing of the transaction can be committed any more
            self.producer.abort_transaction(30)
        except KafkaException:
            log.error("%s: transaction failed (%s) and cannot be aborted", self.name, err)
            raise
        backoff = self._txn_backoff
        self._txn_backoff = min(backoff * 2, BACKOFF_CAP_S)
        self.metrics.errors.labels(self.name, "transaction_abort").inc()
        self.metrics.produce_retries.labels(self.name).inc()
        log.warning("%s: transaction aborted (%s%s); re-processing the batch, retrying in %.1fs", self.name, err,
                    f"; {len(refused)} outputs refused: {refused[0][1]}" if refused else "", backoff)
        for (topic, partition), offset in starts.items():
            if (topic, partition) in self._assigned:
                self.consumer.seek(TopicPartition(topic, partition, offset))
        # the loop goes on after the wait (it polls, so the group membership is kept); a stop
        # requested meanwhile ends it with nothing committed
        self._stop.wait(backoff)

    def _handle(self, batch: list[Incoming]) -> list[Outgoing]:
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                results = list(self.processor.handle(batch))
                break
            except Transient as exc:
                self.metrics.errors.labels(self.name, "transient").inc()
                log.warning("%s: transient failure (%s); retrying the batch in %.1fs", self.name, exc, backoff)
                if self._stop.wait(backoff):
                    raise SystemExit(f"{self.name}: stopped during a transient failure; offsets not committed") from exc
                backoff = min(backoff * 2, BACKOFF_CAP_S)
            except Exception:
                return self._isolate(batch)
        outputs = []
        for result in results:
            if isinstance(result, Rejected):
                outputs.append(self._dlq(result.message, result.reject, result.extra))
            else:
                outputs.append(result)
        return outputs

    def _isolate(self, batch: list[Incoming]) -> list[Outgoing]:
        """The handler raised on this batch: find the poison message by handling one at a time.

        Stateful processors should return :class:`Rejected` per message instead of raising, so that
        a batch is never half-applied before it is retried message by message."""
        if len(batch) == 1:
            log.exception("%s handler failed on %s[%d]@%d", self.name, batch[0].topic,
                          batch[0].partition, batch[0].offset)
            self.metrics.errors.labels(self.name, "handler").inc()
            return [self._dlq(batch[0], Reject("handler_error", "handler raised; see service log"))]
        return [out for msg in batch for out in self._handle([msg])]

    def _field_label(self, field: str | None) -> str:
        """The DLQ counter's ``field`` label: field paths can come from user input (unknown keys), so
        past ``MAX_FIELD_LABELS`` distinct values the rest are counted as ``_other``."""
        field = (field or "")[:64]
        if field in self._field_labels or len(self._field_labels) < MAX_FIELD_LABELS:
            self._field_labels.add(field)
            return field
        return "_other"

    def _dlq(self, message: Incoming, reject: Reject, extra: dict[str, str] | None = None) -> Outgoing:
        self.metrics.dlq.labels(self.name, message.topic, reject.reason, self._field_label(reject.field)).inc()
        headers = {
            "reason": reject.reason,
            "error": reject.error,
            "field": reject.field or "",
            "service": self.name,
            "source.topic": message.topic,
            "source.partition": str(message.partition),
            "source.offset": str(message.offset),
            "schema.version": "" if reject.schema_version is None else str(reject.schema_version),
            **(extra or {}),
        }
        return Outgoing(self.dlq_topic, message.raw, message.key,
                        [(DLQ_PREFIX + k, v.encode()) for k, v in headers.items()])

    def _produce_and_wait(self, outputs: list[Outgoing]) -> None:
        """Produce ``outputs`` and block until the broker acknowledged every one of them; failed
        deliveries are re-produced with back-off (never dropped, never committed past)."""
        pending = outputs
        backoff = BACKOFF_FIRST_S
        while pending:
            self._delivery_errors = []
            for out in pending:
                self._produce(out)
            remaining = self.producer.flush(30)
            if remaining == 0 and not self._delivery_errors:
                return
            failed = [out for out, _ in self._delivery_errors]
            self.metrics.produce_retries.labels(self.name).inc()
            self.metrics.errors.labels(self.name, "delivery").inc()
            log.warning("%s: %d deliveries failed (%s), %d unacknowledged; retrying in %.1fs",
                        self.name, len(failed), self._delivery_errors[0][1] if failed else "-",
                        remaining, backoff)
            if remaining:
                # still in flight: they will be reported; wait for them before re-producing
                self.producer.flush()
                failed = [out for out, _ in self._delivery_errors]
            pending = failed
            if pending:
                if self._stop.wait(backoff):
                    raise SystemExit(f"{self.name}: stopped with undelivered outputs; offsets not committed")
                backoff = min(backoff * 2, BACKOFF_CAP_S)
                # retrying with back-off is the loop at work, not a hung loop: /healthz stays 200, so a
                # liveness probe does not restart a service that waits for a downstream topic
                self._last_loop = time.monotonic()

    def _produce(self, out: Outgoing) -> None:
        key, value = out.encoded()
        acked = self._acked.get(out.topic)
        if acked is None:
            acked = self._acked[out.topic] = self.metrics.messages_out.labels(self.name, out.topic)

        def delivered(err: KafkaError | None, _msg: Message, out: Outgoing = out, acked=acked) -> None:
            if err is not None:
                self._delivery_errors.append((out, err))
            else:
                acked.inc()

        while True:
            try:
                self.producer.produce(out.topic, value, key, headers=out.headers, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.1)  # local queue full: serve delivery callbacks, then retry

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        hook = getattr(self.processor, "committable", None)
        if hook:
            offsets = hook(offsets) or {}
        offsets = {tp: off for tp, off in offsets.items() if tp in self._assigned}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=False)
            self.metrics.commits.labels(self.name).inc()
        except KafkaException as exc:
            # e.g. a rebalance revoked the partition: the new owner re-processes (at-least-once)
            self.metrics.errors.labels(self.name, "commit").inc()
            log.warning("%s: commit failed: %s", self.name, exc)

    def _broker_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        self.metrics.errors.labels(self.name, "consume").inc()
        log.warning("%s: consumer error: %s", self.name, err)
        if err.fatal():
            raise KafkaException(err)
