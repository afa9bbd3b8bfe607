"""Builds red_kernels._C: the op schema and CPU kernel always, the CUDA kernel when possible.

Switches (docs/spec.md section 4):
  RED_KERNELS_SKIP_CUDA=1    never build the CUDA sources
  RED_KERNELS_FORCE_CUDA=1   a missing CUDA toolkit (or a CPU-only torch) is an error
  TORCH_CUDA_ARCH_LIST       architectures; with no visible GPU the default is "8.0;9.0+PTX"
  MAX_JOBS                   parallel compile jobs (default 2: one nvcc job needs several GiB)

Needs setuptools >= 77 (the PEP 639 license string in pyproject.toml), except for `python setup.py build_ext
--inplace`, which builds the extension alone with any setuptools from 64 on (what `make test-gpu` runs).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

import setuptools
from setuptools import setup

# pyproject.toml's license is an SPDX expression (PEP 639), read from setuptools 77 on; older ones stop
# with "project.license must be valid exactly by one definition". A --no-build-isolation build uses the
# environment's setuptools whatever build-system.requires says, so say what is needed here. The one thing an
# older setuptools (64 on) may still do is build the extension in place (`setup.py build_ext --inplace`, what
# `make test-gpu` runs with the GPU machine's own python): that needs no project metadata, and is done below
# without reading pyproject.toml.
_SETUPTOOLS = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
_EXTENSION_ONLY = _SETUPTOOLS < (77, 0)
if _EXTENSION_ONLY and [arg for arg in sys.argv[1:] if not arg.startswith("-")] != ["build_ext"]:
    sys.exit(f"red-kernels needs setuptools >= 77 to build (PEP 639 license metadata), found "
             f"{setuptools.__version__}: pip install 'setuptools>=77' (with an older one only "
             f"`python setup.py build_ext --inplace`, the extension alone, works)")

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
os.environ.setdefault("MAX_JOBS", "2")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit behind the nvcc on PATH, also when that nvcc is a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as script:
                head = script.read(4096).decode("utf-8", "ignore")
            candidates += [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    return next((path for path in candidates if _is_toolkit(path)), None)


if os.environ.get("RED_KERNELS_SKIP_CUDA") != "1":
    _home = _find_cuda_home()
    if _home:
        os.environ["CUDA_HOME"] = _home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda() -> bool:
    if os.environ.get("RED_KERNELS_SKIP_CUDA") == "1":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None or not _is_toolkit(cpp_extension.CUDA_HOME):
        reasons.append("no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if reasons and os.environ.get("RED_KERNELS_FORCE_CUDA") == "1":
        raise RuntimeError("RED_KERNELS_FORCE_CUDA=1 but the CUDA kernel cannot be built: " + "; ".join(reasons))
    return not reasons


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header code: without OpenMP here it silently runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(here, "csrc")]
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "red_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags)

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    macros = [("RED_KERNELS_WITH_CUDA", "1"), ("RED_KERNELS_CUDA_ARCH_LIST", f'"{arch_list}"')]
    nvcc_flags = ["-O3", "--Werror", "all-warnings", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "red_kernels._C",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


_COMMANDS = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

if _EXTENSION_ONLY:
    # setup() would read pyproject.toml's [project] table, which this setuptools rejects; a bare Distribution
    # holding the extension alone never reads it.
    from setuptools.dist import Distribution

    _dist = Distribution({"name": "red-kernels", "ext_modules": [_extension()], "cmdclass": _COMMANDS,
                          "script_name": os.path.basename(sys.argv[0]), "script_args": sys.argv[1:]})
    if _dist.parse_command_line():
        _dist.run_commands()
else:
    setup(ext_modules=[_extension()], cmdclass=_COMMANDS)
