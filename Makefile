# The targets CI runs (`make test` = lint + typecheck + all tests against a real local Kafka broker).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= deploy/relay.local.toml

.PHONY: all venv kafka kafka-stop lint typecheck unit test run sandbox bench docs clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

kafka: $(STAMP)
	PYTHON=$(abspath $(PY)) bash deploy/kafka/kafka.sh start

kafka-stop:
	bash deploy/kafka/kafka.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check relay tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy relay

unit: $(STAMP)
	$(PY) -m pytest -m "not integration"

test: lint typecheck kafka
	$(PY) -m pytest

run: kafka
	@echo "make run: Ctrl-C stops the relay (it drains and commits). The Kafka broker on 127.0.0.1:9092 keeps running; make kafka-stop stops it."
	$(PY) -m relay run --config $(CONFIG) --with-sandbox

sandbox: $(STAMP)
	$(PY) -m relay sandbox

bench: kafka
	$(PY) bench/run.py

# regenerate the checked-in AsyncAPI document after changing a type (tests/test_asyncapi.py checks it is current)
docs: $(STAMP)
	$(PY) -m relay asyncapi > docs/asyncapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
