"""Drives the host SIMT harness (csrc/simt): the CUDA kernels' own source, compiled as plain C++ and run
on the CPU, one real thread per CUDA thread (csrc/simt/README.md).

`build(variant, mutant)` compiles `redistribute_sim` once per source hash into build/simt/. `forward` and
`backward` take the C++ op's normalised inputs (red_kernels/_library.py documents them), write them to a
directory, run the executable, and read its outputs back; an error the emulator or a sanitizer caught
raises `SimtError` with its report.

`varlen_forward` and `varlen_backward` do the same for `red_kernels::redistribute_varlen` and its backward.

`as_cpu_kernel()` installs the harness as the CPU kernel of the C++ ops (padded and varlen) for the
duration of a `with`, so `red_kernels.redistribute(..., backend="cpu")` (and `redistribute_varlen`) runs
the CUDA kernels through the real public entry point: op.py's checks and normalisation, and the registered
autograd formula. The tests call that backend "cuda_sim" (tests/cases.py).

Variants: "asan" (AddressSanitizer + UndefinedBehaviorSanitizer, the default: the test matrix runs under
it), "tsan" (ThreadSanitizer), "plain".
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = [CSRC / "simt" / "simt.h", CSRC / "simt" / "runner.cpp", CSRC / "cuda" / "redistribute_kernels.cuh",
           CSRC / "red_rule.h"]
BUILD = ROOT / "build" / "simt"
COMMON_FLAGS = ["-std=c++17", "-g", "-pthread", "-DRED_SIMT=1", "-Wall", "-Wextra", "-Werror",
                "-Wno-unknown-pragmas", f"-I{CSRC}"]
VARIANT_FLAGS = {
    "plain": ["-O1"],
    # -fno-sanitize-recover: the first error aborts with its report. "bounds" checks every index into a
    # fixed-size array, so an overrun inside one shared-memory struct is caught too; "alignment" checks
    # every 16-byte Pack / float4 access (x86 would not trap on them).
    "asan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=3",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=3",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=3:report_signal_unsafe=0",
}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The SM count the backward's launch plan sizes its row chunks for (redistribute.cu asks the device):
# an H100's / H200's by default; tests pass small ones to reach the chunking's limits with few rows.
DEFAULT_SM_COUNT = 132
# A hidden tensor spanning more than this many bytes goes to the harness as a sparse file, rows only.
SPARSE_BYTES = 64 << 20
# Kernel runs through the harness, so a test can check that the harness (not the C++ CPU kernel) ran,
# and the launch shape of the last backward (aligned, chunks, column_tiles).
CALLS = {"forward": 0, "backward": 0, "varlen_forward": 0, "varlen_backward": 0}
LAST_BACKWARD_PLAN: dict = {}


class SimtError(RuntimeError):
    """The harness caught an error in a kernel: the emulator's report or a sanitizer's."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(variant: str = "asan", mutant: int | None = None) -> Path:
    """The path of the harness executable for ``variant`` (with planted bug ``mutant``), built if needed."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX); the SIMT harness needs one")
    flags = COMMON_FLAGS + VARIANT_FLAGS[variant] + ([f"-DRED_SIMT_MUTANT={mutant}"] if mutant else [])
    digest = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    name = variant + (f"-mutant{mutant}" if mutant else "")
    target = BUILD / f"{name}-{digest.hexdigest()[:16]}" / "redistribute_sim"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    run = subprocess.run([cxx, *flags, str(CSRC / "simt" / "runner.cpp"), "-o", str(partial)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise RuntimeError(f"building the SIMT harness ({name}) failed:\n{run.stderr}")
    partial.replace(target)  # atomic: a concurrent build of the same variant writes the same file
    return target


# ---------------------------------------------------------------------------------------
# Transport: tensors to files and back


def _write(path: Path, tensor: torch.Tensor) -> None:
    tensor = tensor.contiguous()
    path.write_bytes(ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size()))


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    return torch.frombuffer(data, dtype=dtype).reshape(shape).clone() if data else torch.empty(shape, dtype=dtype)


def _write_inputs(directory: Path, hidden, weight, mask, start) -> dict:
    """The inputs both commands read (hidden, weight, mask, start), and their meta entries."""
    meta = _hidden_meta(directory, hidden)
    meta["weight_misalign"] = weight.data_ptr() % 64
    for name, tensor in (("weight", weight), ("mask", mask), ("start", start)):
        _write(directory / f"{name}.bin", tensor)
    return meta


def _hidden_meta(directory: Path, hidden: torch.Tensor) -> dict:
    """hidden's storage from its first element to its last, keeping its strides and its base address
    modulo 64 (so the harness sees the same alignment). Huge, mostly unread views (the 64-bit offset
    tests) are written sparsely: only each row's H elements."""
    B, T, H = hidden.shape
    stride_b, stride_t = hidden.stride(0), hidden.stride(1)
    span = 1 + (B - 1) * stride_b + (T - 1) * stride_t + (H - 1) * (hidden.stride(2) if H > 1 else 0)
    if B == 0:
        span = 0
    misalign = hidden.data_ptr() % 64
    element = hidden.element_size()
    sparse = span * element > SPARSE_BYTES
    path = directory / "hidden.bin"
    if not sparse:
        flat = torch.as_strided(hidden, (span,), (1,)) if span else hidden.new_empty(0)
        path.write_bytes(ctypes.string_at(flat.data_ptr(), span * element))
    else:
        with open(path, "wb") as out:
            out.truncate(misalign + span * element)
            for b in range(B):
                for t in range(T):
                    row = hidden[b, t].contiguous()
                    out.seek(misalign + (b * stride_b + t * stride_t) * element)
                    out.write(ctypes.string_at(row.data_ptr(), H * element))
    return dict(dtype=DTYPE_CODES[hidden.dtype], B=B, T=T, H=H, stride_b=stride_b, stride_t=stride_t,
                hidden_span=span, hidden_misalign=misalign, hidden_sparse=int(sparse))


def _run(variant: str, mutant: int | None, command: str, directory: Path, meta: dict) -> str:
    (directory / "meta").write_text("".join(f"{key} {int(value)}\n" for key, value in meta.items()))
    env = {**os.environ, **SANITIZER_ENV}
    run = subprocess.run([str(build(variant, mutant)), command, str(directory)], capture_output=True, text=True,
                         env=env, timeout=float(env.get("SIMT_TIMEOUT", 300)) + 60)
    if run.returncode != 0:
        raise SimtError(f"redistribute_sim {command} ({variant}{f', mutant {mutant}' if mutant else ''}) exited "
                        f"with {run.returncode}:\n{_cut(run.stderr)}")
    return run.stdout


def _cut(report: str, head: int = 5000, tail: int = 1500) -> str:
    """A sanitizer report's first lines (what and where) and its end (the summary)."""
    if len(report) <= head + tail:
        return report
    return f"{report[:head]}\n[... {len(report) - head - tail} characters ...]\n{report[-tail:]}"


def _check_normalised(hidden, weight, mask, start) -> None:
    assert hidden.device.type == "cpu" and hidden.dim() == 3 and (hidden.shape[2] == 1 or hidden.stride(2) == 1)
    assert min(hidden.stride()) >= 0, "the harness writes views with non-negative strides only"
    assert weight.dtype == torch.float32 and weight.is_contiguous()
    assert mask.dtype == torch.uint8 and mask.is_contiguous()
    assert start.dtype == torch.int64 and start.is_contiguous()


def forward(hidden, weight, bias, mask, start, baseline_zero: bool, *, variant: str = "asan",
            mutant: int | None = None) -> tuple[torch.Tensor, ...]:
    """red_kernels::redistribute through the harness: (scores, rewards, token_rewards, last_index)."""
    _check_normalised(hidden, weight, mask, start)
    B, T, H = hidden.shape
    with tempfile.TemporaryDirectory(prefix="simt-") as name:
        directory = Path(name)
        meta = _write_inputs(directory, hidden, weight, mask, start)
        if bias is not None:
            _write(directory / "bias.bin", bias.reshape(1))
        meta.update(has_bias=int(bias is not None), baseline_zero=int(baseline_zero))
        _run(variant, mutant, "forward", directory, meta)
        CALLS["forward"] += 1
        return (_read(directory / "scores.bin", torch.float32, (B, T)),
                _read(directory / "rewards.bin", torch.float32, (B,)),
                _read(directory / "token_rewards.bin", torch.float32, (B, T)),
                _read(directory / "last_index.bin", torch.int64, (B,)))


def backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index,
             baseline_zero: bool, output_mask, *, variant: str = "asan", mutant: int | None = None,
             sm_count: int = DEFAULT_SM_COUNT) -> tuple[torch.Tensor, ...]:
    """red_kernels::redistribute_backward through the harness: (grad_hidden, grad_weight, grad_bias), each
    empty when not requested; LAST_BACKWARD_PLAN receives the launch the harness chose."""
    _check_normalised(hidden, weight, mask, start)
    B, T, H = hidden.shape
    need_hidden, need_weight, need_bias = (bool(x) for x in output_mask)
    with tempfile.TemporaryDirectory(prefix="simt-") as name:
        directory = Path(name)
        meta = _write_inputs(directory, hidden, weight, mask, start)
        for file, tensor in (("last_index", last_index), ("grad_scores", grad_scores), ("grad_rewards", grad_rewards),
                             ("grad_token_rewards", grad_token_rewards)):
            _write(directory / f"{file}.bin", tensor)
        meta.update(baseline_zero=int(baseline_zero), need_hidden=int(need_hidden), need_weight=int(need_weight),
                    need_bias=int(need_bias), sm_count=sm_count)
        stdout = _run(variant, mutant, "backward", directory, meta)
        CALLS["backward"] += 1
        words = stdout.split()
        LAST_BACKWARD_PLAN.clear()
        LAST_BACKWARD_PLAN.update({words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)})
        grad_hidden = (_read(directory / "grad_hidden.bin", hidden.dtype, (B, T, H)) if need_hidden
                       else hidden.new_empty((0,)))
        grad_weight = _read(directory / "grad_weight.bin", torch.float32, (H,)) if need_weight else weight.new_empty(0)
        grad_bias = _read(directory / "grad_bias.bin", torch.float32, (1,)) if need_bias else weight.new_empty(0)
        return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------
# Packed sequences: red_kernels::redistribute_varlen and its backward


def _check_varlen_normalised(hidden, weight, cu_seqlens, seq_lens, start) -> None:
    assert hidden.device.type == "cpu" and hidden.dim() == 2 and (hidden.shape[1] == 1 or hidden.stride(1) == 1)
    assert min(hidden.stride()) >= 0, "the harness writes views with non-negative strides only"
    assert weight.dtype == torch.float32 and weight.is_contiguous()
    for tensor in (cu_seqlens, seq_lens, start):
        assert tensor.dtype == torch.int64 and tensor.is_contiguous()


def _write_varlen_inputs(directory: Path, hidden, weight, cu_seqlens, seq_lens, start) -> dict:
    """The packed inputs both varlen commands read; hidden [T, H] goes as the padded layout's one row."""
    T, H = hidden.shape
    if T > 0:
        meta = _hidden_meta(directory, hidden.unsqueeze(0))
    else:
        (directory / "hidden.bin").write_bytes(b"")
        meta = dict(dtype=DTYPE_CODES[hidden.dtype], stride_t=H, hidden_span=0, hidden_misalign=0, hidden_sparse=0)
    meta.update(N=seq_lens.shape[0], T=T, H=H, weight_misalign=weight.data_ptr() % 64)
    meta.pop("B", None)
    meta.pop("stride_b", None)
    for name, tensor in (("weight", weight), ("cu_seqlens", cu_seqlens), ("seq_lens", seq_lens), ("start", start)):
        _write(directory / f"{name}.bin", tensor)
    return meta


def varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero: bool, *,
                   variant: str = "asan", mutant: int | None = None) -> tuple[torch.Tensor, ...]:
    """red_kernels::redistribute_varlen through the harness: (scores, rewards, token_rewards, last_index)."""
    _check_varlen_normalised(hidden, weight, cu_seqlens, seq_lens, start)
    T, N = hidden.shape[0], seq_lens.shape[0]
    with tempfile.TemporaryDirectory(prefix="simt-") as name:
        directory = Path(name)
        meta = _write_varlen_inputs(directory, hidden, weight, cu_seqlens, seq_lens, start)
        if bias is not None:
            _write(directory / "bias.bin", bias.reshape(1))
        if prev_scores is not None:
            assert prev_scores.dtype == torch.float32
            _write(directory / "prev_scores.bin", prev_scores)
        meta.update(has_bias=int(bias is not None), has_prev_scores=int(prev_scores is not None),
                    baseline_zero=int(baseline_zero))
        _run(variant, mutant, "varlen_forward", directory, meta)
        CALLS["varlen_forward"] += 1
        return (_read(directory / "scores.bin", torch.float32, (T,)),
                _read(directory / "rewards.bin", torch.float32, (N,)),
                _read(directory / "token_rewards.bin", torch.float32, (T,)),
                _read(directory / "last_index.bin", torch.int64, (N,)))


def varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens, start,
                    last_index, baseline_zero: bool, output_mask, *, variant: str = "asan", mutant: int | None = None,
                    sm_count: int = DEFAULT_SM_COUNT) -> tuple[torch.Tensor, ...]:
    """red_kernels::redistribute_varlen_backward through the harness; LAST_BACKWARD_PLAN as for `backward`."""
    _check_varlen_normalised(hidden, weight, cu_seqlens, seq_lens, start)
    T, H = hidden.shape
    need_hidden, need_weight, need_bias = (bool(x) for x in output_mask)
    with tempfile.TemporaryDirectory(prefix="simt-") as name:
        directory = Path(name)
        meta = _write_varlen_inputs(directory, hidden, weight, cu_seqlens, seq_lens, start)
        for file, tensor in (("last_index", last_index), ("grad_scores", grad_scores), ("grad_rewards", grad_rewards),
                             ("grad_token_rewards", grad_token_rewards)):
            _write(directory / f"{file}.bin", tensor)
        meta.update(baseline_zero=int(baseline_zero), need_hidden=int(need_hidden), need_weight=int(need_weight),
                    need_bias=int(need_bias), sm_count=sm_count)
        stdout = _run(variant, mutant, "varlen_backward", directory, meta)
        CALLS["varlen_backward"] += 1
        words = stdout.split()
        LAST_BACKWARD_PLAN.clear()
        LAST_BACKWARD_PLAN.update({words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)})
        grad_hidden = (_read(directory / "grad_hidden.bin", hidden.dtype, (T, H)) if need_hidden
                       else hidden.new_empty((0,)))
        grad_weight = _read(directory / "grad_weight.bin", torch.float32, (H,)) if need_weight else weight.new_empty(0)
        grad_bias = _read(directory / "grad_bias.bin", torch.float32, (1,)) if need_bias else weight.new_empty(0)
        return grad_hidden, grad_weight, grad_bias


@contextlib.contextmanager
def as_cpu_kernel(variant: str = "asan", mutant: int | None = None, *, forward_by_reference: bool = False,
                  sm_count: int = DEFAULT_SM_COUNT):
    """Within the block, the C++ ops' CPU kernels are the harness (the registrations are removed after).
    ``forward_by_reference``: the forward is the eager reference instead (for backward-only tests of
    shapes whose forward would take long in the emulator)."""
    build(variant, mutant)  # build errors surface here, not inside the dispatcher

    def forward_kernel(hidden, weight, bias, mask, start, baseline_zero):
        if forward_by_reference:
            from red_kernels.reference import redistribute_reference

            return tuple(redistribute_reference(hidden, weight, bias, mask, start, baseline_zero))
        return forward(hidden, weight, bias, mask, start, baseline_zero, variant=variant, mutant=mutant)

    def backward_kernel(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index,
                        baseline_zero, output_mask):
        return backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index,
                        baseline_zero, output_mask, variant=variant, mutant=mutant, sm_count=sm_count)

    def varlen_forward_kernel(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero):
        if forward_by_reference:
            from red_kernels.reference import redistribute_varlen_reference

            return tuple(redistribute_varlen_reference(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores,
                                                       baseline_zero))
        return varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores, baseline_zero,
                              variant=variant, mutant=mutant)

    def varlen_backward_kernel(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens,
                               start, last_index, baseline_zero, output_mask):
        return varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens,
                               start, last_index, baseline_zero, output_mask, variant=variant, mutant=mutant,
                               sm_count=sm_count)

    # Whether or not the varlen op has a real CPU kernel in this build, an IMPL registration replaces it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        library = torch.library.Library("red_kernels", "IMPL")
        library.impl("redistribute", forward_kernel, "CPU")
        library.impl("redistribute_backward", backward_kernel, "CPU")
        library.impl("redistribute_varlen", varlen_forward_kernel, "CPU")
        library.impl("redistribute_varlen_backward", varlen_backward_kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()
