# Set-up and test on a fresh machine. torch is pinned to the CPU wheel this machine
# serves locally; any other spec would download a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: test lint venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check surgery tests bench
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check surgery tests bench
	$(VENV)/bin/ruff format --check surgery tests bench
