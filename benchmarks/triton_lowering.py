"""Compile a Triton launch for a real GPU without one, as the JIT specialises it, and read the result.

`compile_launch` binds a `triton_kernels.Launch`'s arguments with the JIT's own binder (16-byte
alignment and divisibility hints on pointers and ints, ints equal to 1 as constants), lowers it for
the target with Triton's bundled ptxas, and reads registers, spills and shared memory with the
bundled cuobjdump and the main loop's instructions from the SASS. Used by
tests/test_gpu_lowering.py and benchmarks/gpu_model.py (a test and a benchmark tool, so it lives here,
outside the installed package); needs no GPU and no CUDA toolkit.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)")


# The GPU the model and the occupancy checks assume (H100 SXM).
H100 = {"name": "H100 SXM (model)", "sms": 132, "copy_bytes_per_s": 3.0e12, "latency_s": 700e-9,
        "registers_per_sm": 65536, "shared_per_sm": 228 * 1024, "shared_reserved_per_block": 1024,
        "threads_per_sm": 2048, "blocks_per_sm": 32}


def resident_blocks(registers: int, shared_bytes: int, threads: int, gpu: dict = H100) -> int:
    """Blocks of one kernel resident on one SM: min over registers (allocated per warp in units of 256),
    shared memory (plus the per-block reservation), threads and the block limit."""
    import math

    warps = math.ceil(threads / 32)
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = gpu["registers_per_sm"] // (per_warp * warps)
    by_shared = gpu["shared_per_sm"] // (shared_bytes + gpu["shared_reserved_per_block"])
    by_threads = gpu["threads_per_sm"] // threads
    return max(0, min(by_registers, by_shared, by_threads, gpu["blocks_per_sm"]))


@dataclasses.dataclass
class Lowered:
    name: str
    registers: int
    stack_bytes: int  # spills land here (and in local memory)
    local_bytes: int
    shared_bytes: int  # static + dynamic, as the kernel launches
    num_warps: int
    ptx: str
    sass: str
    loop: list[str]  # SASS instructions of the innermost backward-branching loop with the most instructions

    def resident_per_sm(self, gpu: dict = H100) -> int:
        return resident_blocks(self.registers, self.shared_bytes, 32 * self.num_warps, gpu)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    def count(self, opcode: str, where: str = "loop") -> int:
        """Instructions whose opcode starts with ``opcode`` (e.g. "LDG.E.128") in the loop or the whole kernel."""
        lines = self.loop if where == "loop" else [m.group(2) for m in _INSTRUCTION.finditer(self.sass)]
        return sum(1 for line in lines if _opcode(line).startswith(opcode))


def _opcode(instruction: str) -> str:
    words = instruction.split()
    if words and words[0].startswith("@"):  # predicate
        words = words[1:]
    return words[0] if words else ""


def _main_loop(sass: str) -> list[str]:
    """The body of the largest loop: the instructions from a backward branch's target to the branch."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(sass)]
    best = []
    for index, (address, text) in enumerate(instructions):
        target = _BRANCH.search(text)
        if target and int(target.group(1), 16) < address:
            first = int(target.group(1), 16)
            loop = [body for at, body in instructions[:index + 1] if at >= first]
            if len(loop) > len(best):
                best = loop
    return best


def _bind(launch, backend):
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **launch.options(), "debug": False}
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_launch(launch, arch: int = 90, **extra_options) -> Lowered:
    """``launch`` compiled for sm_``arch``; ``extra_options`` go to triton.compile (e.g. maxnreg)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = _bind(launch, backend)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options={**options.__dict__, **extra_options})
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", path], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", path], check=True,
                              capture_output=True, text=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if resources is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{usage}")
    registers, stack, static_shared, local = (int(v) for v in resources.groups())
    return Lowered(name=launch.kernel.fn.__name__, registers=registers, stack_bytes=stack, local_bytes=local,
                   shared_bytes=max(static_shared, compiled.metadata.shared), num_warps=launch.num_warps,
                   ptx=compiled.asm["ptx"], sass=sass, loop=_main_loop(sass))
