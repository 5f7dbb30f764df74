# stockflow: `make demo` runs the pipeline, `make test` runs the tests. `make help` lists all.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-unit test-integration bench lint fmt up down status lock clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: $(STAMP) ## Virtualenv, pinned Python packages, redis-server (Kafka jars come on first `up`)
	@command -v redis-server >/dev/null || $(MAKE) --no-print-directory redis-server
	@command -v java >/dev/null || { echo "java not found: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn not found: install Maven (apt-get install maven)"; exit 1; }

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

.PHONY: redis-server
redis-server:
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "Installing redis-server from Debian's packages..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
	  echo "redis-server not found: run 'sudo apt-get install redis-server', then make setup again"; exit 1; \
	fi

demo: setup ## Start everything, publish orders, print the read models and a reconciliation
	$(BIN)/stockflow demo $(DEMO_ARGS)

test: setup postgresql ## All tests: unit, integration and end-to-end (starts its own Kafka, Redis, PostgreSQL)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: setup ## Unit tests only (no services)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: setup postgresql ## Pipeline vs raw Kafka vs PostgreSQL CRUD; writes .stockflow/bench/REPORT.md (about 6 min)
	$(BIN)/stockflow bench $(BENCH_ARGS)

.PHONY: postgresql
postgresql:
	@command -v pgbench >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "Installing PostgreSQL (the CRUD baseline) from Debian's packages..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null; \
	else \
	  echo "PostgreSQL not found: run 'sudo apt-get install postgresql postgresql-contrib', then run make again"; exit 1; \
	fi

lint: setup ## ruff and mypy --strict; changes nothing
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: setup ## Format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: setup ## Start Kafka, Redis, one processor, one projection worker and the HTTP API in the background
	$(BIN)/stockflow stack up --processors 1 --projections 1 --api

down: setup ## Stop everything `make up` or `make demo --keep-running` started
	$(BIN)/stockflow stack down

status: setup ## Show the stack's processes
	$(BIN)/stockflow stack status

lock: ## Re-pin requirements.lock from a fresh resolve of pyproject.toml
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev,bench]'
	{ echo "# Exact versions of every package stockflow installs (make setup). Regenerate with: make lock"; \
	  .lock-venv/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf .lock-venv

clean: down ## Stop the stack and delete the venv and all local state (jars, data, logs)
	rm -rf $(VENV) .stockflow
