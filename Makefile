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

.PHONY: install test test-kernels test-triton test-simt test-trl check-setuptools test-gpu demo study study-quick bench wheel wheel-check clean
.PHONY: test-bench test-lowering-compat

install: $(STAMP)

# Rebuilt only when the build inputs change; otherwise `make install` is a no-op.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77" "$(TORCH_SPEC)"  # the minimum setup.py checks; with torch's own pin
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# The whole suite: everything on CPU (GPU tests skip without a GPU), then the Triton kernels under
# the Triton interpreter in a process of their own (TRITON_INTERPRET must be set before triton loads).
test: test-kernels test-triton test-bench test-lowering-compat

test-kernels: install
	RED_KERNELS_EXPECT_EXTENSION=1 $(PY) -m pytest tests -q -p no:cacheprovider

test-triton: install
	TRITON_INTERPRET=1 $(PY) scripts/check_triton_interpreter.py  # fails fast where the interpreter cannot loop
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider -k triton -m "not gpu"

# The Triton kernels' compiled form (tests/test_gpu_lowering.py) once more under an older Triton: 3.6, what
# torch 2.11 installs and what the lent GPU machine runs. Installed beside the venv's own (build/, --no-deps)
# and put first on the path; part of `make test`.
TRITON_COMPAT := 3.6.0
TRITON_COMPAT_DIR := build/triton-$(TRITON_COMPAT)
test-lowering-compat: install
	test -d $(TRITON_COMPAT_DIR)/triton || $(PY) -m pip install -q --no-deps --target $(TRITON_COMPAT_DIR) "triton==$(TRITON_COMPAT)"
	PYTHONPATH=$(CURDIR)/$(TRITON_COMPAT_DIR) $(PY) -c "import triton, sys; \
		sys.exit(0 if triton.__version__ == '$(TRITON_COMPAT)' else f'loaded Triton {triton.__version__}, not $(TRITON_COMPAT)')"
	PYTHONPATH=$(CURDIR)/$(TRITON_COMPAT_DIR) $(PY) -m pytest tests/test_gpu_lowering.py -q -p no:cacheprovider

# The CUDA kernels' own source on the CPU (csrc/simt): the GPU test matrix under ASan + UBSan, a TSan subset,
# and the planted bugs. Part of `make test` (test-kernels); this target runs it alone.
test-simt: install
	$(PY) -m pytest tests/test_simt.py -q -p no:cacheprovider

# TRL 1.12's own PPOTrainer with red_kernels.hf.get_reward swapped in, against the unswapped run, in a venv of
# its own (1.12.0 is the last TRL release with a PPO trainer). It borrows the extension `make install` built in place,
# and .venv's torch (scripts/borrow_torch.py: symlinks, not a second 6 GB CUDA build; a CI machine ran out of disk).
TRL_VENV := .venv-trl
$(TRL_VENV)/.installed: $(STAMP)
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) scripts/borrow_torch.py $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q "$$($(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')" "trl==1.12.0"
	touch $@

# Then red_ppo against TRL's PPOTrainer on the same tiny models in CI's quick mode (benchmarks/bench_ppo_vs_trl.py:
# both run, finite numbers; nothing about speed asserted; docs/benchmarks.md has the full run's numbers).
test-trl: install $(TRL_VENV)/.installed
	PYTHONPATH=$(CURDIR) TRL_EXPERIMENTAL_SILENCE=1 $(TRL_VENV)/bin/python scripts/trl_ppo_swap.py
	$(PY) benchmarks/bench_ppo_vs_trl.py --quick --red-python $(CURDIR)/$(PY) --trl-python $(CURDIR)/$(TRL_VENV)/bin/python

# The metadata builds with the oldest setuptools setup.py accepts (77) and the newest, both with
# --no-build-isolation as above; older ones are refused with a message naming the minimum. And the in-place
# build that `make test-gpu` runs works with setuptools 64, the oldest that the GPU machine's python may hold.
check-setuptools: install
	$(PY) scripts/check_setuptools.py --torch-site "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
		77.0.1 newest --too-old 65.5.0 76.1.0 --inplace-build 64.0.0

# On a GPU machine, with its own python3 (torch, triton, pytest there; no venv, no pip): build the
# extension in place for sm_90, run the GPU tests, the CUDA tests again under compute-sanitizer's
# memcheck, racecheck and synccheck when it is on PATH, the GPU benchmark, red-kernels-check, then a short red_ppo
# run on CUDA (tests/test_ppo_recipe.py -m gpu: the one-GPU recipe with tiny random models, chat prompts, a reward
# model with its own tokenizer, bf16 autocast, checkpointing; 3 steps, no tensorboard or matplotlib needed).
# Sized for one 10-minute run on an H100 (each sanitizer pass is capped at SANITIZE_TIMEOUT seconds).
GPU_PYTHON ?= python3
SANITIZE_TIMEOUT ?= 80
GPU_ENV := PYTHONPATH=$(CURDIR):$(CURDIR)/python RED_KERNELS_EXPECT_EXTENSION=1
test-gpu:
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$${GPU_MAX_JOBS:-16} RED_KERNELS_FORCE_CUDA=1 \
		$(GPU_PYTHON) setup.py -q build_ext --inplace
	$(GPU_ENV) $(GPU_PYTHON) -m pytest tests -q -p no:cacheprovider -m gpu --ignore=tests/test_ppo_recipe.py
	if command -v compute-sanitizer >/dev/null; then \
		for tool in memcheck racecheck synccheck; do \
			echo "compute-sanitizer --tool $$tool"; \
			$(GPU_ENV) timeout $(SANITIZE_TIMEOUT) compute-sanitizer --tool $$tool --error-exitcode 99 \
				$(GPU_PYTHON) -m pytest tests/test_cuda.py -q -p no:cacheprovider -m gpu -x; rc=$$?; \
			if [ $$rc -eq 124 ]; then echo "$$tool: stopped after $(SANITIZE_TIMEOUT) s, no error before"; \
			elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
		done; \
	else echo "compute-sanitizer not on PATH: sanitizer passes skipped"; fi
	$(GPU_ENV) $(GPU_PYTHON) benchmarks/bench_op_gpu.py --B 8 32 --T 1024 --H 2048 8192
	$(GPU_ENV) $(GPU_PYTHON) -m red_kernels.check --devices cuda:0 --bench-seconds 20
	$(GPU_ENV) $(GPU_PYTHON) -m pytest tests/test_ppo_recipe.py -q -p no:cacheprovider -m gpu

demo: install
	$(BIN)/red-ppo demo

# Does RED help with reward models of realistic quality, and with which errors? (runs/study; docs/demo_and_study.md;
# --quick: fewer seeds and levels).
study: install
	$(BIN)/red-ppo study

study-quick: install
	$(BIN)/red-ppo study --quick

# The CPU op benchmarks on pytest-benchmark (saved under benchmarks/results/pytest; BENCH_ARGS adds options,
# e.g. BENCH_ARGS=--benchmark-compare), their ratios, then the reward-step benchmark.
BENCH_ARGS ?=
bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-autosave -p no:cacheprovider $(BENCH_ARGS)
	$(PY) benchmarks/report.py
	$(PY) benchmarks/bench_reward_step.py

# The same suites in CI's quick mode: every provider once at one small shape, checked against the float64
# spec, nothing timed; part of `make test`, so the benchmarks cannot rot.
test-bench: install
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable --bench-quick

# A wheel of the compiled extension, as a user installs it.
wheel: install
	rm -rf dist
	$(PY) -m pip wheel -q --no-build-isolation --no-deps . -w dist

# Install that wheel into a throwaway venv that borrows this venv's torch, and call the op from
# outside the source tree: a missing _C, package directory or data file fails here.
wheel-check: wheel
	$(PY) scripts/check_wheel.py dist

clean:
	rm -rf build dist *.egg-info red_kernels/*.so $(STAMP) $(TRL_VENV)/.installed

# verl 0.9.1 with its own pins (transformers 5.5.3-5.10, tensordict <= 0.10, ray, ...) beside this project's torch
# (borrowed from .venv, as for TRL), in a venv of its own; red_kernels comes from this tree (a .pth file, with the extension `make install` built).
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed
.PHONY: test-verl

$(VERL_STAMP): $(STAMP)
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) scripts/borrow_torch.py $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "verl==0.9.1" "pytest>=8"
	echo "$(CURDIR)" > "$$($(VERL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/red_kernels_source.pth"
	touch $@

# The verl integration against verl itself (tests/verl is not collected where verl is not installed), and the
# alignment under the tokenizers and transformers that verl pins.
test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest tests/verl tests/test_align.py -q -p no:cacheprovider
