"""The Triton kernels compiled ahead of time for real GPUs (sm_80 and sm_90), without one.

The interpreter run checks what the kernels compute; this checks that the same source lowers
through Triton's GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled
ptxas), so no construct the interpreter accepts but a GPU compile rejects can slip through.
"""

from __future__ import annotations

import itertools

import pytest

from conftest import TRITON_INTERPRET

pytestmark = pytest.mark.skipif(TRITON_INTERPRET, reason="compiles @triton.jit kernels, not interpreted ones")
triton = pytest.importorskip("triton")

DTYPES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def _compile(kernel, pointers: dict, ints: list[str], int_type: str, constexprs: dict, arch: int, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**pointers, **{name: int_type for name in ints}, **{name: "constexpr" for name in constexprs}}
    assert set(signature) == set(kernel.arg_names), "the test's signature no longer matches the kernel"
    source = ASTSource(fn=kernel, signature={name: signature[name] for name in kernel.arg_names},
                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], "no cubin came out"
    assert f".target sm_{arch}" in compiled.asm["ptx"]


def _variants():
    # Every dtype and constexpr flag on sm_90; the bf16 variants on sm_80 too; 64-bit sizes once.
    for dtype, flag in itertools.product(DTYPES, [False, True]):
        yield 90, dtype, flag, "i32"
    yield 80, "bf16", True, "i32"
    yield 80, "bf16", False, "i32"
    yield 90, "bf16", True, "i64"


VARIANTS = list(_variants())
IDS = [f"sm{arch}-{dtype}-{'on' if flag else 'off'}-{ints}" for arch, dtype, flag, ints in VARIANTS]


@pytest.mark.parametrize("arch,dtype,flag,int_type", VARIANTS, ids=IDS)
def test_forward_kernels_lower_to_cubin(arch: int, dtype: str, flag: bool, int_type: str) -> None:
    from red_kernels import triton_kernels as tk

    block_t, block_h, num_warps = tk._block_sizes(1024, 4096)
    bias = {"bias_ptr": "*fp32"} if flag else {}
    _compile(tk._scores_kernel,
             {"hidden_ptr": f"*{DTYPES[dtype]}", "weight_ptr": "*fp32", **bias, "mask_ptr": "*u8",
              "scores_ptr": "*fp32"},
             ["T", "H", "stride_hb", "stride_ht"], int_type,
             {"HAS_BIAS": flag, "BLOCK_T": block_t, "BLOCK_H": block_h, **({} if flag else {"bias_ptr": None})},
             arch, num_warps)
    _compile(tk._token_rewards_kernel,
             {"scores_ptr": "*fp32", "mask_ptr": "*u8", "start_ptr": "*i64", "rewards_ptr": "*fp32",
              "token_rewards_ptr": "*fp32", "last_index_ptr": "*i64"},
             ["T"], int_type, {"BASELINE_ZERO": flag, "BLOCK": 1024}, arch, 4)


@pytest.mark.parametrize("arch,dtype,flag,int_type", VARIANTS, ids=IDS)
def test_backward_kernel_lowers_to_cubin(arch: int, dtype: str, flag: bool, int_type: str) -> None:
    from red_kernels import triton_kernels as tk

    block_t, block_h, num_warps = tk._block_sizes(1024, 4096)
    # flag on: every gradient; off: grad_weight alone (grad_hidden and grad_bias compiled out).
    _compile(tk._backward_kernel,
             {"grad_scores_ptr": "*fp32", "grad_rewards_ptr": "*fp32", "grad_token_ptr": "*fp32",
              "hidden_ptr": f"*{DTYPES[dtype]}", "weight_ptr": "*fp32", "mask_ptr": "*u8", "start_ptr": "*i64",
              "last_index_ptr": "*i64", "grad_hidden_ptr": f"*{DTYPES[dtype]}", "partial_weight_ptr": "*fp32",
              "partial_bias_ptr": "*fp32"},
             ["T", "H", "stride_hb", "stride_ht", "stride_gb", "stride_gt"], int_type,
             {"BASELINE_ZERO": flag, "NEED_HIDDEN": flag, "NEED_WEIGHT": True, "NEED_BIAS": flag,
              "BLOCK_T": block_t, "BLOCK_H": block_h}, arch, num_warps)
