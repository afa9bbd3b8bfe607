"""Check an installation once, on every device and backend it has: `python -m red_kernels.check`.

For each available device (the CPU, and each visible CUDA GPU) and each backend usable there:
  1. the forward and the backward against a float64 evaluation of the spec on the test suite's
     own random and awkward cases (red_kernels._cases: 126 forward and 126 gradient cases; every
     dtype, H = 1 ... 4097, T = 1 ... 63, six paddings, strided and transposed hidden), and the
     same for the packed op, redistribute_varlen, on each backend that has it (21 packs: empty
     sequences, N = 1 ... 40, in-slot and tail padding, carried baselines, int32/int64 offsets),
  2. on a GPU, CUDA-graph capture of the padded op, replayed on new inputs and compared with a plain
     call (the packed op reads its offsets on the host to check them, so it is not capturable),
  3. a bandwidth benchmark (20 s per device in all, split over its backends) against a device copy.
Prints one table and exits 1 on any mismatch (2 if nothing could run). `--quick` takes every 9th
padded case, every 3rd packed one and a 1-second benchmark (what CI runs on CPU, with the Triton interpreter when
TRITON_INTERPRET=1 is set before the import).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import red_kernels
from red_kernels import _cases

BENCH_SHAPE = {"cuda": (8, 1024, 4096), "cpu": (4, 512, 1024)}


def _cases_for(quick: bool) -> list[_cases.Case]:
    cases = _cases.forward_cases()
    return cases[::9] if quick else cases


def _varlen_cases_for(quick: bool) -> list[_cases.VarlenCase]:
    cases = _cases.varlen_cases()
    return cases[::3] if quick else cases


def _padded_checks(case: _cases.Case, backend: str, device: str):
    inputs = _cases.make_inputs(case)
    on_device = {name: _cases.to_device(value, device) for name, value in inputs.items()}
    yield "forward", lambda: _cases.assert_matches(
        _cases.redistribute_op(on_device["hidden"], on_device["weight"], on_device["bias"], on_device, backend),
        inputs)
    yield "backward", lambda: _cases.assert_gradients_match(case, backend, device, inputs)


def _varlen_checks(case: _cases.VarlenCase, backend: str, device: str):
    inputs = _cases.make_varlen_inputs(case)
    on_device = {name: _cases.to_device(value, device) for name, value in inputs.items()}
    yield "varlen forward", lambda: _cases.assert_varlen_matches(
        _cases.redistribute_varlen_op(on_device["hidden"], on_device["weight"], on_device["bias"], on_device,
                                      backend), inputs)
    yield "varlen backward", lambda: _cases.assert_varlen_gradients_match(case, backend, device, inputs)


def _check_cases(backend: str, device: str, cases: list, checks_of=_padded_checks) -> tuple[int, int, float, list[str]]:
    """(checks passed, checks run, worst error / bound, failure messages): forward and backward per case."""
    passed, run, failures = 0, 0, []
    with _cases.track_worst_ratio() as ratios:
        for case in cases:
            for kind, check in checks_of(case, backend, device):
                run += 1
                try:
                    check()
                    passed += 1
                except Exception as error:  # a crash is a failed case too, reported with its message
                    failures.append(f"{backend} on {device}, {kind} {case.id}: {type(error).__name__}: {error}")
    return passed, run, max(ratios, default=0.0), failures


def _check_graph_capture(backend: str, device: str) -> str:
    """Capture the op in a CUDA graph, replay it on new inputs, compare with a plain call."""
    generator = torch.Generator(device=device).manual_seed(7)
    B, T, H = 4, 96, 512
    hidden = torch.randn(B, T, H, device=device, dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(H, device=device, generator=generator) / H**0.5
    mask = torch.ones(B, T, dtype=torch.uint8, device=device)
    mask[1, 80:] = 0
    start = torch.tensor([3, 10, 0, 95], device=device)

    def call():
        return red_kernels.redistribute(hidden, weight, 0.5, attention_mask=mask, response_start=start,
                                        backend=backend)

    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            call()  # warm-up outside the graph: compiles, allocates
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        hidden.copy_(torch.randn(B, T, H, device=device, dtype=torch.bfloat16, generator=generator))
        graph.replay()
        torch.cuda.synchronize(device)
        plain = call()
        for name, a, b in zip(plain._fields, captured, plain):
            if not torch.equal(a, b):
                return f"FAIL ({name} differs after replay)"
        return "ok"
    except Exception as error:
        return f"FAIL ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def _seconds_per_call(fn, device: str, budget_s: float) -> float:
    fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda *a: None)
    sync()
    calls, begin = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls % 8 == 0:
            sync()
            if time.perf_counter() - begin >= budget_s:
                break
    sync()
    return (time.perf_counter() - begin) / calls


def _bandwidth(backends: list[str], device: str, budget_s: float) -> dict:
    """GB/s of hidden read by each backend's forward, and a device copy's GB/s (reads + writes)."""
    B, T, H = BENCH_SHAPE["cuda" if device.startswith("cuda") else "cpu"]
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, generator=generator).to(torch.bfloat16)
    weight = torch.randn(H, device=device, generator=generator) / H**0.5
    bias = torch.full((1,), 0.1, device=device)
    mask = torch.ones(B, T, dtype=torch.uint8, device=device)
    start = torch.full((B,), T // 4, dtype=torch.int64, device=device)
    target = torch.empty_like(hidden)
    share = budget_s / (len(backends) + 1)
    gigabytes = hidden.numel() * hidden.element_size() / 1e9
    with torch.inference_mode():
        copy = 2 * gigabytes / _seconds_per_call(lambda: target.copy_(hidden), device, share)
        result = {"copy": copy, "shape": (B, T, H)}
        for name in backends:
            seconds = _seconds_per_call(lambda: red_kernels.redistribute(
                hidden, weight, bias, attention_mask=mask, response_start=start, backend=name), device, share)
            result[name] = gigabytes / seconds
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="red-kernels-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every 9th case and a 1-second benchmark")
    parser.add_argument("--bench-seconds", type=float, default=None, help="benchmark time per device (default 20)")
    parser.add_argument("--devices", nargs="+", default=None, help="e.g. cpu cuda:0 (default: all available)")
    args = parser.parse_args(argv)
    budget = args.bench_seconds if args.bench_seconds is not None else (1.0 if args.quick else 20.0)
    devices = args.devices or ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    cases, varlen_cases = _cases_for(args.quick), _varlen_cases_for(args.quick)
    info = red_kernels.build_info()
    print(f"red-kernels {info['version']}, torch {info['torch']}, triton {info['triton']}, "
          f"CUDA kernels built: {info['cuda']} {info['cuda_arch_list']}, C++ CPU kernel: {info['cpu_kernel']}")

    rows, failures = [], []
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
        backends = list(red_kernels.available_backends(device))
        packed_backends = red_kernels.available_backends(device, varlen=True)
        for backend in backends:
            passed, run, worst, failed = _check_cases(backend, device, cases)
            failures += failed
            varlen = "-"
            if backend in packed_backends:
                v_passed, v_run, v_worst, v_failed = _check_cases(backend, device, varlen_cases, _varlen_checks)
                failures += v_failed
                worst = max(worst, v_worst)
                varlen = f"{v_passed}/{v_run}"
            graph = _check_graph_capture(backend, device) if device.startswith("cuda") else "-"
            if graph.startswith("FAIL"):
                failures.append(f"{backend} on {device}: CUDA graph capture {graph}")
            rows.append({"device": f"{device} ({name})", "backend": backend, "passed": passed, "run": run,
                         "varlen": varlen, "worst": worst, "graph": graph})
        speeds = _bandwidth(backends, device, budget)
        for row in rows:
            if row["device"].startswith(f"{device} "):
                row["GB/s"] = speeds[row["backend"]]
                row["copy"] = speeds["copy"]

    print(f"{'device':34} {'backend':8} {'cases passed':>13} {'varlen':>7} {'max err/bound':>13} {'graph':>6} "
          f"{'GB/s':>8} {'copy GB/s':>9} {'of copy':>7}")
    for row in rows:
        # A copy moves 2 bytes per byte of hidden; the op reads each once: fraction = GB/s / (copy GB/s / 2).
        fraction = row["GB/s"] / (row["copy"] / 2)
        print(f"{row['device'][:34]:34} {row['backend']:8} {row['passed']:6d}/{row['run']:<6d} {row['varlen']:>7} "
              f"{row['worst']:13.3f} {row['graph'][:6]:>6} {row['GB/s']:8.1f} {row['copy']:9.1f} {fraction:7.2f}")
    print(f"benchmark: forward at bf16 B,T,H = {BENCH_SHAPE['cuda']} on GPUs, {BENCH_SHAPE['cpu']} on the CPU, "
          f"{budget:.0f} s per device; max err/bound <= 1 passes")
    if not rows:
        print("red-kernels-check: no backend could run")
        return 2
    if failures:
        print(f"\n{len(failures)} FAILED:")
        for line in failures[:50]:
            print("  " + line.splitlines()[0][:300])
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
