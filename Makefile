# notifyctl — `make demo` and `make test` work on a fresh clone with Python >= 3.11.
#
# Installs come from requirements.lock (exact versions with hashes, made by `make lock` with uv),
# so `make demo`, `make test` and CI run the tested set whatever PyPI holds today. pyproject.toml
# keeps compatible ranges for those who install notifyctl as a library; `make test-latest` runs
# the suite against the newest releases within those ranges (not in CI: it tells us what breaks next).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
DEMO_HOME ?= $(CURDIR)/.demo-home
LATEST := .venv-latest

.PHONY: install demo test test-latest lock lint chaos bench clean

# The venv also finds the checkout's own top-level packages, which are not in the wheel (sandboxes/
# for `notifyctl sandbox`, bench/, chaos/), whatever the working directory: a .pth file naming it.
# uv installs the same hashed lock as pip would, in ~10 s instead of ~60 s (the install counts in
# `make test`'s 10-minute budget); UV=pip falls back to pip alone.
UV ?= uv
UV_VERSION := 0.9.9
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
ifeq ($(UV),pip)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
else
	$(PY) -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) --require-hashes -r $(LOCK)
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
endif
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], \
	    "notifyctl-checkout.pth").write_text("$(CURDIR)\n")'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	NOTIFY_HOME=$(DEMO_HOME) $(VENV)/bin/notifyctl demo

# Two pytest-xdist workers (TEST_WORKERS=1 for one): while one waits on a subprocess, a socket or a
# sleep, the other runs. Every session-scoped thing is per worker (tests/conftest.py); tests that
# must share one process (an ordered pair, the two smokes) go whole to one worker (XDIST_GROUPS).
# PYTEST_ARGS for more (e.g. PYTEST_ARGS=--basetemp=/tmp/mine beside other runs on one machine).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run

chaos: $(STAMP)
	$(PY) -m chaos.run
	$(PY) -m chaos.multihost
	$(PY) -m chaos.sentinel

# The suite against the newest releases pyproject.toml allows, in a venv of its own.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade -e '.[test,bench]'
	$(LATEST)/bin/python -m pip list --format=freeze
	NOTIFY_TEST_UNLOCKED=1 $(LATEST)/bin/python -m pytest

# Refresh the lock from pyproject.toml: the newest releases within its ranges, with hashes.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check 'uv>=0.9,<1'
	.venv-lock/bin/uv pip compile pyproject.toml --extra sandbox --extra test --extra bench --generate-hashes \
	    --python-version 3.11 --universal --custom-compile-command "make lock" --upgrade -o $(LOCK)

# ruff (checks, then the tree as `ruff format` writes it), then mypy as a ratchet: no module may gain
# type errors (tests/typecheck.py, baseline beside it).
lint: $(STAMP)
	$(VENV)/bin/ruff check notifyctl worker campaigns sandboxes tests bench chaos
	$(VENV)/bin/ruff format --check notifyctl worker campaigns sandboxes tests bench chaos
	$(PY) tests/typecheck.py

clean:
	-NOTIFY_HOME=$(DEMO_HOME) $(VENV)/bin/notifyctl redis stop 2>/dev/null
	rm -rf $(VENV) $(LATEST) .venv-lock $(DEMO_HOME) .pytest_cache
