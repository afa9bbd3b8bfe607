"""Shared fixtures: NaN-poisoned outputs and the backends under test in this process.

The suite runs twice (see the Makefile): once normally, for every backend but Triton, and
once with TRITON_INTERPRET=1 set before anything imports triton, for Triton alone.
"""

from __future__ import annotations

import os

import pytest
import torch

import red_kernels

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_backends(varlen: bool = False) -> list[str]:
    """Backends this pytest process checks on CPU tensors (``varlen``: for redistribute_varlen)."""
    usable = red_kernels.available_backends("cpu", varlen=varlen)
    if TRITON_INTERPRET:
        return [name for name in usable if name == "triton"]
    return [name for name in usable if name != "triton"]


def fused_cpu_backends(varlen: bool = False) -> list[str]:
    return [name for name in cpu_backends(varlen) if name != "eager"]


def cpu_isas() -> list[str]:
    """The SIMD paths of the C++ CPU kernel this CPU can run (its best one and every narrower one); none
    without the kernel."""
    if "cpu" not in red_kernels.available_backends("cpu") or red_kernels._library._C is None:
        return []
    from red_kernels import _C

    names = ["scalar", "avx2", "avx512"]
    return names[: names.index(_C.cpu_isa()) + 1]


@pytest.fixture
def pinned_isa(request):
    """The C++ CPU kernel pinned to the instruction set ``request.param`` for one test (parametrise indirectly)."""
    from red_kernels import _C

    before = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)


@pytest.fixture
def poison_empty():
    """Every uninitialised tensor (torch.empty in Python, at::empty in C++) comes out NaN
    (integers: their max value), so an output element a kernel forgets to write fails."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
