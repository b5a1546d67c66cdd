# The README's two commands. Each creates .venv on first use and installs the package into it.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/dlm_demo

.PHONY: demo test test-slow lint

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch,harness]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --durations=15

test-slow: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m slow --durations=10

lint: $(VENV)/.installed
	$(PY) -m ruff check --fix .
