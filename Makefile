# The two commands a fresh machine needs: `make test` and `make bench` (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Tests run on the CPU: Triton kernels through its interpreter, at small shapes.
TEST_ENV := TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=
PYTEST_ARGS ?= -n 2 -q

.PHONY: install test bench bench-pytest gpu-check clean

# torch first (the CUDA extension's build imports it), then the package and its test tools.
# --no-build-isolation builds with this environment's setuptools: editable wheels need >= 70.1
# (a venv's bundled 65.x has no bdist_wheel; installing torch upgrades it, an existing torch not).
install:
	$(PIP) install "setuptools>=70.1"
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.6" "torchvision"
	$(PYTHON) -c "import torchvision" 2>/dev/null || $(PIP) install "torchvision"
	$(PIP) install --no-build-isolation -e ".[test,bench]"

test: install
	$(TEST_ENV) $(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m convlora_kernels.bench

bench-pytest: install
	$(PYTHON) -m pytest benchmarks

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info convlora_kernels/*.so .pytest_cache
