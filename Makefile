PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TF ?= cpu

.PHONY: help install test test-slow test-full lint format train sweep ui bench screenshots clean postgres

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install the package editable with its dev extras (TF=gpu for a CUDA build)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,$(TF)]"

test:  ## the fast suite (skips tests marked slow)
	$(BIN)/pytest -q

test-slow:  ## only the slow end-to-end tests (servers, parallel jobs, multi-worker, the bench smoke test)
	$(BIN)/pytest -q -m slow

postgres:  ## PostgreSQL's server for tests/test_postgres.py (Debian's postgresql, if absent) and MLflow's driver
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	    || { [ -n "$$PG_BIN" ] && [ -x "$$PG_BIN/initdb" ]; }; then \
	  echo "postgres: server binaries present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "error: no PostgreSQL server (initdb) and no apt-get: install one, or set PG_BIN=<its bin directory>" >&2; \
	  exit 1; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "error: installing postgresql needs root: run 'make postgres' as root, install sudo, or set PG_BIN" >&2; \
	    exit 1; fi; \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends postgresql; \
	fi
	$(BIN)/python -c "import psycopg" 2>/dev/null || $(BIN)/pip install -e ".[postgres]"

test-full:  ## every test, the slow end-to-end ones included
	$(BIN)/pytest -q -m ""

lint:  ## ruff lint and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format:  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

train:  ## one run with the default config (ARGS="model=mlp ..." to override)
	$(BIN)/python -m trainer $(ARGS)

sweep:  ## a small Hydra multirun over optimizers and learning rates
	$(BIN)/python -m trainer -m optimizer=sgd,adam optimizer.lr=1e-3,1e-2 $(ARGS)

ui:  ## the MLflow UI over this directory's store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

screenshots:  ## the MLflow UI in headless Chromium over three real runs: checks, then docs/mlflow-ui*.png (not in CI)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/python scripts/screenshots $(ARGS)

bench:  ## side-by-side speed: naive, keras fit, bare compiled loop, ours; exit 1 if a target is missed
	$(BIN)/python scripts/bench $(ARGS)

clean:
	rm -rf outputs multirun mlruns .pytest_cache
