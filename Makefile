# Fresh machine:  make demo   (end-to-end demo on synthetic data)   |   make test   (the test suite, as CI runs it)
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first so that nothing below replaces it; torchvision is pinned to the release that matches it,
# or timm would pull a newer torch with GBs of CUDA. Override both together, as torchvision 0.28.0 requires exactly
# torch 2.13.0:
#   make test TORCH="torch==2.15.0" TORCHVISION="torchvision==0.29.2"
# TORCH_PIP_ARGS picks where torch comes from, e.g. the CPU build on a CPU-only Linux machine (PyPI's is the CUDA one):
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH          ?= torch==2.13.0
TORCHVISION    ?= torchvision==0.28.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
# test worker processes; one module runs in one worker (its module-scoped fixtures are built once)
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test]" "$(TORCHVISION)"
	$(PY) -m nnunetv2_cipa.torchvision_fix install
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/python -m pytest $(XDIST) -ra --durations=15 tests

test-fast: setup
	$(VENV)/bin/python -m pytest $(XDIST) -ra -m "not slow" tests

demo: setup
	$(VENV)/bin/nnunetv2_cipa demo

bench: setup
	$(PY) benchmarks/bench_scan.py
	$(PY) benchmarks/bench_network.py
	$(PY) benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
