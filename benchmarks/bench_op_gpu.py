"""The fused op on a GPU: `cuda` and `triton` against eager, next to a device-to-device copy.

For B in {8, 32}, T in {1024, 4096}, H in {2048, 4096, 8192}, bfloat16 and float32, side by
side in one run (triton.testing.do_bench: L2 flushed before every call, median with the 20th
and 80th percentiles):
  cuda    red_kernels.redistribute(..., backend="cuda"), the whole public call
  cuda_varlen  red_kernels.redistribute_varlen(..., backend="cuda") on the same tokens packed: hidden as
          [B * T, H], one slot of T per row (the whole public call, its host check of the offsets included)
  triton  red_kernels.redistribute(..., backend="triton")
  eager   red_kernels.redistribute(..., backend="eager"), the plain PyTorch reference
  compile red_kernels.reference.redistribute_reference through torch.compile(dynamic=False) on
          the same normalised inputs: the Triton code Inductor writes for the reference, the peer a
          user would pick instead of a custom kernel; compiled and warmed before do_bench times it
  copy    hidden.copy_ into a second buffer: it reads and writes every byte, so the copy's
          bandwidth is 2 * bytes / time, and `floor` = bytes / that bandwidth = copy time / 2 is
          the time to read hidden once at the bandwidth this GPU reaches in practice.
Every position is a real token (no padding) so every kernel reads all of hidden, and the inputs are
already in the normalised form (float32 weight and bias tensor, uint8 mask, int64 start), so the
timings hold the kernels and the call's Python overhead, not conversions.
GB/s = bytes of hidden / median time. `triton 2nd launch+call us`: the whole triton call minus its
scores kernel launched alone (the token-rewards launch plus the call's Python overhead).
Targets (issue 3, on an H100): cuda within 1.25x of the floor; bf16 at least 3x faster than eager.
Usage: python benchmarks/bench_op_gpu.py [--B 8 32] [--T 1024 4096] [--H 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

import red_kernels
from red_kernels.reference import redistribute_reference
from timing import record

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLOOR_TARGET = 1.25  # cuda time / floor time, every dtype
EAGER_TARGET = {"bf16": 3.0}  # eager time / cuda time
QUANTILES = [0.5, 0.2, 0.8]


@functools.cache
def compiled_reference():
    return torch.compile(redistribute_reference, dynamic=False)


def timing(fn) -> dict:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, quantiles=QUANTILES)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def bench(B: int, T: int, H: int, dtype_name: str, providers: list[str]) -> dict:
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, T, H, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(H, device="cuda", generator=generator) / H**0.5
    bias = torch.full((1,), 0.1, device="cuda")
    mask = torch.ones(B, T, device="cuda", dtype=torch.uint8)
    start = torch.full((B,), T // 4, device="cuda", dtype=torch.int64)
    copy_target = torch.empty_like(hidden)
    cu_seqlens = torch.arange(0, B * T + 1, T, device="cuda", dtype=torch.int64)

    def run(backend: str):
        if backend == "compile":
            compiled = compiled_reference()
            return lambda: compiled(hidden, weight, bias, mask, start, False)
        if backend == "cuda_varlen":
            packed = hidden.view(B * T, H)
            return lambda: red_kernels.redistribute_varlen(packed, weight, bias, cu_seqlens=cu_seqlens,
                                                           response_start=start, backend="cuda")
        return lambda: red_kernels.redistribute(hidden, weight, bias, attention_mask=mask, response_start=start,
                                                backend=backend)

    gigabytes = hidden.numel() * hidden.element_size() / 1e9
    row = {"B": B, "T": T, "H": H, "dtype": dtype_name, "hidden_GB": gigabytes}
    with torch.inference_mode():
        copy = timing(lambda: copy_target.copy_(hidden))
        row["copy"] = {**copy, "GB_per_s": 2 * gigabytes / (copy["median_ms"] / 1e3)}
        row["floor_ms"] = copy["median_ms"] / 2
        for name in providers:
            fn = run(name)
            for _ in range(3):  # compiles `compile` for this shape and dtype outside the timing
                fn()
            torch.cuda.synchronize()
            result = timing(fn)
            row[name] = {**result, "GB_per_s": gigabytes / (result["median_ms"] / 1e3),
                         "vs_floor": result["median_ms"] / row["floor_ms"]}
    if "triton" in row:  # the scores kernel alone: what the token-rewards launch and the call's overhead add
        from red_kernels import triton_kernels

        outputs = (torch.empty(B, T, device="cuda"), torch.empty(B, device="cuda"), torch.empty(B, T, device="cuda"),
                   torch.empty(B, device="cuda", dtype=torch.int64))
        scores_launch = triton_kernels.forward_launches(hidden, weight, bias, mask, start, False, outputs,
                                                        triton_kernels.sm_count(hidden.device))[0]
        with torch.inference_mode():
            row["triton"]["scores_kernel_ms"] = timing(scores_launch)["median_ms"]
        row["triton"]["rest_of_call_ms"] = row["triton"]["median_ms"] - row["triton"]["scores_kernel_ms"]
    for peer in ("eager", "compile"):
        if peer in row:
            for name in ("cuda", "cuda_varlen", "triton"):
                if name in row:
                    row[name][f"speedup_vs_{peer}"] = row[peer]["median_ms"] / row[name]["median_ms"]
    del hidden, copy_target
    torch.cuda.empty_cache()
    return row


def targets_met(row: dict) -> bool | None:
    if "cuda" not in row:
        return None
    met = row["cuda"]["vs_floor"] <= FLOOR_TARGET
    if row["dtype"] in EAGER_TARGET and "speedup_vs_eager" in row["cuda"]:
        met &= row["cuda"]["speedup_vs_eager"] >= EAGER_TARGET[row["dtype"]]
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--H", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_op_gpu: no CUDA GPU visible")
    usable = red_kernels.available_backends("cuda")
    providers = [name for name in ("cuda", "triton", "eager") if name in usable]
    if "cuda" in usable:
        providers.insert(1, "cuda_varlen")
    if "triton" in usable and not args.no_compile:  # Inductor writes Triton code on a GPU
        providers.append("compile")
    missing = sorted({"cuda", "triton"} - set(usable))
    if missing:
        print(f"bench_op_gpu: not available here, skipped: {missing} (build_info: {red_kernels.build_info()})")

    device = torch.cuda.get_device_name()
    print(f"redistribute on {device}; median ms [p20, p80] and GB/s of hidden; floor = copy time / 2")
    header = f"{'B':>3} {'T':>5} {'H':>5} {'dtype':5} {'copy GB/s':>10} {'floor ms':>9}"
    for name in providers:
        header += f" {name + ' ms':>24} {'GB/s':>6}"
    print(header + f" {'cuda/floor':>10} {'eager/cuda':>10} {'compile/cuda':>12} {'triton 2nd launch+call us':>25}"
                   "  targets")
    rows, failed = [], False
    for B, T, H, dtype_name in itertools.product(args.B, args.T, args.H, args.dtypes):
        row = bench(B, T, H, dtype_name, providers)
        rows.append(row)
        line = f"{B:3d} {T:5d} {H:5d} {dtype_name:5} {row['copy']['GB_per_s']:10.0f} {row['floor_ms']:9.3f}"
        for name in providers:
            r = row[name]
            line += f" {r['median_ms']:8.3f} [{r['p20_ms']:.3f},{r['p80_ms']:.3f}] {r['GB_per_s']:6.0f}"
        cuda = row.get("cuda", {})
        line += f" {cuda.get('vs_floor', float('nan')):9.2f}x {cuda.get('speedup_vs_eager', float('nan')):9.2f}x"
        line += f" {cuda.get('speedup_vs_compile', float('nan')):11.2f}x"
        line += f" {row.get('triton', {}).get('rest_of_call_ms', float('nan')) * 1e3:25.1f}"
        met = targets_met(row)
        failed |= met is False
        line += "  " + {True: "met", False: "NOT met", None: "-"}[met]
        print(line)
    path = record("bench_op_gpu", rows, command="python benchmarks/bench_op_gpu.py", gpu=device,
                  cuda_runtime=torch.version.cuda, build=red_kernels.build_info())
    print(f"recorded in {path}")
    if failed:
        print(f"some targets were not met on this run (cuda <= {FLOOR_TARGET}x floor; bf16 >= 3x eager)")


if __name__ == "__main__":
    main()
