# The two commands a newcomer needs:
#   make serve   create .venv, install tegrad, serve the embedded default model (gRPC :8001, metrics :8002;
#                state in .state/ of this checkout)
#   make test    create .venv, install tegrad with test extras, lint, check Python 3.10 compatibility, run all tests
#   make jetson  the same install on a Jetson (found by itself via /etc/nv_tegra_release): see README "Jetson"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_ARGS ?=
# A state dir of this checkout's own: another clone's engines and rollout state are never picked up.
SERVE_STATE_DIR ?= $(CURDIR)/.state
# On a Jetson the venv sees JetPack's apt packages (python3-libnvinfer: TensorRT's bindings are not on
# PyPI for L4T) and pycuda is built against the local CUDA, whose nvcc is not on a default PATH.
JETSON ?= $(if $(wildcard /etc/nv_tegra_release),1,)
CUDA_ROOT ?= /usr/local/cuda
VENV_FLAGS := $(if $(JETSON),--system-site-packages,)
EXTRAS := $(if $(JETSON),jetson,)
comma := ,
PIP_ENV := $(if $(JETSON),CUDA_ROOT=$(CUDA_ROOT) PATH="$(CUDA_ROOT)/bin:$$PATH",)

.PHONY: serve test lint protos bench clean venv jetson

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_ENV) $(BIN)/python -m pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP_ENV) $(BIN)/python -m pip install -q -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	touch $@ $(VENV)/.installed

jetson:
	$(MAKE) JETSON=1 $(VENV)/.installed
	@echo "next: $(BIN)/tegrad selftest   (TensorRT, CUDA and JetPack versions, then every backend x precision)"

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
