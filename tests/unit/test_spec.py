"""The pipeline spec: the bundled phishing spec, and bad specs failing with field path and line."""

from __future__ import annotations

import re

import pytest
from river import datasets

from services.runtime.river_models import ModelSpecError, build_pipeline, check_task
from services.runtime.spec import SpecError, bundled_specs, load_spec, parse_spec, resolve_spec_path

PHISHING_YAML = resolve_spec_path("phishing").read_text()


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in spec text")


def _mutate(old: str, new: str) -> str:
    assert PHISHING_YAML.count(old) == 1, f"{old!r} must occur once in phishing.yaml"
    return PHISHING_YAML.replace(old, new)


# ---- the bundled spec ----------------------------------------------------------------------------

def test_phishing_is_bundled_and_loads():
    assert "phishing" in bundled_specs()
    spec = load_spec("phishing")
    assert spec.name == "phishing"
    assert spec.model.task == "binary"
    assert spec.model.name == "phishing-logreg"


def test_phishing_event_fields_are_exactly_the_river_dataset_features():
    spec = load_spec("phishing")
    x, y = next(iter(datasets.Phishing()))
    assert list(spec.event.fields) == list(x)
    assert spec.feature_names() == list(x)
    assert spec.label.type == "bool"
    assert isinstance(y, bool)
    for name, value in x.items():
        assert spec.event.fields[name].type == type(value).__name__, name


def test_phishing_model_builds_and_fits_the_task():
    spec = load_spec("phishing")
    model = build_pipeline(spec.model.pipeline)
    check_task(model, spec.model.task)


def test_spec_hash_is_stable_and_sensitive():
    a, b = load_spec("phishing"), parse_spec(PHISHING_YAML)
    assert a.spec_hash() == b.spec_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", a.spec_hash())
    changed = parse_spec(_mutate("quality_window: 200", "quality_window: 201"))
    assert changed.spec_hash() != a.spec_hash()


def test_unknown_spec_name_names_the_bundled_specs():
    with pytest.raises(SpecError, match="phishing"):
        load_spec("no-such-spec-or-file")


# ---- bad specs -----------------------------------------------------------------------------------

DERIVED = "passthrough: all\n  derived:\n    - {name: z, expr: EXPR}"

BAD_SPECS = [
    # id, old, new, field path in message, line marker (text on the expected line), message fragment
    ("task", "task: binary", "task: ranking", "model.task", "task: ranking", "'binary'"),
    ("field-type", "https: {type: float, min: 0, max: 1}", "https: {type: double, min: 0, max: 1}",
     "event.fields.https.type", "https: {type: double", "'float'"),
    ("field-extra-key", "https: {type: float, min: 0, max: 1}", "https: {type: float, minimum: 0, max: 1}",
     "event.fields.https.minimum", "https: {type: float, minimum", "Extra inputs"),
    ("min-greater-than-max", "https: {type: float, min: 0, max: 1}", "https: {type: float, min: 2, max: 1}",
     "event.fields.https", "https: {type: float, min: 2", "greater than max"),
    ("passthrough-unknown", "passthrough: all", "passthrough: [https, no_such_field]",
     "features.passthrough.1", "no_such_field", "unknown event field 'no_such_field'"),
    ("derived-unknown-name", "passthrough: all", DERIVED.replace("EXPR", "'https + no_such_name'"),
     "features.derived.0.expr", "no_such_name", "unknown names ['no_such_name']"),
    ("derived-forbidden-call", "passthrough: all", DERIVED.replace("EXPR", "\"__import__('os')\""),
     "features.derived.0.expr", "__import__", "unsupported syntax"),
    ("derived-forbidden-attribute", "passthrough: all", DERIVED.replace("EXPR", "'https.__class__'"),
     "features.derived.0.expr", "__class__", "unsupported syntax"),
    ("derived-forbidden-lambda", "passthrough: all", DERIVED.replace("EXPR", "'(lambda: 1)()'"),
     "features.derived.0.expr", "lambda", "unsupported syntax"),
    ("derived-unparsable", "passthrough: all", DERIVED.replace("EXPR", "'https +'"),
     "features.derived.0.expr", "https +", "cannot parse"),
    ("drift-target", "target: error", "target: no_such_target", "monitor.drift.0.target",
     "target: no_such_target", "unknown target 'no_such_target'"),
    ("drift-detector", "detector: ADWIN", "detector: Magic", "monitor.drift.0.detector",
     "detector: Magic", "'ADWIN'"),
    ("model-name", "name: phishing-logreg", "name: 'phishing logreg!'", "model.name",
     "phishing logreg!", "pattern"),
    ("unknown-model-key", "task: binary", "task: binary\n  tusk: 1", "model.tusk", "tusk: 1", "Extra inputs"),
    ("publish-every-zero", "publish_every: 1 ", "publish_every: 0 ", "learner.publish_every",
     "publish_every: 0", "greater than or equal to 1"),
    ("label-type", "type: bool", "type: boolean", "label.type", "type: boolean", "'bool'"),
]


@pytest.mark.parametrize(("old", "new", "path", "line_marker", "fragment"),
                         [case[1:] for case in BAD_SPECS], ids=[case[0] for case in BAD_SPECS])
def test_bad_spec_names_field_path_and_line(old, new, path, line_marker, fragment):
    text = _mutate(old, new)
    line = _line_of(text, line_marker)
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="phishing.yaml")
    message = str(info.value)
    assert f"phishing.yaml:{line}: {path}: " in message, message
    assert fragment in message, message


def test_invalid_yaml_is_a_spec_error_with_the_line():
    text = _mutate("task: binary", "task: [binary")
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="phishing.yaml")
    message = str(info.value)
    assert message.startswith("phishing.yaml: not valid YAML")
    assert f"line {_line_of(text, 'task: [binary')}" in message


def test_spec_that_is_not_a_mapping():
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_spec("- just\n- a list\n", source="x.yaml")


def test_missing_section_names_it():
    text = _mutate("label:\n  type: bool\n  join_ttl_s: 3600\n", "")
    with pytest.raises(SpecError, match=r"x\.yaml:\d+: label: Field required"):
        parse_spec(text, source="x.yaml")


def test_every_problem_is_reported_at_once():
    text = _mutate("task: binary", "task: ranking").replace("publish_every: 1 ", "publish_every: 0 ")
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="x.yaml")
    assert "model.task" in str(info.value) and "learner.publish_every" in str(info.value)


def test_valid_derived_feature_is_accepted_and_listed():
    spec = parse_spec(_mutate("passthrough: all", DERIVED.replace("EXPR", "'log1p(https) + 2 * is_popular'")))
    assert spec.feature_names()[-1] == "z"
    assert len(spec.feature_names()) == 10


def test_derived_feature_may_use_an_earlier_derived_feature_but_not_a_later_one():
    two = "passthrough: all\n  derived:\n    - {name: a, expr: 'https + 1'}\n    - {name: b, expr: 'a * 2'}"
    assert parse_spec(_mutate("passthrough: all", two)).feature_names()[-2:] == ["a", "b"]
    swapped = "passthrough: all\n  derived:\n    - {name: b, expr: 'a * 2'}\n    - {name: a, expr: 'https + 1'}"
    with pytest.raises(SpecError, match=r"features\.derived\.0\.expr: unknown names \['a'\]"):
        parse_spec(_mutate("passthrough: all", swapped))


def test_drift_on_a_feature_name_is_accepted():
    spec = parse_spec(_mutate("target: error", "target: https"))
    assert spec.monitor.drift[0].target == "https"


# ---- River pipelines -----------------------------------------------------------------------------

@pytest.mark.parametrize(("steps", "where", "fragment"), [
    ([{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegresion": {}}],
     "model.pipeline.1", "river has no 'linear_model.LogisticRegresion'"),
    ([{"no_such_module.Thing": {}}], "model.pipeline.0", "river has no 'no_such_module.Thing'"),
    ([{"StandardScaler": {}}], "model.pipeline.0", "not of the form 'module.Class'"),
    ([{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {"learning_rate": 0.1}}],
     "model.pipeline.1", "has no parameter(s) ['learning_rate']"),
    ([{"linear_model.LogisticRegression": {"optimizer": {"optim.NoSuchOptimizer": {}}}}],
     "model.pipeline.0.optimizer", "river has no 'optim.NoSuchOptimizer'"),
    ([{"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"rate": 1}}}}],
     "model.pipeline.0.optimizer", "has no parameter(s) ['rate']"),
    ([{"optim.SGD": {}}], "model.pipeline.0", "is not an estimator"),
], ids=["unknown-class", "unknown-module", "not-dotted", "unknown-parameter", "unknown-nested-class",
        "unknown-nested-parameter", "not-an-estimator"])
def test_build_pipeline_errors_name_the_step(steps, where, fragment):
    with pytest.raises(ModelSpecError) as info:
        build_pipeline(steps)
    message = str(info.value)
    assert message.startswith(f"{where}: "), message
    assert fragment in message, message


def test_build_pipeline_builds_nested_objects():
    model = build_pipeline([{"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"lr": 0.05}}}}])
    assert type(model).__name__ == "LogisticRegression"
    assert model.optimizer.lr.learning_rate == 0.05


def test_check_task_rejects_a_regressor_for_a_binary_task():
    model = build_pipeline([{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}])
    with pytest.raises(ModelSpecError, match=r"^model\.task: LinearRegression cannot do 'binary'"):
        check_task(model, "binary")
    check_task(model, "regression")


def test_check_task_rejects_a_classifier_for_regression_and_binary_only_for_multiclass():
    logreg = build_pipeline([{"linear_model.LogisticRegression": {}}])
    with pytest.raises(ModelSpecError, match="cannot do 'regression'"):
        check_task(logreg, "regression")
    with pytest.raises(ModelSpecError, match="cannot do 'multiclass'"):
        check_task(logreg, "multiclass")
    check_task(build_pipeline([{"tree.HoeffdingTreeClassifier": {}}]), "multiclass")
