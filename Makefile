# The two commands a newcomer needs:
#   make serve   create .venv, install tegrad, serve the embedded default model (gRPC :8001, metrics :8002;
#                state in .state/ of this checkout)
#   make test    create .venv, install tegrad with test extras, lint, check Python 3.10 compatibility, run all tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_ARGS ?=
# A state dir of this checkout's own: another clone's engines and rollout state are never picked up.
SERVE_STATE_DIR ?= $(CURDIR)/.state

.PHONY: serve test lint protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/tegrad serve --state-dir $(SERVE_STATE_DIR) $(SERVE_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check daemon calib tests bench
	$(BIN)/vermin --no-tips --violations -t=3.10- --eval-annotations daemon calib bench

# Two pytest sessions: tritonclient's generated protobuf package `inference` cannot share
# a process with tegrad's own (see tests/conftest.py), so the interop tests run apart.
test: lint
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest tests/interop
	$(BIN)/python -m pytest tests/fuzz

protos: $(VENV)/.installed-test
	$(BIN)/python -m daemon.protogen.generate

clean:
	rm -rf $(VENV) build *.egg-info
