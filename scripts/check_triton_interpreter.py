"""Can this environment's Triton interpreter run the kernels' loops? `make test-triton` asks first.

Triton 3.6's interpreter turns a kernel's integer argument into a one-element array and calls
int() on it for `range(0, H, BLOCK_H)`; NumPy 2.4 refuses that ("only 0-dimensional arrays can
be converted to Python scalars"), so every interpreted kernel fails and the suite would report
hundreds of failures that say nothing about the kernels. This runs one tiny kernel with such a
loop and, when the interpreter cannot, stops with the versions to use instead.

Checked here (CPU, interpreter): triton 3.6.0 + NumPy 2.4.6 fails; triton 3.6.0 + NumPy 2.3.5
and triton 3.8.0 + NumPy 2.4.6 work.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("check_triton_interpreter: set TRITON_INTERPRET=1 (before triton is imported)", file=sys.stderr)
        return 2
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def loop_kernel(out_ptr, n, BLOCK: tl.constexpr):
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):  # a runtime bound, as in red_kernels/triton_kernels.py
            total += (start + tl.arange(0, BLOCK) < n).to(tl.float32)
        tl.store(out_ptr + tl.arange(0, BLOCK), total)

    out = torch.empty(4)
    versions = f"triton {triton.__version__} with NumPy {numpy.__version__}"
    try:
        loop_kernel[(1,)](out, 10, BLOCK=4)
    except Exception as error:  # the interpreter wraps the TypeError in its own error type
        print(f"The Triton interpreter cannot run a loop over a kernel argument with {versions}: {error!r}.\n"
              f"Triton 3.6's interpreter needs NumPy < 2.4 (pip install 'numpy<2.4'), or use triton >= 3.8 "
              f"(pip install 'triton>=3.8'), which runs with NumPy 2.4.", file=sys.stderr)
        return 1
    if out.tolist() != [3.0, 3.0, 2.0, 2.0]:
        print(f"The Triton interpreter ran the loop wrongly with {versions}: {out.tolist()}", file=sys.stderr)
        return 1
    print(f"Triton interpreter: loops over kernel arguments run with {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
