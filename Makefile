# streamlearn: `make demo` runs the pipeline on the embedded broker; `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test kafka install bench soak clean

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

# the fault-injection suite at soak size (make test runs a bounded form)
soak: $(STAMP) kafka
	STREAMLEARN_FAULT_EVENTS=60000 STREAMLEARN_FAULT_RATE=800 STREAMLEARN_FAULT_ROUNDS=3 $(PY) -m pytest -q -s tests/reliability/test_faults.py

clean:
	rm -rf .streamlearn .pytest_cache
