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

# GPU=1: the CUDA lock (onnxruntime-gpu; torch is CUDA-built in both locks). `make install-gpu` is the same.
GPU ?=
RUN_LOCK := $(if $(GPU),requirements-gpu.lock,requirements.lock)
RUN_STAMP := $(VENV)/.stamp-run-$(shell cat $(RUN_LOCK) pyproject.toml | sha1sum | cut -c1-12)
# onnxruntime and onnxruntime-gpu install the same package folder: removing one breaks the other, so a switch
# removes both and installs the lock's one afresh.
define ort_switch
@if $(BIN)/pip show --quiet $(1) >/dev/null 2>&1; then $(BIN)/pip uninstall --quiet -y onnxruntime onnxruntime-gpu; fi
endef
DEV_STAMP := $(VENV)/.stamp-dev-$(shell cat requirements-dev.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test install install-gpu install-dev system-deps lock ui schedule bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# pip 23's resolver backtracks for >13 min on this stack: upgrade it first.
	$(BIN)/pip install --quiet --upgrade "pip>=25" "uv>=0.5"

$(RUN_STAMP): $(BIN)/python $(RUN_LOCK) pyproject.toml
	$(call ort_switch,$(if $(GPU),onnxruntime,onnxruntime-gpu))
	$(BIN)/pip install --quiet -r $(RUN_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-run-* && touch $@

$(DEV_STAMP): $(BIN)/python requirements-dev.lock pyproject.toml
	$(call ort_switch,onnxruntime-gpu)
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-dev-* && touch $@

install: $(RUN_STAMP)

## GPU machines (Linux x86_64, NVIDIA driver >= 580 for CUDA 13, a Turing or newer GPU): CUDA torch and
## onnxruntime-gpu from requirements-gpu.lock. TENSORRT=1 adds TensorRT 10 (`lensmith export --tensorrt`, the
## TensorRT provider) from NVIDIA's package index, which pip must be able to reach. Then `make run GPU=1`.
install-gpu:
	$(MAKE) install GPU=1
	@if [ -n "$(TENSORRT)" ]; then $(BIN)/pip install --quiet "tensorrt-cu13>=10.13,<11"; fi

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
	$(BIN)/uv pip compile pyproject.toml --extra gpu --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o requirements-gpu.lock

## The GPU check (bench/gpu_check.sh): demo data -> CUDA training -> evaluation -> export + parity -> speed
## ceiling, one JSON summary. Without a GPU it is a short CPU dry run of the same steps.
gpu-check: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash bench/gpu_check.sh

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
