# The two commands (contract section 3):
#   make run   install what is missing, start PostgreSQL + Redis under .run/ (unless
#              DATABASE_URL / REDIS_URL point elsewhere), migrate, run the daemon and a
#              demo workload with live progress. Ctrl-C stops everything it started.
#   make test  the same install, then ruff, mypy --strict and the whole test suite against
#              real servers the tests start themselves.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SYSTEM_STAMP := $(VENV)/.system-stamp

.PHONY: run test install system lint typecheck unit bench clean

run: install
	$(BIN)/python -m devstack run

test: install lint typecheck
	$(BIN)/python -m pytest

install: $(STAMP)

system: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): devstack/system-deps.sh
	./devstack/system-deps.sh
	@mkdir -p $(VENV) && touch $@

# The hot path is compiled by mypyc (setup.py): rebuild when those sources change.
COMPILED := cdc/messages.py cdc/pgoutput.py cdc/assemble.py cdc/resp.py cdc/plan.py cdc/core.py \
	cdc/redis_wire.py cdc/sink.py cdc/source.py cdc/pipeline.py cdc/streams.py

$(STAMP): $(SYSTEM_STAMP) pyproject.toml setup.py $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.all

clean:
	rm -rf $(VENV) .run build *.egg-info .mypy_cache .ruff_cache .pytest_cache
