# `make demo` and `make test` set up their own environment (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# cmgnet serve's environment: Triton's Python backend stub needs numpy < 2 (deploy/server.py).
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
# CPU build by default; on a CUDA machine preinstall torch in the venv (or set TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo bench ui clean

setup: $(VENV)/.installed $(SERVE_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	test -x $(SERVE_PY) || python3 -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	$(SERVE_PY) -c "import torch" 2>/dev/null || $(SERVE_PY) -m pip install -q "$(TORCH_SPEC)"
	$(SERVE_PY) -m pip install -q -e ".[serve]"
	touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m cmgnet.demo

# The MLflow UI on the default store (runs/mlflow.db); works without activating the venv.
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --port $(or $(PORT),5000)

bench: setup
	$(PY) benchmarks/model_size.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) .cache runs
