# notifyctl — `make demo` and `make test` work on a fresh clone with Python >= 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_HOME ?= $(CURDIR)/.demo-home

.PHONY: install demo test lint chaos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	NOTIFY_HOME=$(DEMO_HOME) $(VENV)/bin/notifyctl demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.run

chaos: $(STAMP)
	$(PY) -m chaos.run

lint: $(STAMP)
	$(VENV)/bin/ruff check notifyctl worker campaigns tests

clean:
	-NOTIFY_HOME=$(DEMO_HOME) $(VENV)/bin/notifyctl redis stop 2>/dev/null
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache
