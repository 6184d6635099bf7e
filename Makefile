# Two commands for a fresh machine (Python 3.11 and pip needed; see README):
#   make repro   installs into .venv if needed, then runs the pipeline (dvc repro)
#   make test    installs into .venv if needed, then runs the test suite
#   make lint    ruff check + ruff format --check (pyproject.toml [tool.ruff]); .ci/run runs it before the tests
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Offline-first: no hub retries, no update checks, no telemetry (override in the environment when online).
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export DVC_NO_ANALYTICS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro lint test test-fast clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

repro: install
	$(BIN)/dvc repro

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/python -m pytest -n 2 --dist loadscope --durations=15

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not slow"

clean-venv:
	rm -rf $(VENV)
