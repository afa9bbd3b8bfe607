"""The GPU backends (`cuda`, `triton` on CUDA tensors) and the CUDA build itself.

Build checks run everywhere (CI has nvcc and no GPU): the extension reports CUDA, the CUDA
kernels are registered for both ops, and the shared object holds code for every requested
architecture. They need a CUDA build; RED_KERNELS_EXPECT_CUDA=1 (set in CI) turns "not built"
from a skip into a failure.

GPU tests are marked `gpu` and skip cleanly when no GPU is visible; they run in the normal
pytest process only (under TRITON_INTERPRET=1 Triton would not compile for the GPU). The skips live in
tests/conftest.py, which also skips a test whose backend (its `backend` parameter, or the marker's
`backend=`) is not available on CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import red_kernels
import test_varlen
from cases import (Case, assert_gradients_match, assert_matches, assert_padding_never_read,
                   assert_varlen_gradients_match, assert_varlen_matches, forward_cases, layout_inputs, make_inputs,
                   make_varlen_inputs, op_pair, redistribute_varlen_op, to_device)
from conftest import TRITON_INTERPRET
from red_kernels import RedistributeOutput

EXPECT_CUDA = os.environ.get("RED_KERNELS_EXPECT_CUDA") == "1"
GPU_BACKENDS = ["cuda", "triton"]
CASES = forward_cases()
OPS = ("red_kernels::redistribute", "red_kernels::redistribute_backward", "red_kernels::redistribute_varlen",
       "red_kernels::redistribute_varlen_backward")

def _require_cuda_build() -> None:
    if TRITON_INTERPRET:
        pytest.skip("build checks run in the normal process")
    if not red_kernels.build_info()["cuda"] and not EXPECT_CUDA:
        pytest.skip("the extension was built without CUDA (set RED_KERNELS_EXPECT_CUDA=1 to make this fail)")


# ---------------------------------------------------------------------------------------
# The build (no GPU needed)


def test_build_reports_cuda() -> None:
    _require_cuda_build()
    info = red_kernels.build_info()
    assert info["cuda"], f"build_info()['cuda'] is False; extension error: {red_kernels._library.EXTENSION_ERROR}"
    assert info["cuda_arch_list"], "build_info()['cuda_arch_list'] is empty"
    assert "cuda" in red_kernels.available_backends("cuda")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op: str) -> None:
    _require_cuda_build()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy that ships with Triton."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def expected_code(arch_list: list[str]) -> tuple[set[str], set[str]]:
    """("8.0", "9.0+PTX") -> SASS {"80", "90"}, PTX {"90"}; named entries such as "Ampere" are skipped."""
    sass, ptx = set(), set()
    for entry in arch_list:
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry.strip())
        if match is None:
            continue
        arch = match[1] + match[2] + match[3]
        sass.add(arch)
        if match[4]:
            ptx.add(arch)
    return sass, ptx


def test_expected_code_parses_arch_lists() -> None:
    assert expected_code(["8.0", "9.0+PTX"]) == ({"80", "90"}, {"90"})
    assert expected_code(["9.0a", "Ampere", "10.0+PTX"]) == ({"90a", "100"}, {"100"})


def test_shared_object_holds_requested_architectures() -> None:
    """`cuobjdump --list-elf/--list-ptx` on _C: an ELF per requested arch, PTX for each +PTX entry."""
    _require_cuda_build()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, or triton's copy)")
    sass, ptx = expected_code(red_kernels.build_info()["cuda_arch_list"])
    assert sass, f"no numeric architecture in {red_kernels.build_info()['cuda_arch_list']}"
    library = red_kernels._library._C.__file__

    def listed(kind: str) -> set[str]:
        run = subprocess.run([tool, f"--list-{kind}", library], capture_output=True, text=True)
        assert run.returncode == 0, f"{tool} --list-{kind} {library} failed: {run.stderr}"
        # Lines such as "ELF file    1: _C.1.sm_80.cubin" and "PTX file    1: _C.1.sm_90.ptx".
        return set(re.findall(r"\b(?:sm|compute)_(\d+[a-z]?)\.(?:cubin|ptx)\b", run.stdout))

    elf, ptx_found = listed("elf"), listed("ptx")
    assert sass <= elf, f"missing SASS for sm_{sorted(sass - elf)}; cuobjdump lists {sorted(elf)}"
    assert ptx <= ptx_found, f"missing PTX for compute_{sorted(ptx - ptx_found)}; cuobjdump lists {sorted(ptx_found)}"


def _sm90_functions(kind: str) -> dict[str, str]:
    """`cuobjdump -<kind> -arch sm_90` on _C, split per kernel: {mangled name: its text}."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, or triton's copy)")
    if "90" not in expected_code(red_kernels.build_info()["cuda_arch_list"])[0]:
        pytest.skip(f"the build has no sm_90 code: {red_kernels.build_info()['cuda_arch_list']}")
    run = subprocess.run([tool, f"-{kind}", "-arch", "sm_90", red_kernels._library._C.__file__], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    parts = re.split(r"\n\s*Function\s*:?\s*", run.stdout)
    functions = {}
    for part in parts[1:]:
        name, _, body = part.partition("\n") if kind == "sass" else part.partition(":")
        functions[name.strip().rstrip(":")] = body
    kernels = {name: body for name, body in functions.items() if "red_kernels" in name}
    assert len(kernels) == 25, (f"expected 25 kernels (3 dtypes x 2 alignments x forward, backward, varlen forward and "
                                f"varlen backward, and the reduction), got {sorted(kernels)}")
    assert sum("varlen_forward_kernel" in name for name in kernels) == 6
    assert sum("varlen_backward_kernel" in name for name in kernels) == 6
    return kernels


def test_cuda_kernels_compiled_form() -> None:
    """What the speed work relies on, read from the sm_90 code in the build (issue 12, findings 9-12):
    the forward fits 6 blocks per SM (<= 40 registers), no kernel spills to local memory, the aligned
    forward streams hidden with 16-byte cp.async (LDGSTS.E.BYPASS.128), and the aligned backward writes
    grad_hidden with 128-bit stores (STG.E.128). The varlen kernels (issue 14) are held to the same: their
    names contain forward_kernel / backward_kernel."""
    _require_cuda_build()
    usage = _sm90_functions("res-usage")
    for name, text in usage.items():
        registers, stack, local = (int(re.search(rf"\b{key}:(\d+)", text)[1]) for key in ("REG", "STACK", "LOCAL"))
        assert stack == 0 and local == 0, f"{name} spills: STACK {stack}, LOCAL {local}"
        if "forward_kernel" in name:
            assert registers <= 40, f"{name} uses {registers} registers: 6 blocks of 256 threads per SM need <= 40"
    sass = _sm90_functions("sass")
    for name, text in sass.items():
        aligned = re.search(r"Lb1E", name) is not None  # the kAligned = true instantiations (float's too)
        if "forward_kernel" in name and aligned:
            assert "LDGSTS.E.BYPASS.128" in text, f"{name}: no 16-byte cp.async"
        if "backward_kernel" in name and aligned:
            assert "LDGSTS.E.BYPASS.128" in text, f"{name}: no 16-byte cp.async"
            assert "STG.E.128" in text, f"{name}: grad_hidden is not stored 128 bits at a time"


# ---------------------------------------------------------------------------------------
# GPU helpers


def to_cuda(x):
    return to_device(x, "cuda")


def inputs_to_cuda(inputs: dict) -> dict:
    return {name: to_cuda(value) for name, value in inputs.items()}


def to_cpu(out) -> RedistributeOutput:
    return RedistributeOutput(*(t.cpu() for t in out))


# ---------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_matches_float64_spec(case: Case, backend: str) -> None:
    inputs = make_inputs(case)
    out = red_kernels.redistribute(**inputs_to_cuda(inputs), backend=backend)
    assert all(t.is_cuda for t in out)
    assert_matches(to_cpu(out), inputs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "offset"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("H", [5, 37, 1000, 2051])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_vector_tail_and_unaligned_paths(backend: str, layout: str, dtype: str, H: int) -> None:
    inputs = layout_inputs(layout, dtype, H, seed=H)
    gpu_inputs = inputs_to_cuda(inputs)
    if layout == "offset":  # keep the GPU copy 2 bytes off 16-byte alignment too
        flat = torch.empty(inputs["hidden"].numel() + 8, dtype=inputs["hidden"].dtype, device="cuda")
        gpu_inputs["hidden"] = flat[1:1 + inputs["hidden"].numel()].view(inputs["hidden"].shape)
        gpu_inputs["hidden"].copy_(inputs["hidden"])
        assert gpu_inputs["hidden"].data_ptr() % 16 != 0
    out = red_kernels.redistribute(**gpu_inputs, backend=backend)
    assert_matches(to_cpu(out), inputs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 14, 15, 16, 31, 300])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_block_boundaries(backend: str, T: int) -> None:
    """T around the CUDA kernel's 15 positions per block, every padding: the halo row, and the one
    block per row that writes last_index and rewards."""
    for seed, padding in enumerate(["right", "left", "both", "holey", "empty-row"]):
        for baseline in ("prompt", "zero"):
            inputs = make_inputs(Case(5, T, 24, dtype="bf16", padding=padding, start="tensor", baseline=baseline,
                                      seed=100 * T + seed))
            out = red_kernels.redistribute(**inputs_to_cuda(inputs), backend=backend)
            assert_matches(to_cpu(out), inputs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_offsets_beyond_int32(backend: str) -> None:
    """B*T*H > 2^31 elements in one tensor; checked row by row against float32 matmuls."""
    B, T, H = 2, 65537, 16400  # 2.15e9 elements, 4.3 GB in bfloat16
    assert B * T * H > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * B * T * H * 2:
        pytest.skip(f"needs ~{3 * B * T * H * 2 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(H, device="cuda", generator=generator) / H**0.5
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[0, -3:] = False  # row 0 ends 3 tokens early: its last index is far past 2^31 / H rows
    out = red_kernels.redistribute(hidden, weight, 0.5, attention_mask=mask, response_start=T // 2,
                                   baseline="prompt", backend=backend)
    for b in range(B):
        expected = (hidden[b].float() @ weight + 0.5) * mask[b]
        torch.testing.assert_close(out.scores[b], expected, rtol=1e-4, atol=1e-4)
    assert out.last_index.tolist() == [T - 4, T - 1]
    torch.testing.assert_close(out.rewards, out.scores[[0, 1], [T - 4, T - 1]], rtol=0, atol=0)
    t = T - 1  # token rewards far into row 1 (offset (T + t) * H > 2^31)
    torch.testing.assert_close(out.token_rewards[1, t], out.scores[1, t] - out.scores[1, t - 1], rtol=1e-6, atol=1e-6)
    del hidden
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Gradients


def _gradient_check(case: Case, backend: str, inputs: dict | None = None) -> None:
    """Backward on the GPU against autograd through the float64 eager reference on the CPU."""
    assert_gradients_match(case, backend, device="cuda", inputs=inputs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_gradients_match_autograd_through_eager(case: Case, backend: str) -> None:
    _gradient_check(case, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "offset"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_gradients_vector_tail_and_unaligned(backend: str, layout: str, dtype: str) -> None:
    """H = 2051 spans a second column tile of the backward kernel, with a partial last pack."""
    inputs = layout_inputs(layout, dtype, 2051, seed=5)
    _gradient_check(Case(3, 37, 2051, dtype=dtype, seed=5), backend, inputs)


@pytest.mark.parametrize("rows", [31, 32, 33, 257, 9000])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu(backend="cuda")
def test_gradients_across_chunks(rows: int) -> None:
    """B*T around the backward kernel's row chunks (16 rows at least, 4 blocks per SM aimed at)."""
    _gradient_check(Case(1, rows, 40, dtype="bf16", padding="holey", start="tensor", bias="tensor", seed=rows),
                    "cuda")


@pytest.mark.parametrize("output_mask", [[True, False, False], [False, True, False], [False, False, True],
                                         [True, False, True], [False, True, True]])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu(backend="cuda")
def test_backward_op_skips_unrequested(output_mask: list[bool]) -> None:
    """What is not requested comes back empty; what is requested is bitwise what a full call gives."""
    inputs = inputs_to_cuda(make_inputs(Case(4, 50, 300, dtype="bf16", padding="both", seed=41)))
    B, T, H = inputs["hidden"].shape
    mask = (inputs["attention_mask"] != 0).to(torch.uint8)
    start = torch.full((B,), inputs["response_start"], device="cuda")
    last_index = torch.ops.red_kernels.redistribute(inputs["hidden"], inputs["weight"], None, mask, start, False)[3]
    args = (torch.randn(B, T, device="cuda"), torch.randn(B, device="cuda"), torch.randn(B, T, device="cuda"),
            inputs["hidden"], inputs["weight"], mask, start, last_index, False)
    full = torch.ops.red_kernels.redistribute_backward(*args, [True, True, True])
    some = torch.ops.red_kernels.redistribute_backward(*args, output_mask)
    for wanted, got, want in zip(output_mask, some, full):
        if wanted:
            assert torch.equal(got, want)
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu
def test_padding_content_never_matters(backend: str) -> None:
    assert_padding_never_read(backend, "cuda", Case(3, 40, 64, padding="both", start="tensor", seed=9))


@pytest.mark.gpu(backend="cuda")
def test_grad_weight_is_deterministic() -> None:
    inputs = inputs_to_cuda(make_inputs(Case(4, 2000, 1000, dtype="bf16", padding="holey", seed=10)))
    upstream = torch.randn(4, 2000, device="cuda")
    results = []
    for _ in range(3):
        weight = inputs["weight"].detach().clone().requires_grad_()
        bias = torch.zeros(1, device="cuda", requires_grad=True)
        out = red_kernels.redistribute(inputs["hidden"], weight, bias, attention_mask=inputs["attention_mask"],
                                       response_start=inputs["response_start"], backend="cuda")
        (out.token_rewards * upstream).sum().backward()
        results.append((weight.grad, bias.grad))
    assert all(torch.equal(results[0][0], w) and torch.equal(results[0][1], b) for w, b in results[1:])


# ---------------------------------------------------------------------------------------
# Streams, graphs, devices


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(backend: str) -> None:
    """Forward and backward captured in one CUDA graph; replays on new inputs equal eager calls."""
    forward, backward = op_pair(backend)
    B, T, H = 4, 100, 256
    static = {
        "hidden": torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16),
        "weight": torch.randn(H, device="cuda"),
        "bias": torch.randn(1, device="cuda"),
        "mask": (torch.rand(B, T, device="cuda") < 0.8).to(torch.uint8),
        "start": torch.randint(-2, T + 3, (B,), device="cuda"),
        "g_scores": torch.randn(B, T, device="cuda"),
        "g_rewards": torch.randn(B, device="cuda"),
        "g_tokens": torch.randn(B, T, device="cuda"),
    }

    def step(x):
        out = forward(x["hidden"], x["weight"], x["bias"], x["mask"], x["start"], False)
        grads = backward(x["g_scores"], x["g_rewards"], x["g_tokens"], x["hidden"], x["weight"], x["mask"],
                         x["start"], out[3], False, [True, True, True])
        return (*out, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, the allocator settles) off the capture
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)

    for trial in range(3):
        fresh = {name: (torch.randn_like(v) if v.is_floating_point() else v) for name, v in static.items()}
        fresh["mask"] = (torch.rand(B, T, device="cuda") < 0.3 + 0.3 * trial).to(torch.uint8)
        fresh["start"] = torch.randint(-2, T + 3, (B,), device="cuda")
        for name, value in fresh.items():
            static[name].copy_(value)
        graph.replay()
        expected = step(fresh)
        for got, want in zip(captured, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_runs_on_the_current_stream(backend: str) -> None:
    """Inputs written on a side stream behind a long sleep: a kernel launched on any other stream
    than the current one would read them before they are written."""
    B, T, H = 8, 512, 1024
    new = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(H, device="cuda") / H**0.5
    mask = torch.ones(B, T, device="cuda", dtype=torch.bool)
    expected = red_kernels.redistribute(new, weight, attention_mask=mask, response_start=3, backend="eager")
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        hidden = torch.zeros(B, T, H, device="cuda", dtype=torch.bfloat16)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream only
        hidden.copy_(new)
        out = red_kernels.redistribute(hidden, weight, attention_mask=mask, response_start=3, backend=backend)
    side.synchronize()
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_second_device(backend: str) -> None:
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    inputs = make_inputs(Case(3, 30, 48, dtype="bf16", padding="both", seed=51))
    on_second = {name: value.to("cuda:1") if isinstance(value, torch.Tensor) else value
                 for name, value in inputs.items()}
    with torch.cuda.device(0):
        out = red_kernels.redistribute(**on_second, backend=backend)
    assert all(t.device == torch.device("cuda:1") for t in out)
    assert_matches(to_cpu(out), inputs)


# ---------------------------------------------------------------------------------------
# Packed sequences (redistribute_varlen): tests/test_varlen.py's matrix for the cuda backend


def varlen_inputs_to_cuda(inputs: dict) -> dict:
    return {name: to_cuda(value) for name, value in inputs.items()}


VARLEN_CASES = test_varlen.CASES + test_varlen.EDGE_CASES


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c.id for c in VARLEN_CASES])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu(backend="cuda")
def test_varlen_matches_float64_spec(case) -> None:
    inputs = make_varlen_inputs(case)
    on_gpu = varlen_inputs_to_cuda(inputs)
    out = redistribute_varlen_op(on_gpu["hidden"], on_gpu["weight"], on_gpu["bias"], on_gpu, "cuda")
    assert all(t.is_cuda for t in out)
    assert_varlen_matches(to_cpu(out), inputs)


@pytest.mark.parametrize("case", test_varlen.GRADIENT_CASES, ids=[c.id for c in test_varlen.GRADIENT_CASES])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu(backend="cuda")
def test_varlen_gradients_match_autograd_through_float64_reference(case) -> None:
    assert_varlen_gradients_match(case, "cuda", device="cuda")


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("packing", ["slots", "tight"])
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.gpu(backend="cuda")
def test_varlen_equals_padded_op_on_the_same_sequences(dtype: str, packing: str) -> None:
    test_varlen.check_varlen_equals_padded_op("cuda", dtype, packing, device="cuda")
