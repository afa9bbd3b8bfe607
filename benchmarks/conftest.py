"""pytest-benchmark set-up of the CPU op benchmarks.

    pytest benchmarks --benchmark-only --benchmark-autosave  # B=8, T=1024, H=2048 (what `make bench` runs),
                                                             # saved under benchmarks/results/pytest
    pytest benchmarks --benchmark-only --benchmark-compare   # against the newest saved run
    pytest benchmarks --benchmark-only --bench-shape 8 2048 4096
    pytest benchmarks --benchmark-disable --bench-quick    # CI: each provider once, at a small shape, checked
                                                           # against the float64 spec (what `make test` runs)
"""

from __future__ import annotations

from pathlib import Path

import pytest

import red_kernels

# Saved runs (--benchmark-autosave / --benchmark-save NAME) go here unless --benchmark-storage says otherwise,
# so `--benchmark-compare` and report.py find them wherever pytest was started.
STORAGE = Path(__file__).resolve().parent / "results" / "pytest"

DEFAULT_SHAPE = (8, 1024, 2048)
QUICK_SHAPE = (2, 48, 136)  # H = 8 * 16 + 8: the SIMD body and its scalar tail


def pytest_addoption(parser):
    group = parser.getgroup("red-kernels benchmarks")
    group.addoption("--bench-shape", type=int, nargs=3, metavar=("B", "T", "H"), default=None,
                    help=f"the op's shape (default {DEFAULT_SHAPE})")
    group.addoption("--bench-quick", action="store_true",
                    help=f"one small shape {QUICK_SHAPE}, for CI with --benchmark-disable")


def pytest_configure(config):
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":  # pytest-benchmark's default
        config.option.benchmark_storage = f"file://{STORAGE}"


@pytest.fixture(scope="session")
def shape(pytestconfig) -> tuple[int, int, int]:
    if "cpu" not in red_kernels.available_backends("cpu"):
        pytest.fail("the C++ extension is not built (run `make install`): the benchmarks need backend='cpu'")
    chosen = pytestconfig.getoption("--bench-shape")
    if chosen is not None and pytestconfig.getoption("--bench-quick"):
        raise pytest.UsageError("--bench-shape and --bench-quick: give one of them, not both")
    if pytestconfig.getoption("--bench-quick"):
        return QUICK_SHAPE
    return tuple(chosen) if chosen is not None else DEFAULT_SHAPE
