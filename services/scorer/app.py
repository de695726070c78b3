"""Scorer: predicts every feature vector with the current champion, hot-swapping versions.

Consumes: ``features`` (:class:`schemas.Features`), and follows ``models`` (announcements; the
signed artifact is loaded from the registry and verified before use).
Produces: ``predictions`` (:class:`schemas.Prediction`, keyed by entity), each naming the model
version that made it.

Scoring is pure inference: River pipelines only update unsupervised steps (e.g. a scaler) during
``predict_one`` inside ``compose.learn_during_predict()``, which the scorer never enters. Until the
first version is published the scorer serves version 0: the spec's model, untrained (River's
progressive validation predicts with the untrained model too).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable

from schemas import Features, Prediction
from services.runtime.messages import Decoder, Incoming, Outgoing, Rejected, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.online_store import OnlineStore, RedisOnlineStore
from services.runtime.redis_client import make_redis
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.river_models import build_pipeline
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec
from services.scorer.http_predict import PredictRoute
from services.scorer.models import ModelFollower, Served

log = logging.getLogger(__name__)


# predict_proba_many builds a DataFrame per call: measured on the phishing pipeline (scaler + logistic
# regression) it costs 100 us/event at 8 events, 9.7 at 100 and 2.7 at 500, against 3 us/event for
# predict_proba_one. Batches are scored with *_many from this size on.
MANY_THRESHOLD = 512
STARTUP_CATCH_UP_S = 60.0


Scored = tuple[object, dict[str, float] | None, float | None]  # prediction, class probabilities, score


def predict_batch(model, task: str, xs: list[dict], threshold: float = 0.8) -> list[Scored]:
    """Score a batch: ``predict_proba_many`` / ``predict_many`` for large batches when the model
    offers them, ``*_one`` per message otherwise. Same results either way (to float rounding)."""
    many = {"regression": "predict_many", "anomaly": None}.get(task, "predict_proba_many")
    if len(xs) >= MANY_THRESHOLD and many and hasattr(model, many):
        import pandas as pd

        frame = pd.DataFrame(xs)
        try:
            if task == "regression":
                return [(float(v), None, None) for v in model.predict_many(frame)]
            probas = model.predict_proba_many(frame)
        except (NotImplementedError, AttributeError, TypeError, ValueError):
            pass  # e.g. a step without a *_many path: fall back to one by one
        else:
            out: list[Scored] = []
            for row in probas.to_dict(orient="records"):
                if not row:
                    out.append((None, {}, None))
                    continue
                out.append((max(row, key=row.get), {str(k): float(v) for k, v in row.items()}, None))
            return out
    return [predict(model, task, x, threshold) for x in xs]


def predict(model, task: str, x: dict, threshold: float = 0.8) -> Scored:
    """(prediction, class probabilities or None, anomaly score or None) for one feature dict."""
    if task == "regression":
        return model.predict_one(x), None, None
    if task == "anomaly":
        score = float(model.score_one(x))
        return score >= threshold, None, score
    proba = model.predict_proba_one(x)
    if not proba:
        return None, {}, None
    label = max(proba, key=proba.get)
    return label, {str(k): float(v) for k, v in proba.items()}, None


def in_canary(entity_id: str, share: float) -> bool:
    """Stable traffic split by entity: the same entity always lands on the same side, in every
    replica and across restarts (CRC-32, not Python's per-process salted ``hash``).

    >>> sum(in_canary(f"user-{i}", 0.1) for i in range(10_000))
    1028
    """
    return zlib.crc32(entity_id.encode()) / 2**32 < share


class ScorerProcessor:
    name = "scorer"
    exactly_once = True  # outputs + offsets in one Kafka transaction where the broker supports it

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics,
                 follower: ModelFollower | None):
        self.spec = spec
        self.task = spec.model.task
        self.features_topic = settings.topics.name("features")
        self.predictions_topic = settings.topics.name("predictions")
        self.shadow_topic = settings.topics.shadow_predictions()
        self.follower = follower
        self.store: OnlineStore | None = None
        self.http_latency = metrics.histogram("streamlearn_http_predict_seconds", "POST /predict latency",
                                              ["service", "model"])
        self.initial = Served(spec.model.name, 0, build_pipeline(spec.model.pipeline))
        # no model_version label: a learning model gets a new version every few seconds, which would
        # be unbounded cardinality; the version served is the streamlearn_model_version gauge
        self.scored = metrics.counter("streamlearn_predictions_total", "Predictions made",
                                      ["service", "model", "role"])
        self.latency = metrics.histogram("streamlearn_prediction_latency_seconds",
                                         "Event time to prediction produced", ["service", "model"])
        self.scoring_time = metrics.histogram("streamlearn_scoring_seconds",
                                              "Time to score one batch (model only)", ["service", "model"])
        self._children: dict[tuple, object] = {}  # labelled metric children: labels() costs ~2 us per call

    def _child(self, metric, *labels: str):
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.name, *labels)
        return child

    def subscriptions(self) -> dict[str, Decoder]:
        return {self.features_topic: schema_decoder(Features)}

    def ready(self) -> bool:
        return self.follower is None or self.follower.caught_up.is_set()

    def current(self) -> Served:
        return self.follower.current if self.follower else self.initial

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        champion = self.current()  # one version per model for the whole batch
        challengers = self.follower.challengers if self.follower and self.spec.scorer.shadow != "off" else {}
        canary = self.spec.scorer.canary
        canary_model = challengers.get(f"{champion.name}.{canary.challenger}") if canary else None
        xs = [msg.value.features for msg in batch]
        scored = {champion.name: self._score(champion, xs)}
        for name, served in challengers.items():
            scored[name] = self._score(served, xs)
        now = time.time()
        outputs = []
        for i, msg in enumerate(batch):
            f: Features = msg.value
            primary = champion
            if canary_model is not None and in_canary(f.entity_id, canary.share):
                primary = canary_model
            latency = max(0.0, now - f.ts)
            self._child(self.latency, primary.name).observe(latency)
            for served in [champion, *challengers.values()]:
                shadow = served is not primary
                prediction, proba, score = scored[served.name][i]
                separate = shadow and self.spec.scorer.shadow == "separate"
                topic = self.shadow_topic if separate else self.predictions_topic
                outputs.append(Outgoing(topic, Prediction(
                    event_id=f.event_id, entity_id=f.entity_id, ts=f.ts, model=served.name,
                    model_version=served.version, prediction=prediction, proba=proba, score=score, scored_at=now,
                    latency_ms=latency * 1000, shadow=shadow), f.entity_id))
                self._child(self.scored, served.name, "shadow" if shadow else "primary").inc()
        return outputs

    def _score(self, served: Served, xs: list[dict]) -> list:
        started = time.perf_counter()
        results = predict_batch(served.model, self.task, xs, self.spec.model.anomaly_threshold)
        self.scoring_time.labels(self.name, served.name).observe(time.perf_counter() - started)
        return results

    def routes(self):
        """``POST /predict`` when an online store is configured."""
        if self.store is None:
            return {}
        latency = self.http_latency.labels(self.name, self.spec.model.name)
        route = PredictRoute(self.store, self.current, self.task, self.spec.feature_names(), predict,
                             self.spec.model.anomaly_threshold, latency)
        return {("POST", "/predict"): route}

    def close(self) -> None:
        if self.follower:
            self.follower.stop()


def build(settings: Settings, metrics: RuntimeMetrics) -> ScorerProcessor:
    spec = load_spec(settings.service.spec)
    registry = ModelRegistry(make_redis(settings.redis), Signer(settings.service.signing_key()),
                             settings.redis.namespace)
    processor = ScorerProcessor(spec, settings, metrics, follower=None)
    store = spec.features.store
    processor.store = RedisOnlineStore(make_redis(settings.redis), settings.redis.namespace, spec.features.store_name(),
                                       ttl_s=store.ttl_s, max_age_s=store.max_age_s, metrics=metrics,
                                       service="scorer")
    processor.follower = ModelFollower(settings.kafka, settings.topics.name("models"), registry,
                                       processor.initial, metrics).start()
    # a new replica serves the current champion from its first prediction: read the models topic
    # to its end before consuming features
    if not processor.follower.caught_up.wait(STARTUP_CATCH_UP_S):
        log.warning("models topic not read to its end within %ss; serving v%d meanwhile",
                    STARTUP_CATCH_UP_S, processor.follower.current.version)
    return processor
