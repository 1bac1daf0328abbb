# The two commands of the README: `make demo` and `make test`. Both set up a project-local .venv first
# (idempotent: a stamp file skips the install when pyproject.toml has not changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mqb-installed
export WANDB_MODE ?= offline

.PHONY: setup demo test test-slow test-all test-gpu lint bench clean

# dynamic-network-architectures (nnU-Net v2's network package) is installed without its dependencies: it asks
# for timm, whose torchvision would replace the CPU torch with a multi-GB CUDA build; PlainConvUNet needs neither.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps dynamic-network-architectures==0.4.4
	$(PY) -m pip install -qq --disable-pip-version-check -e ".[dev,deploy]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m mqb.eval -m experiment=demo

test: setup
	$(PY) -m ruff check mqb tests benchmarks hydra_plugins
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: setup
	$(PY) -m pytest -q -m slow

# On a machine with a CUDA GPU (torch with CUDA installed in .venv or PY=... pointing at one): every
# device-parametrized test's cuda case (engine, formats, granularities, methods, metrics, evaluator, against the
# CPU result), then the headline and the MeshNet real-weights sweeps on the GPU and on the CPU, DSC within 0.002.
test-gpu:
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA GPU visible to torch')"
	$(PY) -m pytest -q -k cuda -m "not slow and not gpu" tests
	$(PY) -m pytest -q -s -m gpu tests

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check mqb tests benchmarks hydra_plugins

bench: setup
	$(PY) benchmarks/quant_overhead.py
	$(PY) benchmarks/eval_overhead.py
	$(PY) benchmarks/sweep_throughput.py
	$(PY) benchmarks/int8_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs multirun
