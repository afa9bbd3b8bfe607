"""The Triton kernels compiled for real GPUs (sm_90, and sm_80 once), without one, and what came out.

Each variant is the launch the host function makes (`triton_kernels.forward_launches` /
`backward_launches` on tensors of that shape, H100's 132 SMs), bound by the JIT's own binder, so
the compile sees the JIT's specialisation: 16-byte alignment and divisibility hints, ints equal to 1
as constants. The assertions are on the cubin and its SASS (benchmarks/triton_lowering.py): registers
under a cap, no spills, 16-byte cp.async (LDGSTS.E.BYPASS.128) in the main loop where the rows are
aligned, no shuffles (cross-lane reductions) and at most two barriers per iteration of that loop.
The packed (redistribute_varlen) variants are the same kernels with PACKED set, checked the same way.
About 60 compiles for the padded variants and 75 for the packed ones with Triton's bundled ptxas.
`make test` runs this file twice: under the venv's Triton, and under Triton 3.6 (what torch 2.11 installs,
and the lent GPU machine has; `make test-lowering-compat`, which first checks that 3.6 is the one loaded).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_INTERPRET

pytestmark = pytest.mark.skipif(TRITON_INTERPRET, reason="compiles @triton.jit kernels, not interpreted ones")
triton = pytest.importorskip("triton")

from red_kernels import triton_kernels as tk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from triton_lowering import compile_launch  # noqa: E402

H100_SMS = 132
# Stated caps: 168 registers keeps >= 3 four-warp programs per SM (65536 / (168 * 128)).
REGISTER_CAP = 168
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# (B, T, H, element offset of hidden's start): BLOCK_T 32, 8 and 1 from the row count; T = 1; H = 1;
# H % 16 != 0 (4095; 4104 is a multiple of 8 only, which the JIT does not see as aligned); a misaligned start.
SHAPES = {"B32-T4096-H4096": (32, 4096, 4096, 0), "B8-T1024-H4096": (8, 1024, 4096, 0),
          "B1-T1-H4096": (1, 1, 4096, 0), "B4-T63-H1": (4, 63, 1, 0), "B8-T1024-H4095": (8, 1024, 4095, 0),
          "B8-T1024-H4104": (8, 1024, 4104, 0),
          "B8-T1024-H2048-offset1": (8, 1024, 2048, 1)}


def _hidden(B, T, H, dtype, offset):
    # torch.empty touches no pages: these tensors only carry shapes, strides and alignment.
    return torch.empty(B * T * H + offset, dtype=dtype)[offset:].view(B, T, H)




@functools.cache
def _forward(shape: str, dtype: str, bias: bool, arch: int = 90):
    B, T, H, offset = SHAPES[shape]
    hidden = _hidden(B, T, H, DTYPES[dtype], offset)
    outputs = (torch.empty(B, T), torch.empty(B), torch.empty(B, T), torch.empty(B, dtype=torch.int64))
    launches = tk.forward_launches(hidden, torch.empty(H), torch.empty(1) if bias else None,
                                   torch.empty(B, T, dtype=torch.uint8), torch.empty(B, dtype=torch.int64),
                                   not bias, outputs, H100_SMS)
    return [(launch, compile_launch(launch, arch)) for launch in launches]


@functools.cache
def _backward(shape: str, dtype: str, need: tuple, arch: int = 90):
    B, T, H, offset = SHAPES[shape]
    hidden = _hidden(B, T, H, DTYPES[dtype], offset)
    rows = tk.backward_partial_rows(hidden, H100_SMS)
    outputs = (torch.empty_like(hidden), torch.empty(rows, H), torch.empty(rows))
    launches = tk.backward_launches((torch.empty(B, T), torch.empty(B), torch.empty(B, T)), hidden, torch.empty(H),
                                    torch.empty(B, T, dtype=torch.uint8), torch.empty(B, dtype=torch.int64),
                                    torch.empty(B, dtype=torch.int64), need[0], need, outputs, H100_SMS)
    (launch,) = launches
    return launch, compile_launch(launch, arch)


def _aligned(shape: str) -> bool:
    B, T, H, offset = SHAPES[shape]
    return offset == 0 and H % 16 == 0


def _check_common(lowered, where: str) -> None:
    assert not lowered.spills, f"{where}: {lowered.stack_bytes} B stack / {lowered.local_bytes} B local (spills)"
    assert lowered.registers <= REGISTER_CAP, f"{where}: {lowered.registers} registers > cap {REGISTER_CAP}"


def _check_main_loop(lowered, launch, where: str, aligned: bool, H: int) -> None:
    one_trip = (H <= launch.constexprs["BLOCK_H"] if launch.kernel is tk._scores_kernel
                else launch.args[14] <= launch.constexprs["BLOCK_T"])  # args[14]: rows_per_run
    if one_trip:
        return  # the loop runs once and the compiler folds it away
    assert lowered.loop, f"{where}: no loop found in the SASS"
    assert lowered.count("SHFL") == 0, f"{where}: cross-lane shuffles inside the main loop"
    assert lowered.count("BAR.SYNC") <= 2, f"{where}: {lowered.count('BAR.SYNC')} barriers per iteration"
    if aligned:
        assert lowered.count("LDGSTS.E.BYPASS.128") > 0, f"{where}: no 16-byte cp.async in the main loop"
        assert "cp.async" in lowered.ptx


def _forward_variants():
    # Every shape in bf16 and f32 with a bias; f16 and the no-bias variant at the main shape and T = 1.
    for shape in SHAPES:
        for dtype in ("bf16", "f32"):
            yield shape, dtype, True
    for shape in ("B8-T1024-H4096", "B1-T1-H4096"):
        yield shape, "f16", True
        yield shape, "bf16", False


@pytest.mark.parametrize("shape,dtype,bias", list(_forward_variants()),
                         ids=[f"{s}-{d}-{'bias' if b else 'nobias'}" for s, d, b in _forward_variants()])
def test_forward_lowering(shape: str, dtype: str, bias: bool) -> None:
    (scores, scores_low), (scan, scan_low) = _forward(shape, dtype, bias)
    where = f"forward {shape} {dtype} BLOCK_T={scores.constexprs['BLOCK_T']} BLOCK_H={scores.constexprs['BLOCK_H']}"
    _check_common(scores_low, where)
    _check_main_loop(scores_low, scores, where, _aligned(shape), SHAPES[shape][2])
    _check_common(scan_low, "token rewards " + where)


NEEDS = {"all": (True, True, True), "weight": (False, True, False), "hidden": (True, False, False)}


def _backward_variants():
    # Every shape in bf16 and f32 with every gradient; f16, and grad_weight or grad_hidden alone, at the main shape.
    for shape in SHAPES:
        for dtype in ("bf16", "f32"):
            yield shape, dtype, "all"
    yield "B8-T1024-H4096", "f16", "all"
    for dtype in ("bf16", "f32"):
        yield "B8-T1024-H4096", dtype, "weight"
        yield "B8-T1024-H4096", dtype, "hidden"


@pytest.mark.parametrize("shape,dtype,need", list(_backward_variants()),
                         ids=["-".join(v) for v in _backward_variants()])
def test_backward_lowering(shape: str, dtype: str, need: str) -> None:
    launch, lowered = _backward(shape, dtype, NEEDS[need])
    where = f"backward {shape} {dtype} {need} BLOCK_T={launch.constexprs['BLOCK_T']} BLOCK_H={launch.constexprs['BLOCK_H']}"
    assert launch.constexprs["BLOCK_T"] >= 16
    _check_common(lowered, where)
    aligned = _aligned(shape)
    if NEEDS[need][1]:  # hidden is read: pipelined
        _check_main_loop(lowered, launch, where, aligned, SHAPES[shape][2])
    if aligned:  # the grid is sized for one wave of this many programs per SM
        assert lowered.resident_per_sm() >= tk._BACKWARD_PROGRAMS_PER_SM, f"{where}: {lowered.resident_per_sm()} fit"
    if NEEDS[need][0] and aligned and SHAPES[shape][2] > 1:
        assert lowered.count("STG.E.128", where="kernel") > 0, f"{where}: grad_hidden stores are not 128-bit"


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_forward_picks_enough_programs_in_one_wave(dtype: str) -> None:
    """At B=8, T=1024 the forward launches >= 4 programs per SM (was 256 programs at BLOCK_T = 32), all
    resident at once."""
    (scores, lowered), _ = _forward("B8-T1024-H4096", dtype, True)
    assert 4 * H100_SMS <= scores.grid[0] <= lowered.resident_per_sm() * H100_SMS


def test_backward_partial_is_small() -> None:
    """The float32 grad_weight partial is ~4 programs per SM, not one row per 32 positions (was 128 MiB at
    32x4096x8192)."""
    rows = tk.backward_partial_rows(_hidden(32, 4096, 8192, torch.bfloat16, 0), H100_SMS)
    assert rows * 8192 * 4 <= 4 * 2**20, rows


def test_sm80_lowering() -> None:
    (scores, low), _ = _forward("B8-T1024-H4096", "bf16", True, 80)
    _check_common(low, "forward sm80")
    _check_main_loop(low, scores, "forward sm80", True, 4096)
    launch, low = _backward("B8-T1024-H4096", "bf16", (True, True, True), 80)
    _check_common(low, "backward sm80")
    _check_main_loop(low, launch, "backward sm80", True, 4096)


def test_detectors_fire_on_planted_regressions() -> None:
    """The same checks see an unpipelined loop (NUM_STAGES=1: plain 128-bit loads, no cp.async) and a
    spilling backward (registers capped at 64 with maxnreg)."""
    import dataclasses

    (scores, _), _ = _forward("B8-T1024-H4096", "bf16", True)
    flat = compile_launch(dataclasses.replace(scores, constexprs={**scores.constexprs, "NUM_STAGES": 1}))
    assert flat.count("LDGSTS") == 0 and flat.count("LDG.E.128") > 0
    launch, _ = _backward("B8-T1024-H4096", "bf16", (True, True, True))
    assert compile_launch(launch, maxnreg=64).spills


# ---------------------------------------------------------------------------------------
# Packed sequences (redistribute_varlen): the same kernels with PACKED set. (T_local, N, H, element offset):
# BLOCK_T 32 and 8 from the token count; one token; H = 1; H % 16 != 0; a misaligned start; and 5000 sequences,
# a 13-step search over cu_seqlens.
VARLEN_SHAPES = {"T32768-N32-H4096": (32768, 32, 4096, 0), "T8192-N8-H4096": (8192, 8, 4096, 0),
                 "T1-N1-H4096": (1, 1, 4096, 0), "T252-N4-H1": (252, 4, 1, 0), "T8192-N8-H4095": (8192, 8, 4095, 0),
                 "T8192-N8-H2048-offset1": (8192, 8, 2048, 1), "T8192-N5000-H4096": (8192, 5000, 4096, 0)}


def _packed(shape: str, dtype: str):
    T, N, H, offset = VARLEN_SHAPES[shape]
    hidden = torch.empty(T * H + offset, dtype=DTYPES[dtype])[offset:].view(T, H)
    return hidden, torch.empty(N + 1, dtype=torch.int64), torch.empty(N, dtype=torch.int64), \
        torch.empty(N, dtype=torch.int64)


@functools.cache
def _varlen_forward(shape: str, dtype: str, bias: bool):
    hidden, cu, lens, start = _packed(shape, dtype)
    (T, H), N = hidden.shape, lens.shape[0]
    outputs = (torch.empty(T), torch.empty(N), torch.empty(T), torch.empty(N, dtype=torch.int64))
    # With a bias: carried baselines and baseline="prompt"; without: neither, baseline="zero".
    launches = tk.varlen_forward_launches(hidden, torch.empty(H), torch.empty(1) if bias else None, cu, lens, start,
                                          torch.empty(N) if bias else None, not bias, outputs, H100_SMS)
    return [(launch, compile_launch(launch)) for launch in launches]


@functools.cache
def _varlen_backward(shape: str, dtype: str, need: tuple):
    hidden, cu, lens, start = _packed(shape, dtype)
    (T, H), N = hidden.shape, lens.shape[0]
    rows = tk.varlen_backward_partial_rows(hidden, H100_SMS)
    outputs = (torch.empty_like(hidden), torch.empty(rows, H), torch.empty(rows))
    launches = tk.varlen_backward_launches((torch.empty(T), torch.empty(N), torch.empty(T)), hidden, torch.empty(H),
                                           cu, lens, start, torch.empty(N, dtype=torch.int64), need[0], need, outputs,
                                           (torch.empty(T, dtype=torch.uint8), torch.empty(T)), H100_SMS)
    return [(launch, compile_launch(launch)) for launch in launches]


def _varlen_aligned(shape: str) -> bool:
    T, N, H, offset = VARLEN_SHAPES[shape]
    return offset == 0 and H % 16 == 0


def _varlen_forward_variants():
    for shape in VARLEN_SHAPES:
        for dtype in ("bf16", "f32"):
            yield shape, dtype, True
    for shape in ("T8192-N8-H4096", "T1-N1-H4096"):
        yield shape, "f16", True
        yield shape, "bf16", False


@pytest.mark.parametrize("shape,dtype,bias", list(_varlen_forward_variants()),
                         ids=[f"{s}-{d}-{'bias' if b else 'nobias'}" for s, d, b in _varlen_forward_variants()])
def test_varlen_forward_lowering(shape: str, dtype: str, bias: bool) -> None:
    (scores, scores_low), (scan, scan_low) = _varlen_forward(shape, dtype, bias)
    assert scores.kernel is tk._scores_kernel and scores.constexprs["PACKED"]
    where = (f"varlen forward {shape} {dtype} BLOCK_T={scores.constexprs['BLOCK_T']} "
             f"BLOCK_H={scores.constexprs['BLOCK_H']}")
    _check_common(scores_low, where)
    _check_main_loop(scores_low, scores, where, _varlen_aligned(shape), VARLEN_SHAPES[shape][2])
    _check_common(scan_low, "token rewards " + where)


def _varlen_backward_variants():
    for shape in VARLEN_SHAPES:
        for dtype in ("bf16", "f32"):
            yield shape, dtype, "all"
    yield "T8192-N8-H4096", "f16", "all"
    for dtype in ("bf16", "f32"):
        yield "T8192-N8-H4096", dtype, "weight"
        yield "T8192-N8-H4096", dtype, "hidden"


@pytest.mark.parametrize("shape,dtype,need", list(_varlen_backward_variants()),
                         ids=["-".join(v) for v in _varlen_backward_variants()])
def test_varlen_backward_lowering(shape: str, dtype: str, need: str) -> None:
    (gradient, gradient_low), (launch, lowered) = _varlen_backward(shape, dtype, NEEDS[need])
    assert launch.kernel is tk._backward_kernel and launch.constexprs["PACKED"]
    where = (f"varlen backward {shape} {dtype} {need} BLOCK_T={launch.constexprs['BLOCK_T']} "
             f"BLOCK_H={launch.constexprs['BLOCK_H']}")
    assert launch.constexprs["BLOCK_T"] >= 16
    _check_common(gradient_low, "score gradient " + where)
    _check_common(lowered, where)
    aligned = _varlen_aligned(shape)
    if NEEDS[need][1]:  # hidden is read: pipelined
        _check_main_loop(lowered, launch, where, aligned, VARLEN_SHAPES[shape][2])
    if aligned:  # the grid is sized for one wave of this many programs per SM
        assert lowered.resident_per_sm() >= tk._BACKWARD_PROGRAMS_PER_SM, f"{where}: {lowered.resident_per_sm()} fit"
    if NEEDS[need][0] and aligned and VARLEN_SHAPES[shape][2] > 1:
        assert lowered.count("STG.E.128", where="kernel") > 0, f"{where}: grad_hidden stores are not 128-bit"


def test_varlen_backward_loop_is_the_padded_one() -> None:
    """The packed backward's main loop reads a precomputed mask and score gradient, so it is as flat as the padded
    loop: no more instructions per iteration than the padded variant of the same tile (the search over cu_seqlens
    inside it spilled 2.3 KB and took 24 barriers per iteration)."""
    (_, _), (launch, packed) = _varlen_backward("T8192-N8-H4096", "bf16", NEEDS["all"])
    padded_launch, padded = _backward("B8-T1024-H4096", "bf16", NEEDS["all"])
    assert launch.constexprs["BLOCK_H"] == padded_launch.constexprs["BLOCK_H"]
    assert len(packed.loop) <= len(padded.loop), (len(packed.loop), len(padded.loop))
