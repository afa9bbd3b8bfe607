# red-kernels: `make test` and `make demo` are the two commands a newcomer types.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# One nvcc job takes several GiB; two jobs fit the 2-core, 24 GiB machines we build on.
export MAX_JOBS ?= 2
# Where pip is capped at torch 2.14.1 (its wheel lies on disk), take exactly that; elsewhere any torch >= 2.4.
TORCH_SPEC := $(shell grep -qs 'torch<=2.14.1' /etc/xdg/pip/constraints.txt && echo 'torch==2.14.1' || echo 'torch>=2.4')
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
STAMP := $(VENV)/.installed

.PHONY: install test test-kernels test-triton demo study study-quick bench wheel wheel-check clean

install: $(STAMP)

# Rebuilt only when the build inputs change; otherwise `make install` is a no-op.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# The whole suite: everything on CPU (GPU tests skip without a GPU), then the Triton kernels under
# the Triton interpreter in a process of their own (TRITON_INTERPRET must be set before triton loads).
test: test-kernels test-triton

test-kernels: install
	RED_KERNELS_EXPECT_EXTENSION=1 $(PY) -m pytest tests -q -p no:cacheprovider

test-triton: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider -k triton -m "not gpu"

demo: install
	$(BIN)/red-ppo demo

# RED's gain against the reward's token-credit fidelity (runs/study; --quick: fewer levels, seeds, steps).
study: install
	$(BIN)/red-ppo study

study-quick: install
	$(BIN)/red-ppo study --quick

bench: install
	$(PY) benchmarks/bench_op_cpu.py
	$(PY) benchmarks/bench_grad_cpu.py
	$(PY) benchmarks/bench_reward_step.py

# A wheel of the compiled extension, as a user installs it.
wheel: install
	rm -rf dist
	$(PY) -m pip wheel -q --no-build-isolation --no-deps . -w dist

# Install that wheel into a throwaway venv that borrows this venv's torch, and call the op from
# outside the source tree: a missing _C, package directory or data file fails here.
wheel-check: wheel
	$(PY) scripts/check_wheel.py dist

clean:
	rm -rf build dist *.egg-info red_kernels/*.so $(STAMP)
