"""Champion / challenger decisions inside the learner's state, and the scorer's canary split."""

from __future__ import annotations

from pathlib import Path

import pytest
from river import datasets

from services.learner.core import apply, new_state
from services.runtime.spec import load_spec, parse_spec
from services.scorer.app import in_canary

SPEC = Path(__file__).resolve().parents[1] / "specs" / "phishing_challengers.yaml"
ROWS = list(datasets.Phishing())


def feed(state, spec, rows, start=0):
    for i, (x, y) in enumerate(rows, start):
        apply(state, spec, "features", "f", 0, i, {"event_id": f"e{i}", "ts": float(i), "features": x})
        apply(state, spec, "labels", "l", 0, i, {"event_id": f"e{i}", "ts": float(i), "label": y})


def test_a_clearly_better_challenger_is_promoted_once_its_window_is_full():
    spec = load_spec(str(SPEC))
    state = new_state(spec)
    feed(state, spec, ROWS[:199])
    assert state.events == [] and type(state.model).__name__ == "PriorClassifier"
    feed(state, spec, ROWS[199:400], start=199)
    (event,) = state.events
    assert event["event"] == "promotion" and event["challenger"] == "logreg" and event["at_example"] == 200
    assert event["challenger_metric"] > event["champion_metric"] + 0.05
    assert type(state.model).__name__ == "Pipeline"  # the champion slot now holds the logistic regression
    assert type(state.challengers["logreg"].model).__name__ == "PriorClassifier"  # the old champion goes on


def test_no_promotion_without_a_margin():
    text = SPEC.read_text().replace("margin: 0.05", "margin: 0.9")
    spec = parse_spec(text)
    state = new_state(spec)
    feed(state, spec, ROWS[:600])
    assert state.events == [] and type(state.model).__name__ == "PriorClassifier"


@pytest.mark.parametrize("policy", ["reset", "challenger", "ignore"])
def test_reaction_to_a_concept_drift_event(policy):
    spec = parse_spec(SPEC.read_text().replace("on_drift: challenger", f"on_drift: {policy}")
                      .replace("promotion: {window: 200, margin: 0.05, min_examples: 200}", ""))
    state = new_state(spec)
    feed(state, spec, ROWS[:100])
    before = state.model
    drift = {"model": spec.model.name, "kind": "concept", "detector": "ADWIN"}
    apply(state, spec, "drift", "d", 0, 0, drift)
    apply(state, spec, "drift", "d", 0, 1, dict(drift, model="someone-else"))  # not ours: ignored
    if policy == "reset":
        assert state.model is not before and [e["event"] for e in state.events] == ["reset"]
        assert state.model.predict_proba_one(ROWS[0][0]) == {}  # fresh
    elif policy == "challenger":
        assert state.model is before and "drift" in state.challengers
        assert [e["event"] for e in state.events] == ["drift_challenger"]
    else:
        assert state.model is before and state.events == [] and "drift" not in state.challengers
    assert state.examples_seen == 100
    assert state.lineage.runs[-1] == ["d", 0, 0, 2]


def test_canary_share_is_within_tolerance_and_stable():
    keys = [f"entity-{i}" for i in range(10_000)]
    for share in (0.05, 0.3, 0.5):
        hits = sum(in_canary(k, share) for k in keys)
        assert abs(hits / len(keys) - share) < 0.015
    assert [in_canary(k, 0.3) for k in keys[:100]] == [in_canary(k, 0.3) for k in keys[:100]]
    assert all(in_canary(k, 0.3) <= in_canary(k, 0.5) for k in keys), "a larger share only adds entities"


def test_canary_must_name_a_challenger():
    from services.runtime.spec import SpecError

    with pytest.raises(SpecError, match="scorer.canary.challenger"):
        parse_spec(SPEC.read_text().replace("canary: {challenger: logreg", "canary: {challenger: nope"))
