"""``streamlearn produce`` as a replay / backfill tool: CSV, Parquet and JSON lines mapped to the event
envelope with the event time taken from a column, and the pacing (as fast as possible, a rate, or
event-time order at a speed-up) on a monotonic schedule. The records go to the events topic like
live ones, so ingestion computes the same features for them (tests/integration/test_ingestion_pipeline.py)."""

from __future__ import annotations

import argparse
import time

import orjson
import pandas as pd
import pytest

from services.cli import commands
from services.cli.commands import event_time, pace
from services.cli.main import _parser
from services.ingestion.validation import EventValidator
from services.runtime.messages import Reject
from services.runtime.spec import load_spec

VALIDATE = EventValidator(load_spec("clickstream"))


def args_for(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["produce", "events", "x.csv", *argv])


def rows() -> list[dict]:
    return [
        {"event_id": "e1", "user": "u1", "when": "2023-11-14T22:13:20Z", "type": "page_view", "page": "home",
         "price": 0.0, "dwell_s": 3.5},
        {"event_id": "e2", "user": "u2", "when": "2023-11-14T22:13:21.250+00:00", "type": "add_to_cart",
         "page": "cart", "price": 12.5, "dwell_s": 1.0, "item": "item-3"},
        {"event_id": "e3", "user": "u1", "when": "1700000002.5", "type": "page_view", "page": "search",
         "price": 0.0, "dwell_s": 0.5},
        {"event_id": "e4", "user": "u1", "when": None, "type": "page_view", "page": "home", "price": 0.0,
         "dwell_s": 0.5},
    ]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_rows_become_events_with_their_event_time(tmp_path, suffix):
    path = tmp_path / f"clicks{suffix}"
    frame = pd.DataFrame(rows())
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    records = commands._records(path, args_for("--entity-col", "user", "--ts-col", "when"), "events")
    assert [key for key, _, _ in records] == [b"u1", b"u2", b"u1", b"u1"]
    assert [ts for _, _, ts in records] == [1_700_000_000.0, 1_700_000_001.25, 1_700_000_002.5, None]
    events = [VALIDATE(value) for _, value, _ in records[:3]]
    assert [(e.event_id, e.entity_id, e.ts, e.type) for e in events] == [
        ("e1", "u1", 1_700_000_000.0, "page_view"), ("e2", "u2", 1_700_000_001.25, "add_to_cart"),
        ("e3", "u1", 1_700_000_002.5, "page_view")]
    assert events[1].data.item == "item-3" and events[0].data.item is None
    with pytest.raises(Reject) as info:  # no event time in the row: ingestion rejects it, visibly
        VALIDATE(records[3][1])
    assert (info.value.reason, info.value.field) == ("missing_field", "ts")


def test_parquet_timestamp_columns_keep_their_event_time(tmp_path):
    path = tmp_path / "clicks.parquet"
    frame = pd.DataFrame(rows()[:3]).drop(columns=["when"])
    frame["aware"] = pd.to_datetime([1_700_000_000.0, 1_700_000_001.25, 1_700_000_002.5], unit="s", utc=True)
    frame["naive"] = frame["aware"].dt.tz_localize(None)
    frame.to_parquet(path)
    for column in ("aware", "naive"):
        keep = frame.drop(columns=["naive" if column == "aware" else "aware"])
        keep.to_parquet(path)
        records = commands._records(path, args_for("--entity-col", "user", "--ts-col", column), "events")
        assert [VALIDATE(v).ts for _, v, _ in records] == [1_700_000_000.0, 1_700_000_001.25, 1_700_000_002.5]


def test_without_a_time_column_rows_are_stamped_now(tmp_path):
    path = tmp_path / "clicks.csv"
    pd.DataFrame(rows()[:2]).drop(columns=["when"]).to_csv(path, index=False)
    before = time.time()
    records = commands._records(path, args_for("--entity-col", "user"), "events")
    assert all(before <= VALIDATE(v).ts <= time.time() for _, v, _ in records)


def test_json_lines_are_sent_as_they_are(tmp_path):
    path = tmp_path / "events.jsonl"
    good = orjson.dumps({"event_id": "e1", "entity_id": "u9", "ts": "2023-11-14T22:13:20Z"})
    path.write_bytes(good + b"\n\nnot json\n" + b'{"entity_id": "u2", "ts": 5}\n')
    records = commands._records(path, args_for(), "events")
    assert records == [(b"u9", good, 1_700_000_000.0), (None, b"not json", None),
                       (b"u2", b'{"entity_id": "u2", "ts": 5}', 5.0)]


@pytest.mark.parametrize(("value", "expected"), [
    (12, 12.0), (12.5, 12.5), ("12.5", 12.5), ("2023-11-14T22:13:20Z", 1_700_000_000.0),
    ("2023-11-14T22:13:20", 1_700_000_000.0), (pd.Timestamp(1_700_000_000, unit="s"), 1_700_000_000.0),
    (None, None), ("soon", None), (True, None), (float("nan"), None), ("nan", None), (pd.NaT, None),
])
def test_event_time(value, expected):
    assert event_time(value) == expected


def test_pacing_by_rate_keeps_file_order():
    records = [(None, b"%d" % i, float(10 - i)) for i in range(5)]
    ordered, due = pace(records, rate=10)
    assert ordered == records
    assert due == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_speedup_replays_in_event_time_order_with_the_gaps_shrunk():
    records = [(None, b"a", 100.0), (None, b"b", 40.0), (None, b"bad line", None), (None, b"c", 70.0)]
    ordered, due = pace(records, speedup=30)
    assert [value for _, value, _ in ordered] == [b"b", b"bad line", b"c", b"a"]
    assert due == pytest.approx([0.0, 0.0, 1.0, 2.0])
    assert pace(records, sort=True) == (ordered, None)
    assert pace(records) == (records, None)


class FakeProducer:
    def __init__(self, conf):
        self.sent: list[tuple[float, bytes]] = []

    def produce(self, topic, value, key, on_delivery=None):
        self.sent.append((time.monotonic(), value))

    def poll(self, timeout=0):
        if timeout:
            time.sleep(timeout)  # what librdkafka's poll does when there is nothing to serve
        return 0

    def flush(self, timeout=None):
        return 0


def test_produce_follows_the_monotonic_schedule(tmp_path, monkeypatch, capsys):
    path = tmp_path / "events.jsonl"
    lines = [orjson.dumps({"entity_id": f"u{i % 3}", "ts": 1000.0 + 2 * i}) for i in range(31)]
    path.write_bytes(b"\n".join(reversed(lines)))
    producers: list[FakeProducer] = []
    monkeypatch.setattr(commands, "Producer", lambda conf: producers.append(FakeProducer(conf)) or producers[-1])
    args = _parser().parse_args(["produce", "t.events", str(path), "--bootstrap", "x:1", "--speedup", "100"])
    assert commands.cmd_produce(args) == 0
    sent = producers[0].sent
    assert [value for _, value in sent] == lines, "event-time order"
    start = sent[0][0]
    for i, (at, _) in enumerate(sent):
        assert at - start >= i * 0.02 - 1e-3, "never early"
    assert sent[-1][0] - start < 0.6 + 0.5, "and not drifting late (60 s of event time at 100x)"
    assert "produced 31 messages to t.events" in capsys.readouterr().out


def test_rate_and_speedup_exclude_each_other():
    with pytest.raises(SystemExit):
        _parser().parse_args(["produce", "events", "x.csv", "--rate", "5", "--speedup", "2"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["produce", "events", "x.csv", "--rate", "0"])
