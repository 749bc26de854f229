# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
WHEELS := $(wildcard /opt/wheels)
PIP_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: setup setup-gguf demo test lint bench-cpu

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_LINKS) -e '.[train,dev,publish,track]'
	touch $@

# `qlc merge --format gguf` needs llama-cpp-python, which pip builds from source (llama.cpp:
# about 24 CPU-minutes, 44 wall-minutes on a busy 2-core machine). The wheel is built once
# into WHEEL_CACHE (without the multimodal library, which qlc does not use) and installed
# from there afterwards; the converter's source is cached on first use (~/.cache/qlc).
WHEEL_CACHE ?= $(HOME)/.cache/qlc/wheels
setup-gguf: setup
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip wheel --quiet --no-deps \
		--find-links $(WHEEL_CACHE) -w $(WHEEL_CACHE) \
		"llama-cpp-python==$$($(PY) -c 'from qlc.runtime.gguf_tools import LLAMA_CPP_PYTHON as v; print(v)')"
	$(PY) -m pip install --quiet --find-links $(WHEEL_CACHE) $(PIP_LINKS) -e '.[train,dev,publish,track,gguf]'

# The main job on the embedded default: the tiny spec, trained on this machine's CPU.
demo: setup
	$(VENV)/bin/qlc run specs/tiny.toml --local

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy compiler qlc/contract.py qlc/trainer
