"""The operator commands the README shows, run as a user runs them (the CLI as a process) against a
running stack on Apache Kafka: produce, tail (predictions and the DLQ), topics, status."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import orjson
import pytest

from services.cli.datasets import examples
from services.cli.stack import Stack
from tests.conftest import wait_until
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.kafka

EVENTS = 40


def _cli(state_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=120)


def test_produce_tail_topics_status_on_a_running_stack(kafka_broker, redis_server, prefix, tmp_path):
    state = tmp_path / "state"
    stack = Stack(state, broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                  extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    data = list(examples("phishing", EVENTS, run_id=uuid.uuid4().hex[:6]))
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(orjson.dumps(e.event) + b"\n" for e in data))
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b"".join(orjson.dumps(e.label) + b"\n" for e in data))
    with stack:
        produced = _cli(state, "produce", "events", str(events))
        assert produced.returncode == 0, produced.stderr
        assert f"produced {EVENTS} messages" in produced.stdout
        assert _cli(state, "produce", "labels", str(labels)).returncode == 0
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"event_id": "x", "entity_id": "e", "ts": "yesterday", "type": "t", "data": {}}\n')
        assert _cli(state, "produce", "events", str(bad)).returncode == 0
        wait_until(lambda: len(read_topic(stack.bootstrap, stack.topics.name("predictions"))) >= EVENTS, 60,
                   "every event's prediction")
        wait_until(lambda: read_topic(stack.bootstrap, stack.topics.name("dlq")), 60, "the bad event in the DLQ")

        tail = _cli(state, "tail", "predictions", "-n", "5", "--json")
        assert tail.returncode == 0, tail.stderr
        lines = [json.loads(line) for line in tail.stdout.splitlines()]
        assert len(lines) == 5
        assert {line["value"]["event_id"] for line in lines} <= {e.event["event_id"] for e in data}

        dlq = _cli(state, "tail", "dlq")
        assert dlq.returncode == 0, dlq.stderr
        assert "ts" in dlq.stdout and "yesterday" in dlq.stdout, dlq.stdout

        topics = _cli(state, "topics", "--json")
        assert topics.returncode == 0, topics.stderr
        by_role = {t["role"]: t for t in json.loads(topics.stdout) if t["role"]}
        assert by_role["events"]["messages"] == EVENTS + 1 and by_role["predictions"]["messages"] >= EVENTS

        wait_until(lambda: _cli(state, "status", "--json").returncode == 0, 60, "status to see every service up")
        status = json.loads(_cli(state, "status", "--json").stdout)
        assert {s["name"] for s in status["services"]} == {"ingestion", "scorer", "learner", "monitor"}
        assert all(s["up"] and s["ready"] for s in status["services"])
        assert "phishing" in json.dumps(status["models"])
