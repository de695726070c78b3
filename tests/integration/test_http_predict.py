"""POST /predict on the scorer, with the online store written by ingestion (Apache Kafka + Redis):
a valid request, an unknown entity, stale features, malformed and oversized bodies; and its latency."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import orjson
import pytest

from services.cli.datasets import examples
from services.cli.stack import Stack
from tests.conftest import wait_until
from tests.kafka_helpers import produce_all, read_topic

pytestmark = pytest.mark.kafka


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, json.loads(payload) if payload.startswith(b"{") else {"raw": payload.decode()}


def test_http_predict(kafka_broker, redis_server, prefix, tmp_path, repo_root):
    spec_path = str(repo_root / "tests/specs/phishing_fresh.yaml")
    stack = Stack(tmp_path / "state", spec=spec_path, broker=kafka_broker.bootstrap, redis=redis_server.url,
                  topic_prefix=prefix, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    rows = list(examples("phishing", 2, run_id=uuid.uuid4().hex[:6]))
    fresh = dict(rows[0].event, entity_id="fresh-entity", ts=time.time())
    stale = dict(rows[1].event, entity_id="stale-entity", ts=time.time() - 3600)
    with stack:
        produce_all(stack.bootstrap, stack.topics.name("events"),
                    [(e["entity_id"].encode(), orjson.dumps(e)) for e in (fresh, stale)])
        wait_until(lambda: len(read_topic(stack.bootstrap, stack.topics.name("features"))) == 2, 60,
                   "both feature vectors")
        url = stack.services["scorer"].metrics_url.replace("/metrics", "/predict")

        status, body = post(url, orjson.dumps({"entity_id": "fresh-entity"}))
        assert status == 200, body
        assert body["model"] == "phishing-logreg" and body["model_version"] == 0
        assert set(body["proba"]) == {"False", "True"} and body["missing"] == []
        assert 0 <= body["feature_age_s"] < 60

        status, body = post(url, orjson.dumps({"entity_id": "fresh-entity", "features": {"https": 0.0}}))
        assert status == 200 and body["features_from_request"] == ["https"]

        status, body = post(url, orjson.dumps({"entity_id": "nobody"}))
        assert status == 404 and "no fresh features" in body["error"] and len(body["missing"]) == 9

        status, body = post(url, orjson.dumps({"entity_id": "stale-entity"}))
        assert status == 404, "features older than max_age_s are missing, never served stale"

        full = {k: v for k, v in rows[1].event["data"].items()}
        status, body = post(url, orjson.dumps({"entity_id": "stale-entity", "features": full}))
        assert status == 200, "a request that brings every feature is scored"

        for bad, field in ((b"{not json", None), (b"[]", None), (orjson.dumps({"features": {}}), "entity_id"),
                           (orjson.dumps({"entity_id": "x", "extra": 1}), "extra"),
                           (orjson.dumps({"entity_id": "x", "features": {"a": [1]}}), "features.a")):
            status, body = post(url, bad)
            assert status == 400 and body["error"], bad
            if field:
                assert body["field"].startswith(field)
        status, _ = post(url, b"{" + b" " * 70_000 + b"}")
        assert status == 413

        latencies = []
        started = time.perf_counter()
        for i in range(500):  # paced at 250 requests/s
            t0 = time.perf_counter()
            assert post(url, orjson.dumps({"entity_id": "fresh-entity"}))[0] == 200
            latencies.append(time.perf_counter() - t0)
            ahead = (i + 1) / 250 - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator, not waiting for a condition
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\nHTTP predict at 250 req/s, 500 requests: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    assert p99 < 1.0
