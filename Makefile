# streamlearn: `make demo` runs the pipeline on the embedded broker; `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast kafka install bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

# Apache Kafka's jars from Maven Central into ~/.cache/streamlearn (once).
kafka: $(STAMP)
	$(PY) -c "from services.cli.localstack import kafka_libs; print(kafka_libs())"

demo: $(STAMP)
	$(VENV)/bin/streamlearn demo

test: $(STAMP) kafka
	$(PY) -m pytest -q tests services schemas

bench: $(STAMP) kafka
	$(PY) -m tests.bench.bench_pipeline

clean:
	rm -rf .streamlearn .pytest_cache
