# Lensmith: the two quick-start commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params.yaml

# Offline and quiet: no telemetry from any tool in the stack.
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

RUN_STAMP := $(VENV)/.stamp-run-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
DEV_STAMP := $(VENV)/.stamp-dev-$(shell cat requirements-dev.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test install install-dev system-deps lock ui schedule bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# pip 23's resolver backtracks for >13 min on this stack: upgrade it first.
	$(BIN)/pip install --quiet --upgrade "pip>=25" "uv>=0.5"

$(RUN_STAMP): $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-run-* && touch $@

$(DEV_STAMP): $(BIN)/python requirements-dev.lock pyproject.toml
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-dev-* && touch $@

install: $(RUN_STAMP)

## System packages the tests use (needs root + apt): Debian's chromium for the Prefect UI browser test,
## dataset-fashion-mnist, one of the real image sets the first-contact tests bring as a user's own data, and
## prometheus for promtool, which checks and unit-tests the alert rules in ops/ (the daemon is not started).
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note:$$missing missing and this is not root: the tests that need them fail with the reason"; fi; \
	fi

install-dev: $(DEV_STAMP) system-deps

## Regenerate the lock files from pyproject.toml (exact versions; CPU onnxruntime extra).
lock: $(BIN)/python
	$(BIN)/uv pip compile pyproject.toml --extra cpu --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o requirements-dev.lock

## Quick start 1: install, then run the pipeline flow; its first DVC stage generates the embedded demo data.
run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/lensmith run --params $(PARAMS)

## Quick start 2: install dev dependencies and run the whole test suite (starts its own servers).
test: install-dev
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

## The Prefect UI on http://127.0.0.1:4200 (local server; no outside links). Then in another shell:
##   PREFECT_API_URL=http://127.0.0.1:4200/api make run   (or make schedule)
ui: install
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200 --analytics-off

## Serve the nightly retraining deployment (cron from params.yaml) against PREFECT_API_URL.
schedule: install
	$(BIN)/lensmith schedule --params $(PARAMS)

bench: install-dev
	$(BIN)/python bench/ingest.py

clean:
	rm -rf .cache reports/* data/manifest.parquet data/splits data/quarantine.csv
