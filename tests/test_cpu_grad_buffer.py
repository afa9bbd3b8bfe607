"""grad_hidden of the C++ backward at sizes of 4 MiB and more, where it is a buffer of its own mapped with
madvise(MADV_HUGEPAGE) (csrc/redistribute_cpu.cpp, empty_gradient_buffer): the values on every SIMD path,
the huge pages, and the memory going back when the tensor dies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import red_kernels
from cases import Case, assert_gradients_match, make_inputs, upstream_gradients, weighted_loss
from conftest import TRITON_INTERPRET, cpu_isas

pytestmark = [
    pytest.mark.skipif(TRITON_INTERPRET, reason="C++ kernel: normal process"),
    pytest.mark.skipif("cpu" not in red_kernels.available_backends("cpu"), reason="the C++ extension is not built"),
]

MiB = 1 << 20
# grad_hidden is 4.5 MiB in each (the buffer of its own starts at 4 MiB); H = 8192 is a whole number of vectors,
# the tails are covered by tests/test_op.py and tests/test_grad.py at smaller sizes
LARGE = {"f32": Case(2, 72, 8192, padding="both", start="tensor", bias="tensor", seed=31),
         "bf16": Case(2, 144, 8192, dtype="bf16", padding="holey", start="tensor", bias="tensor", seed=32),
         "f16": Case(2, 144, 8192, dtype="f16", padding="right", start="tensor", seed=33)}


def _large_grad_hidden(dtype: str) -> torch.Tensor:
    inputs = make_inputs(LARGE[dtype])
    hidden = inputs["hidden"].detach().requires_grad_()
    out = red_kernels.redistribute(hidden, inputs["weight"], inputs["bias"], attention_mask=inputs["attention_mask"],
                                   response_start=inputs["response_start"], baseline=inputs["baseline"], backend="cpu")
    (grad,) = torch.autograd.grad(weighted_loss(out, upstream_gradients(*hidden.shape[:2], seed=5)), hidden)
    assert grad.numel() * grad.element_size() >= 4 * MiB
    return grad


def _mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry holding ``address``: its range and its fields in kB; None if none holds it."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: "low-high perms offset dev inode [path]"
            if entry is not None:
                return entry
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                entry = {"range": (low, high)}
        elif entry is not None and len(fields) >= 2 and fields[1].isdigit():
            entry[fields[0][:-1]] = int(fields[1])
    return entry


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pinned_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", list(LARGE))
def test_large_gradients_match_the_float64_reference(dtype, pinned_isa, threads, poison_empty):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_gradients_match(LARGE[dtype], "cpu")
    finally:
        torch.set_num_threads(before)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_large_grad_hidden_lies_in_huge_pages():
    grad = _large_grad_hidden("f32")
    mapping = _mapping_of(grad.data_ptr())
    assert mapping is not None, "grad_hidden's address is in no mapping of /proc/self/smaps"
    bytes_ = grad.numel() * grad.element_size()
    # Every whole 2 MiB page of the buffer; the kernel may fall back to 4 KiB pages when none is free.
    assert mapping.get("AnonHugePages", 0) * 1024 >= (bytes_ // (2 * MiB)) * 2 * MiB, mapping


def test_large_grad_hidden_accumulates_and_its_memory_goes_back():
    inputs = make_inputs(LARGE["f32"])
    hidden = inputs["hidden"].detach().requires_grad_()
    upstream = upstream_gradients(*hidden.shape[:2], seed=6)

    def backward():
        out = red_kernels.redistribute(hidden, inputs["weight"], inputs["bias"],
                                       attention_mask=inputs["attention_mask"],
                                       response_start=inputs["response_start"], backend="cpu")
        weighted_loss(out, upstream).backward()

    backward()
    once = hidden.grad.clone()
    address = hidden.grad.data_ptr()
    backward()  # accumulates into the first call's buffer
    torch.testing.assert_close(hidden.grad, 2 * once, rtol=0, atol=0)
    assert hidden.grad.data_ptr() == address
    assert _mapping_of(address) is not None
    hidden.grad = None
    assert _mapping_of(address) is None, "grad_hidden's buffer was not unmapped when the tensor died"
