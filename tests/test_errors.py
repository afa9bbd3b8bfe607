"""Every input rule of docs/spec.md section 2, violated once: a clear error, and no kernel runs."""

from __future__ import annotations

import time

import pytest
import torch

import red_kernels
from red_kernels import op

B, T, H = 2, 5, 4


def good() -> dict:
    return dict(hidden=torch.randn(B, T, H), weight=torch.randn(H), bias=0.1,
                attention_mask=torch.ones(B, T, dtype=torch.long), response_start=2, baseline="prompt",
                backend="auto")


def meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# (id, the changed arguments, exception type, words the message must hold)
VIOLATIONS = [
    ("hidden-not-tensor", dict(hidden=[[1.0]]), TypeError, ["hidden", "list"]),
    ("hidden-2d", dict(hidden=torch.randn(B, T)), ValueError, ["hidden", "3 dimensions", "[2, 5]"]),
    ("hidden-int", dict(hidden=torch.ones(B, T, H, dtype=torch.int32)), TypeError, ["hidden", "torch.int32"]),
    ("hidden-f64", dict(hidden=torch.randn(B, T, H, dtype=torch.float64)), TypeError, ["hidden", "float64"]),
    ("hidden-T0", dict(hidden=torch.randn(B, 0, H), attention_mask=torch.ones(B, 0, dtype=torch.long)),
     ValueError, ["hidden", "T >= 1", "[2, 0, 4]"]),
    ("hidden-H0", dict(hidden=torch.randn(B, T, 0), weight=torch.randn(0)), ValueError, ["hidden", "H >= 1"]),
    ("weight-not-tensor", dict(weight=[1.0] * H), TypeError, ["weight", "list"]),
    ("weight-int", dict(weight=torch.ones(H, dtype=torch.long)), TypeError, ["weight", "torch.int64"]),
    ("weight-size", dict(weight=torch.randn(H + 1)), ValueError, ["weight", "[4]", "[5]"]),
    ("weight-column", dict(weight=torch.randn(H, 1)), ValueError, ["weight", "[1, 4]", "[4, 1]"]),
    ("bias-two", dict(bias=torch.randn(2)), ValueError, ["bias", "one element", "[2]"]),
    ("bias-int-tensor", dict(bias=torch.ones(1, dtype=torch.long)), TypeError, ["bias", "torch.int64"]),
    ("bias-str", dict(bias="0.1"), TypeError, ["bias", "str"]),
    ("bias-bool", dict(bias=True), TypeError, ["bias", "bool"]),
    ("mask-not-tensor", dict(attention_mask=[[1] * T] * B), TypeError, ["attention_mask", "list"]),
    ("mask-float", dict(attention_mask=torch.ones(B, T)), TypeError, ["attention_mask", "torch.float32"]),
    ("mask-shape", dict(attention_mask=torch.ones(B, T + 1, dtype=torch.long)), ValueError,
     ["attention_mask", "[2, 5]", "[2, 6]"]),
    ("start-negative", dict(response_start=-1), ValueError, ["response_start", "[0, 5]", "-1"]),
    ("start-past-end", dict(response_start=T + 1), ValueError, ["response_start", "[0, 5]", "6"]),
    ("start-float", dict(response_start=2.0), TypeError, ["response_start", "float"]),
    ("start-bool", dict(response_start=True), TypeError, ["response_start", "bool"]),
    ("start-tensor-shape", dict(response_start=torch.tensor([1, 2, 3])), ValueError, ["response_start", "[2]", "[3]"]),
    ("start-tensor-float", dict(response_start=torch.tensor([1.0, 2.0])), TypeError,
     ["response_start", "torch.float32"]),
    ("weight-device", dict(weight=meta((H,))), ValueError, ["weight is on meta, hidden on cpu"]),
    ("bias-device", dict(bias=meta((1,))), ValueError, ["bias is on meta, hidden on cpu"]),
    ("mask-device", dict(attention_mask=meta((B, T), torch.long)), ValueError,
     ["attention_mask is on meta, hidden on cpu"]),
    ("start-device", dict(response_start=meta((B,), torch.long)), ValueError,
     ["response_start is on meta, hidden on cpu"]),
    ("hidden-sparse", dict(hidden=torch.randn(B, T, H).to_sparse()), TypeError,
     ["hidden", "dense (strided)", "torch.sparse_coo"]),
    ("weight-sparse", dict(weight=torch.randn(H).to_sparse()), TypeError, ["weight", "torch.sparse_coo"]),
    ("bias-sparse", dict(bias=torch.randn(1).to_sparse()), TypeError, ["bias", "torch.sparse_coo"]),
    ("mask-sparse-coo", dict(attention_mask=torch.ones(B, T, dtype=torch.long).to_sparse()), TypeError,
     ["attention_mask", "torch.sparse_coo"]),
    ("mask-sparse-csr", dict(attention_mask=torch.ones(B, T).to_sparse_csr()), TypeError,
     ["attention_mask", "torch.sparse_csr"]),
    ("start-sparse", dict(response_start=torch.tensor([1, 2]).to_sparse()), TypeError,
     ["response_start", "torch.sparse_coo"]),
    ("hidden-nested", dict(hidden=torch.nested.nested_tensor([torch.randn(T, H), torch.randn(T - 1, H)])),
     TypeError, ["hidden", "nested tensor"]),
    ("hidden-device", dict(hidden=meta((B, T, H))), ValueError,
     ["weight is on cpu, hidden on meta", "all tensors must be on one device"]),
    ("baseline", dict(baseline="mean"), ValueError, ["baseline", "'prompt'", "'mean'"]),
    ("backend-unknown", dict(backend="tpu"), ValueError, ["backend", "'cuda'", "'tpu'"]),
    ("backend-not-usable", dict(backend="cuda"), ValueError, ["backend", "'cuda'", "usable", "'eager'"]),
]


@pytest.fixture
def no_kernel_runs(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("a kernel ran on input that should have been rejected")

    monkeypatch.setattr(op, "_launch", launch)


@pytest.mark.parametrize("changes,error,words", [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_rejected_before_any_kernel(changes, error, words, no_kernel_runs) -> None:
    kwargs = {**good(), **changes}
    hidden, weight, bias = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(error) as raised:
        red_kernels.redistribute(hidden, weight, bias, **kwargs)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} missing from the error message: {message}"


def test_good_inputs_reach_a_kernel(no_kernel_runs) -> None:
    """The fixture above is live: valid input does reach _launch."""
    kwargs = good()
    hidden, weight, bias = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(AssertionError, match="a kernel ran"):
        red_kernels.redistribute(hidden, weight, bias, **kwargs)


def test_direct_op_call_checks_layout() -> None:
    """The C++ op guards its own preconditions when called without the Python wrapper."""
    if "cpu" not in red_kernels.available_backends("cpu"):
        pytest.skip("the C++ extension is not built in this environment")
    hidden = torch.randn(B, T, H)
    mask = torch.ones(B, T, dtype=torch.uint8)
    start = torch.zeros(B, dtype=torch.long)
    with pytest.raises(RuntimeError, match="weight: expected contiguous float32"):
        torch.ops.red_kernels.redistribute(hidden, torch.randn(H, dtype=torch.float64), None, mask, start, False)
    with pytest.raises(RuntimeError, match="mask: expected contiguous uint8"):
        torch.ops.red_kernels.redistribute(hidden, torch.randn(H), None, mask.long(), start, False)


@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "attention_mask", "response_start"])
def test_messages_show_a_short_preview_not_the_whole_object(name, no_kernel_runs) -> None:
    """A large Python list as an argument: its type and a cut preview, not a megabyte of repr."""
    big = [[[0.5] * 512 for _ in range(256)] for _ in range(4)]
    kwargs = {**good(), name: big}
    hidden, weight, bias = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("bias")
    started = time.perf_counter()
    with pytest.raises(TypeError) as raised:
        red_kernels.redistribute(hidden, weight, bias, **kwargs)
    elapsed = time.perf_counter() - started
    message = str(raised.value)
    assert message.startswith(f"{name}: ") and "list [[[0.5, 0.5, 0.5, 0.5, ...], [0.5, " in message, message
    assert len(message) < 400 and elapsed < 0.05, (len(message), elapsed)


def test_a_broken_repr_does_not_hide_the_error(no_kernel_runs) -> None:
    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")

    with pytest.raises(TypeError, match=r"hidden: expected a tensor \[B, T, H\], got Broken <"):
        red_kernels.redistribute(Broken(), torch.randn(H), attention_mask=torch.ones(B, T), response_start=0)


def test_long_strings_are_cut(no_kernel_runs) -> None:
    with pytest.raises(ValueError) as raised:
        red_kernels.redistribute(torch.randn(B, T, H), torch.randn(H), response_start=0, baseline="x" * 100_000,
                                 attention_mask=torch.ones(B, T, dtype=torch.long))
    assert len(str(raised.value)) < 300
