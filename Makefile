# Two commands: `make demo` and `make test`. Both work on a fresh Debian machine with only
# Python 3.11: they create .venv, install what they need, and (for tests) the PostgreSQL
# server binaries the test setup starts on a throwaway cluster, Perl's Mail::DKIM (a
# second, independent DKIM verifier) and headless Chromium for the dashboard's browser tests.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Where PYTHONDONTWRITEBYTECODE is set (our development machines set it), Python writes no
# bytecode for the editable install's sources, so every `python -m mailstrom` that the tests,
# the demo and the benchmarks spawn compiles them again: 60-100 ms a process. `<python>
# $(COMPILE)` compiles them once, for that interpreter; an edited file is compiled again next
# time (its .pyc records the source's mtime).
COMPILE := -m compileall -q src

.PHONY: demo test test-lowest lint typecheck pytest system-deps clean bench

$(PY):
	@scripts/ensure-system-deps venv
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

system-deps:
	@scripts/ensure-system-deps postgres dkim browser

# The demo's loopback servers are mailstrom.testing's (the `testing` extra, part of `test`).
demo: $(STAMP)
	@$(PY) $(COMPILE)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy src
	$(VENV)/bin/mypy --strict tests/type_usage.py

pytest: $(STAMP) system-deps
	@$(PY) $(COMPILE)
	$(VENV)/bin/pytest --cov=mailstrom --cov-report=term:skip-covered

test: lint typecheck pytest

# The suite again, with every dependency at the lowest version pyproject.toml allows
# (constraints/lowest.txt), in a venv of its own; not part of `make test`, which installs
# the newest. Tooling only the suite uses may be newer; linters and type checkers are left out.
LOWEST := .venv-lowest
# The pins are the lowest Python's (3.11): some have no wheels for later ones (uvloop 0.19).
LOWEST_PYTHON ?= python3
LOWEST_STAMP := $(LOWEST)/.installed-$(shell cat pyproject.toml constraints/lowest.txt | sha1sum | cut -c1-12)
LOWEST_EXTRAS := postgres-binary,metrics,fast,doctor,dkim,mta-sts,dane,web,django,testing
LOWEST_TOOLS := dkimpy pynacl hypothesis pytest-asyncio pytest-timeout httpx2 selenium

$(LOWEST_STAMP): pyproject.toml constraints/lowest.txt
	@scripts/ensure-system-deps venv
	rm -rf $(LOWEST) && $(LOWEST_PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c constraints/lowest.txt \
		-e '.[$(LOWEST_EXTRAS)]' $(LOWEST_TOOLS)
	touch $@

test-lowest: $(LOWEST_STAMP) system-deps
	@$(LOWEST)/bin/python $(COMPILE)
	$(LOWEST)/bin/python -m pytest -p no:cacheprovider

bench: $(STAMP) system-deps
	@$(PY) $(COMPILE)
	$(PY) benchmarks/enqueue.py
	$(PY) benchmarks/deliver.py
	$(PY) benchmarks/postgres.py

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache .ruff_cache
