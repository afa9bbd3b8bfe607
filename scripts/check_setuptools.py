"""Build the package metadata with the oldest and the newest setuptools, as `make install` does; build the
extension in place with an old one, as `make test-gpu` does.

`pip install --no-build-isolation` (the Makefile's way, and the usual way to build a torch
extension) builds with whatever setuptools the environment has, not the one
`build-system.requires` names. So for each version given, this makes a throwaway venv with
exactly that setuptools, lets it import torch from the project's venv (a .pth file, so the
throwaway's own setuptools comes first), and runs the PEP 517 metadata hook on this checkout
(no compiling). A version below the declared minimum must fail with setup.py's message naming
the minimum, not setuptools' own validation error.

    python scripts/check_setuptools.py --torch-site .venv/lib/python3.11/site-packages 77.0.1 newest \\
        --too-old 65.5.0 76.1.0

(77.0.1 is the oldest 77 release the index has; 65.5.0 is what a Python 3.11 venv starts with.)

`make test-gpu` runs `setup.py build_ext --inplace` with the GPU machine's own python, whose setuptools
nobody here knows. setup.py builds the extension alone, without reading pyproject.toml's metadata, when its
setuptools is older than 77; `--inplace-build 64.0.0` checks that path for real: a throwaway venv with that
setuptools compiles the extension (the CPU kernel: the path does not depend on which sources are compiled,
and the CUDA sources would add minutes) in a copy of the sources, then loads it and calls the op.

Prints one line per version and a closing "N passed, N failed"; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = ("import os, sys, tempfile, setuptools, setuptools.build_meta as meta\n"
        "out = tempfile.mkdtemp()\n"
        "name = meta.prepare_metadata_for_build_wheel(out)\n"
        "text = open(os.path.join(out, name, 'METADATA')).read()\n"
        "print(setuptools.__version__, name, [l for l in text.splitlines() if l.startswith('License')])\n")


def throwaway(where: str, version: str, torch_site: str) -> str:
    """A venv in ``where`` with exactly that setuptools, borrowing torch from ``torch_site``; its python."""
    venv.create(where, with_pip=True)
    python = os.path.join(where, "bin", "python")
    wanted = ["--upgrade", "setuptools"] if version == "newest" else [f"setuptools=={version}"]
    subprocess.run([python, "-m", "pip", "install", "-q", *wanted, "wheel"], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "borrowed-torch.pth"), "w") as pth:
        pth.write(os.path.abspath(torch_site) + "\n")
    return python


def metadata(version: str, torch_site: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as where:
        python = throwaway(where, version, torch_site)
        env = {**os.environ, "RED_KERNELS_SKIP_CUDA": "1"}
        return subprocess.run([python, "-c", HOOK], cwd=ROOT, env=env, capture_output=True, text=True)


CALL = ("import torch, red_kernels\n"
        "from red_kernels import redistribute\n"
        "assert red_kernels.__file__.startswith(%r), red_kernels.__file__\n"
        "assert red_kernels.build_info()['cpu_kernel'], red_kernels.build_info()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "hidden, weight = torch.randn(3, 7, 5, generator=g), torch.randn(5, generator=g)\n"
        "mask = torch.ones(3, 7, dtype=torch.bool); mask[1, 5:] = False\n"
        "outs = [redistribute(hidden, weight, 0.5, attention_mask=mask, response_start=2, backend=b)\n"
        "        for b in ('cpu', 'eager')]\n"
        "for name in ('scores', 'rewards', 'token_rewards', 'last_index'):\n"
        "    torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name))\n"
        "print('built with setuptools', __import__('setuptools').__version__, '; the cpu op equals eager')\n")


def inplace_build(version: str, torch_site: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as where:
        python = throwaway(os.path.join(where, "venv"), version, torch_site)
        tree = os.path.join(where, "src")
        os.makedirs(tree)
        for name in ("setup.py", "pyproject.toml"):
            shutil.copy(os.path.join(ROOT, name), tree)
        shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
        shutil.copytree(os.path.join(ROOT, "red_kernels"), os.path.join(tree, "red_kernels"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        env = {**os.environ, "RED_KERNELS_SKIP_CUDA": "1", "RED_KERNELS_FORCE_CUDA": "0"}
        build = subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                               capture_output=True, text=True)
        if build.returncode != 0:
            return build
        return subprocess.run([python, "-c", CALL % os.path.join(tree, "red_kernels")], cwd=tree, env=env,
                              capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="setuptools versions that must build the metadata ('newest': "
                                                    "the newest the index has)")
    parser.add_argument("--too-old", nargs="*", default=[], help="versions that must be refused by name")
    parser.add_argument("--inplace-build", nargs="*", default=[], help="versions that must build the extension in "
                                                                        "place (setup.py build_ext --inplace)")
    parser.add_argument("--torch-site", required=True, help="site-packages of a venv that has torch")
    args = parser.parse_args()
    passed = failed = 0
    for version in args.versions + args.too_old:
        result = metadata(version, args.torch_site)
        output = (result.stdout + result.stderr).strip()
        if version in args.versions:
            ok = result.returncode == 0 and "License-Expression: Apache-2.0" in result.stdout
            what = f"setuptools {version} builds the metadata"
        else:
            ok = result.returncode != 0 and "needs setuptools >= 77" in output
            what = f"setuptools {version} is refused with a message naming the minimum"
        passed, failed = passed + ok, failed + (not ok)
        last = (result.stdout.strip() if ok and version in args.versions else output) or "(no output)"
        print(f"{'PASS' if ok else 'FAIL'} {what}: {last.splitlines()[-1]}")
        if not ok:
            print("    " + "\n    ".join(output.splitlines()[-15:]))
    for version in args.inplace_build:
        result = inplace_build(version, args.torch_site)
        output = (result.stdout + result.stderr).strip()
        ok = result.returncode == 0 and "the cpu op equals eager" in result.stdout
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} setuptools {version} builds the extension in place: "
              f"{(output or '(no output)').splitlines()[-1]}")
        if not ok:
            print("    " + "\n    ".join(output.splitlines()[-15:]))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
