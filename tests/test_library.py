"""The op as PyTorch sees it: schema, fake (meta) kernels, autograd registration, torch.compile,
and what the build reports about itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import red_kernels
from cases import Case, make_inputs, op_pair
from conftest import TRITON_INTERPRET, fused_cpu_backends

FUSED = fused_cpu_backends()


def _op_args(case: Case, requires_grad: bool, with_bias: bool = True):
    inputs = make_inputs(case)
    B = case.B
    hidden = inputs["hidden"].detach().requires_grad_(requires_grad)
    weight = inputs["weight"].detach().requires_grad_(requires_grad)
    bias = torch.randn(1, requires_grad=requires_grad) if with_bias else None
    mask = (inputs["attention_mask"] != 0).to(torch.uint8)
    start = torch.randint(-2, case.T + 3, (B,))
    return hidden, weight, bias, mask, start, case.baseline == "zero"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_opcheck(backend: str, requires_grad: bool, with_bias: bool, dtype: str) -> None:
    """torch.library.opcheck: schema, fake tensor, autograd registration, AOT dispatch."""
    case = Case(3, 11, 9, dtype=dtype, padding="both", baseline="zero", seed=31)
    torch.library.opcheck(op_pair(backend)[0], _op_args(case, requires_grad, with_bias))


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_backward_op(backend: str) -> None:
    hidden, weight, _, mask, start, baseline_zero = _op_args(Case(2, 7, 5, seed=32), False)
    forward, backward = op_pair(backend)
    last_index = forward(hidden, weight, None, mask, start, baseline_zero)[3]
    args = (torch.randn(2, 7), torch.randn(2), torch.randn(2, 7), hidden, weight, mask, start, last_index,
            baseline_zero, [True, True, True])
    torch.library.opcheck(backward, args)


@pytest.mark.parametrize("backend", FUSED)
def test_meta_tensors(backend: str) -> None:
    B, T, H = 4, 13, 8
    meta = dict(device="meta")
    forward = op_pair(backend)[0]
    outputs = forward(torch.empty(B, T, H, dtype=torch.bfloat16, **meta), torch.empty(H, **meta), None,
                      torch.empty(B, T, dtype=torch.uint8, **meta), torch.empty(B, dtype=torch.long, **meta), False)
    assert [tuple(o.shape) for o in outputs] == [(B, T), (B,), (B, T), (B,)]
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32, torch.float32, torch.int64]


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend: str) -> None:
    """The public function traces into one graph (fake kernels, no graph break) and matches eager."""
    inputs = make_inputs(Case(3, 12, 16, padding="left", start="tensor", seed=33))
    hidden = inputs["hidden"]
    weight = inputs["weight"].requires_grad_()

    def step(hidden, weight, mask, start):
        out = red_kernels.redistribute(hidden, weight, 0.1, attention_mask=mask, response_start=start,
                                       backend=backend)
        return out.token_rewards.sum() + out.rewards.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, inputs["attention_mask"], inputs["response_start"])
    (grad,) = torch.autograd.grad(loss, weight)
    expected_loss = step(hidden, weight, inputs["attention_mask"], inputs["response_start"])
    (expected_grad,) = torch.autograd.grad(expected_loss, weight)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.skipif(TRITON_INTERPRET, reason="build checks run in the normal process")
def test_build_info() -> None:
    info = red_kernels.build_info()
    assert set(info) == {"version", "torch", "cuda", "cuda_arch_list", "cpu_kernel", "triton"}
    assert info["version"] == red_kernels.__version__ and info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["cpu_kernel"], bool)
    assert isinstance(info["cuda_arch_list"], list)
    assert info["triton"] is None or isinstance(info["triton"], str)
    if os.environ.get("RED_KERNELS_EXPECT_EXTENSION") == "1":  # set by `make test`
        assert info["cpu_kernel"], f"the C++ extension did not load: {red_kernels._library.EXTENSION_ERROR}"
        assert "cpu" in red_kernels.available_backends("cpu")
        assert "cpu" in red_kernels.available_backends("cpu", varlen=True)


@pytest.mark.skipif(TRITON_INTERPRET, reason="checks the normal process")
def test_available_backends() -> None:
    cpu = red_kernels.available_backends("cpu")
    assert cpu[0] == "eager" and set(cpu) <= {"eager", "cpu"}  # triton on CPU only under the interpreter
    cuda = red_kernels.available_backends(torch.device("cuda"))
    assert "cpu" not in cuda and ("cuda" in cuda) == red_kernels.build_info()["cuda"]
    assert ("triton" in cuda) == (red_kernels.build_info()["triton"] is not None)
    assert red_kernels.available_backends("meta") == ("eager",)
    # One translation unit registers the CPU kernels of both ops: they come together or not at all.
    assert red_kernels.available_backends("cpu", varlen=True) == cpu


def test_triton_interpreter_makes_triton_usable_on_cpu() -> None:
    """docs/spec.md: TRITON_INTERPRET=1 set before the import lists triton for CPU tensors."""
    if red_kernels.build_info()["triton"] is None:
        pytest.skip("triton is not installed")
    code = "import red_kernels; print(','.join(red_kernels.available_backends('cpu')))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    listed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "triton" in listed.stdout.strip().split(",")
