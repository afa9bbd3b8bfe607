"""`red_kernels.redistribute_varlen` under torch.compile(fullgraph=True) and CUDA-graph capture, and where its
offsets are checked (red_kernels/_validate.py): on the host in an eager call (one read of their values), inside
the graph when compiled or captured (the op ``red_kernels::varlen_offsets``), never silently.

Compiled results equal the uncompiled op's; bad offsets still raise the eager call's ValueError in the compiled
path; the device-side check asserts without reading on the host and hands the kernels empty sequences; an eager
call reads the offsets once, and `redistribute_sequence_parallel` once per call. The GPU tests (marked ``gpu``)
skip without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import red_kernels
from cases import VarlenCase, assert_varlen_gradients_match, make_varlen_inputs
from conftest import TRITON_INTERPRET, cpu_backends
from red_kernels import _validate
from red_kernels.op import flatten_packed

BACKENDS = cpu_backends(varlen=True)

COMPILE_CASES = [
    VarlenCase((5, 0, 7, 3), 24, layout="1TH", in_slot=True, tail=2, baseline="zero", bias="tensor", carried=True,
               seed=71),
    VarlenCase((9, 1, 12), 40, dtype="bf16", layout="TH", start="int", index_dtype="int64", seed=72),
]


def _op(backend: str):
    def call(hidden, weight, bias, cu_seqlens, seq_lens, response_start, prev_scores, baseline):
        return red_kernels.redistribute_varlen(hidden, weight, bias, cu_seqlens=cu_seqlens, seq_lens=seq_lens,
                                               response_start=response_start, prev_scores=prev_scores,
                                               baseline=baseline, backend=backend)

    return call


def _leaves(inputs: dict) -> dict:
    """The case's inputs, with hidden, weight, a tensor bias and prev_scores as fresh leaves that require grad."""
    leaves = dict(inputs)
    for name in ("hidden", "weight", "bias", "prev_scores"):
        if isinstance(leaves[name], torch.Tensor):
            leaves[name] = leaves[name].detach().clone().requires_grad_()
    return leaves


def _forward_backward(fn, inputs: dict, upstream: torch.Tensor):
    """Outputs of ``fn`` and the gradients of every leaf that requires grad, for a loss over all three outputs."""
    out = fn(*_args(inputs))
    loss = (out.token_rewards * upstream).sum() + (out.scores * upstream.flip(0)).sum() + out.rewards.sum()
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return out, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c.id for c in COMPILE_CASES])
def test_compiled_varlen_equals_uncompiled(case: VarlenCase, backend: str) -> None:
    """fullgraph=True, forward and backward: the same outputs as the uncompiled op, bit for bit, and from the
    fused backends (the graph calls their backward kernels) the same gradients, bit for bit. The eager backend's
    autograd graph Inductor compiles into reductions of its own (the sums over tokens round in another order):
    its gradients are held to the float64 reference's bounds by the next test, as every backend's are."""
    torch._dynamo.reset()
    compiled = torch.compile(_op(backend), fullgraph=True)
    inputs = make_varlen_inputs(case)
    upstream = torch.randn(flatten_packed(inputs["hidden"]).shape[0], generator=torch.Generator().manual_seed(3))
    want, want_grads = _forward_backward(_op(backend), _leaves(inputs), upstream)
    got, got_grads = _forward_backward(compiled, _leaves(inputs), upstream)
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert len(got_grads) == len(want_grads) >= 2
    if backend != "eager":
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c.id for c in COMPILE_CASES])
def test_compiled_varlen_gradients_match_float64(case: VarlenCase, backend: str, monkeypatch) -> None:
    """The compiled op's gradients against autograd through the float64 reference, with the bounds every
    backend's gradients are held to (test_varlen.py)."""
    torch._dynamo.reset()
    monkeypatch.setattr(red_kernels, "redistribute_varlen",
                        torch.compile(red_kernels.redistribute_varlen, fullgraph=True))
    assert_varlen_gradients_match(case, backend)


# (id, the changed offsets of _good_packed, the eager call's message)
BAD_OFFSETS = [
    ("first-offset", dict(cu_seqlens=torch.tensor([1, 4, 9])), "cu_seqlens: expected the first offset to be 0"),
    ("decreasing", dict(cu_seqlens=torch.tensor([0, 5, 3])),
     "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[1] = 5 > cu_seqlens[2] = 3"),
    ("past-end", dict(cu_seqlens=torch.tensor([0, 4, 11])),
     "cu_seqlens: the last offset 11 passes the end of hidden's 10 tokens"),
    ("lens-past-slot", dict(seq_lens=torch.tensor([5, 2])),
     "seq_lens: expected 0 <= seq_lens[i] <= the slot's length, got seq_lens[0] = 5 for a slot of 4 tokens"),
    ("lens-negative", dict(seq_lens=torch.tensor([4, -1])),
     "seq_lens: expected 0 <= seq_lens[i] <= the slot's length, got seq_lens[1] = -1 for a slot of 5 tokens"),
]


def _args(inputs: dict) -> list:
    return [inputs[name] for name in ("hidden", "weight", "bias", "cu_seqlens", "seq_lens", "response_start",
                                      "prev_scores", "baseline")]


def _good_packed() -> dict:
    return dict(hidden=torch.randn(10, 8), weight=torch.randn(8), bias=0.1, cu_seqlens=torch.tensor([0, 4, 9]),
                seq_lens=torch.tensor([4, 3]), response_start=1, prev_scores=None, baseline="prompt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_varlen_rejects_bad_offsets_as_the_eager_call_does(backend: str) -> None:
    """The graph is traced once on good offsets; each bad set of the same shapes then raises, when the graph runs,
    the eager call's ValueError (not the C++ kernel's own RuntimeError: the check runs first)."""
    torch._dynamo.reset()
    compiled = torch.compile(_op(backend), fullgraph=True)
    good = _good_packed()
    torch.testing.assert_close(compiled(*_args(good)).scores, _op(backend)(*_args(good)).scores, rtol=0, atol=0)
    for name, change, message in BAD_OFFSETS:
        bad = {**good, **change}
        with pytest.raises(ValueError) as eager:
            _op(backend)(*_args(bad))
        with pytest.raises(ValueError) as graph, torch._dynamo.config.patch(error_on_recompile=True):
            compiled(*_args(bad))
        assert str(graph.value) == str(eager.value), name
        assert message in str(graph.value), f"{name}: {graph.value}"


class HostReads:
    """Counts the calls that read a tensor's values on the host (each one a sync for a device tensor)."""

    METHODS = ("cpu", "tolist", "item", "numpy", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)

            def counted(tensor, *args, _method=method, _original=original, **kwargs):
                self.calls.append(_method)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, method, counted)

    def __len__(self) -> int:
        return len(self.calls)


@pytest.mark.skipif(TRITON_INTERPRET, reason="input checks run before any backend; checked in the normal process")
@pytest.mark.parametrize("name,change,message", BAD_OFFSETS, ids=[b[0] for b in BAD_OFFSETS])
def test_device_side_check_asserts_without_host_reads(name: str, change: dict, message: str, monkeypatch) -> None:
    """The check for offsets on a device, run on CPU tensors (where its assertion raises at once): it names the
    rules, reads nothing on the host, and when the assertion has not stopped the stream yet (an asynchronous
    device) it hands the kernels all-zero offsets and lengths (every sequence empty)."""
    good = _good_packed()
    inputs = {**good, **change}
    cu, lens = inputs["cu_seqlens"], inputs["seq_lens"]
    reads = HostReads(monkeypatch)
    with pytest.raises(RuntimeError, match="invalid offsets, checked on the device") as raised:
        _validate.check_offsets_on_device(cu, lens, 10)
    assert "cu_seqlens[-1] <= the 10 tokens of hidden" in str(raised.value)
    assert len(reads) == 0, reads.calls

    monkeypatch.setattr(torch, "_assert_async", lambda *args: None)  # as if the device had not reported it yet
    safe_cu, safe_lens = _validate.check_offsets_on_device(cu, lens, 10)
    kept_cu, kept_lens = _validate.check_offsets_on_device(good["cu_seqlens"], good["seq_lens"], 10)
    assert len(reads) == 0, reads.calls
    monkeypatch.undo()  # the checks below read values themselves
    assert not safe_cu.any() and not safe_lens.any() and safe_cu.shape == cu.shape and safe_lens.shape == lens.shape
    assert torch.equal(kept_cu, good["cu_seqlens"]) and torch.equal(kept_lens, good["seq_lens"])


def _random_offsets(g: torch.Generator):
    """Small random offsets, lengths (or None) and token count: valid about half the time, each rule broken at
    times."""
    N = int(torch.randint(0, 5, (), generator=g))
    steps = torch.randint(0, 4, (N,), generator=g)
    lens = (steps.double() * torch.rand(N, generator=g)).round().long()
    if N and torch.rand((), generator=g) < 0.15:
        steps[torch.randint(0, N, (), generator=g)] = -1
    if N and torch.rand((), generator=g) < 0.3:
        lens[torch.randint(0, N, (), generator=g)] += int(torch.randint(0, 2, (), generator=g)) * 5 - 1
    first = int(torch.rand((), generator=g) < 0.15)
    cu = torch.cat([torch.tensor([first]), first + steps.cumsum(0)])
    total = int(cu[-1]) + int(torch.randint(-1, 3, (), generator=g))
    return cu, lens if torch.rand((), generator=g) < 0.5 else None, total


HOST_RULES = ("cu_seqlens: expected the first offset to be 0", "cu_seqlens: expected non-decreasing offsets",
              "cu_seqlens: the last offset", "seq_lens: expected 0 <= seq_lens[i] <= the slot's length")


@pytest.mark.skipif(TRITON_INTERPRET, reason="input checks: the normal process")
def test_device_side_check_agrees_with_the_host_check() -> None:
    """On random small offsets the device-side check fails exactly when the host check does (and every rule of
    the host check fails somewhere among them)."""
    g = torch.Generator().manual_seed(5)
    outcomes = set()
    for _ in range(400):
        cu, lens, total = _random_offsets(g)
        try:
            _validate.check_offset_values(cu.tolist(), None if lens is None else lens.tolist(), total)
            outcome = "valid"
        except ValueError as error:
            outcome = next(rule for rule in HOST_RULES if str(error).startswith(rule))
        try:
            _validate.check_offsets_on_device(cu, cu.diff() if lens is None else lens, total)
            device_ok = True
        except RuntimeError:
            device_ok = False
        assert device_ok == (outcome == "valid"), (cu.tolist(), lens, total, outcome)
        outcomes.add(outcome)
    assert outcomes == {"valid", *HOST_RULES}, outcomes


@pytest.mark.skipif(TRITON_INTERPRET, reason="checks of the offsets op; the normal process")
def test_varlen_offsets_op() -> None:
    """red_kernels::varlen_offsets: checked int64 copies (lengths from the slots when seq_lens is None), the
    eager call's ValueError on the CPU, and a fake implementation torch.compile can trace (opcheck)."""
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    lens = torch.tensor([3, 0, 5], dtype=torch.int32)
    got_cu, got_lens = torch.ops.red_kernels.varlen_offsets(cu, lens, 10)
    assert got_cu.dtype == got_lens.dtype == torch.int64
    assert got_cu.tolist() == [0, 4, 4, 9] and got_lens.tolist() == [3, 0, 5]
    assert torch.ops.red_kernels.varlen_offsets(cu, None, 9)[1].tolist() == [4, 0, 5]
    with pytest.raises(ValueError, match="passes the end of hidden's 8 tokens"):
        torch.ops.red_kernels.varlen_offsets(cu, lens, 8)
    torch.library.opcheck(torch.ops.red_kernels.varlen_offsets, (cu, lens, 10))
    torch.library.opcheck(torch.ops.red_kernels.varlen_offsets, (cu.long(), None, 12))


@pytest.mark.skipif(TRITON_INTERPRET, reason="host reads: the normal process")
@pytest.mark.parametrize("seq_lens", [None, torch.tensor([4, 3])], ids=["whole-slots", "seq_lens"])
def test_eager_call_reads_the_offsets_once(seq_lens, monkeypatch) -> None:
    good = _good_packed()
    reads = HostReads(monkeypatch)
    red_kernels.redistribute_varlen(good["hidden"], good["weight"], 0.1, cu_seqlens=good["cu_seqlens"],
                                    seq_lens=seq_lens, response_start=1, backend="eager")
    assert reads.calls == ["tolist"]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of this one process (the multi-process runs are tests/test_distributed.py)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(TRITON_INTERPRET, reason="host reads: the normal process")
@pytest.mark.parametrize("shard_lengths", [None, [12]], ids=["gathered", "given"])
def test_sequence_parallel_reads_the_host_at_most_once(shard_lengths, one_process_group, monkeypatch) -> None:
    """One read per call for the global offsets, the lengths and the gathered shard lengths together (it was
    three: its own check, then one per call of the op); the result is still the single-process op's, and bad
    global offsets still raise the op's ValueError."""
    from red_kernels.distributed import redistribute_sequence_parallel

    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(8)
    cu = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    seq_lens = torch.tensor([3, 0, 6], dtype=torch.int32)
    reads = HostReads(monkeypatch)
    out = redistribute_sequence_parallel(hidden, weight, 0.2, cu_seqlens=cu, seq_lens=seq_lens, response_start=1,
                                         shard_lengths=shard_lengths, backend="eager")
    assert reads.calls == ["tolist"]
    out.token_rewards.sum().backward()
    assert reads.calls == ["tolist"]  # backward reads nothing either
    monkeypatch.undo()
    want = red_kernels.redistribute_varlen(hidden, weight, 0.2, cu_seqlens=cu, seq_lens=seq_lens, response_start=1,
                                           backend="eager")
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seq_lens: expected 0 <= seq_lens\\[i\\] <= the slot's length, got "
                                         "seq_lens\\[2\\] = 7 for a slot of 6 tokens"):
        redistribute_sequence_parallel(hidden, weight, 0.2, cu_seqlens=cu, seq_lens=torch.tensor([3, 0, 7]),
                                       response_start=1, shard_lengths=shard_lengths, backend="eager")


# ---------------------------------------------------------------------------------------
# On a GPU: device offsets compiled and captured with no host read, a bad one stopped by the device.

GPU_BACKENDS = ["cuda", "triton"]


def _require_gpu_backend(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    if TRITON_INTERPRET:
        pytest.skip("GPU tests run in the normal process")
    if backend not in red_kernels.available_backends("cuda", varlen=True):
        pytest.skip(f"backend {backend!r} is not available here: {red_kernels.available_backends('cuda', varlen=True)}")


def _gpu_inputs() -> dict:
    T, H = 300, 256
    return dict(hidden=torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                weight=torch.randn(H, device="cuda", requires_grad=True),
                cu_seqlens=torch.tensor([0, 50, 50, 170, 290], device="cuda"),
                seq_lens=torch.tensor([50, 0, 100, 120], device="cuda"),
                response_start=torch.tensor([10, 0, 30, 200], device="cuda"),
                upstream=torch.randn(T, device="cuda"))


def _gpu_step(x: dict, backend: str, fn=None):
    fn = fn or _op(backend)
    out = fn(x["hidden"], x["weight"], 0.5, x["cu_seqlens"], x["seq_lens"], x["response_start"], None, "prompt")
    loss = (out.token_rewards * x["upstream"]).sum() + out.rewards.sum()
    return (*out, *torch.autograd.grad(loss, (x["hidden"], x["weight"])))


def _fresh_gpu_values(trial: int) -> dict:
    """New values of _gpu_inputs' shapes, offsets included."""
    first = 20 * trial
    return dict(hidden=torch.randn(300, 256, device="cuda", dtype=torch.bfloat16), weight=torch.randn(256, device="cuda"),
                cu_seqlens=torch.tensor([0, first, 120, 120, 300], device="cuda"),
                seq_lens=torch.tensor([first, 100 - first, 0, 150 + trial], device="cuda"),
                response_start=torch.randint(-2, 60, (4,), device="cuda"), upstream=torch.randn(300, device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_varlen_cuda_graph_capture_and_replay(backend: str) -> None:
    """Forward and backward of the packed op, device offsets, captured in one CUDA graph (no host read is allowed
    during capture); replays on new values, offsets included, equal eager calls."""
    _require_gpu_backend(backend)
    static = _gpu_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, the allocator settles) off the capture
        for _ in range(2):
            _gpu_step(static, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _gpu_step(static, backend)

    for trial in range(3):
        fresh = _fresh_gpu_values(trial)
        with torch.no_grad():
            for name, value in fresh.items():
                static[name].copy_(value)
        graph.replay()
        expected = _gpu_step(static, backend)
        for got, want in zip(captured, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_varlen_compiled_on_gpu(backend: str) -> None:
    """fullgraph=True on CUDA tensors with device offsets: the uncompiled op's outputs and gradients."""
    _require_gpu_backend(backend)
    torch._dynamo.reset()
    compiled = torch.compile(_op(backend), fullgraph=True)
    x = _gpu_inputs()
    for got, want in zip(_gpu_step(x, backend, compiled), _gpu_step(x, backend)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
def test_bad_device_offsets_in_a_captured_graph_fail_at_the_next_sync(backend: str) -> None:
    """A graph captured on good offsets and replayed on offsets past the end of hidden fails with a device-side
    assertion at the next synchronisation (in a child process: the assertion ends its CUDA context)."""
    _require_gpu_backend(backend)
    script = textwrap.dedent(f"""
        import torch, red_kernels
        hidden = torch.randn(64, 32, device="cuda")
        weight = torch.randn(32, device="cuda")
        cu = torch.tensor([0, 30, 60], device="cuda")

        def step():
            return red_kernels.redistribute_varlen(hidden, weight, cu_seqlens=cu, response_start=1,
                                                   backend={backend!r})

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        print("good offsets replayed")
        cu.copy_(torch.tensor([0, 30, 65], device="cuda"))  # past the 64 tokens
        graph.replay()
        torch.cuda.synchronize()
        print("bad offsets replayed without an error")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "good offsets replayed" in run.stdout, run.stderr
    assert run.returncode != 0 and "bad offsets replayed" not in run.stdout, run.stdout
    assert "device-side assert" in run.stderr, run.stderr
