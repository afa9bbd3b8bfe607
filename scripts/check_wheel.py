"""Install a built wheel into a throwaway venv and call the op from outside the source tree.

The venv borrows torch (and the other dependencies) from the interpreter running this
script through a .pth file, so nothing is downloaded; the package itself must come from the
wheel, which this checks. Usage: python scripts/check_wheel.py DIST_DIR
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile

SMOKE = r"""
import os, sys, torch
import red_kernels
from red_kernels import redistribute, available_backends, build_info
root = os.environ["WHEEL_VENV"]
assert red_kernels.__file__.startswith(root), f"red_kernels came from {red_kernels.__file__}, not the wheel"
info = build_info()
assert info["cpu_kernel"], f"the wheel's _C did not load: {red_kernels._library.EXTENSION_ERROR}"
if os.environ.get("RED_KERNELS_EXPECT_CUDA") == "1":
    assert info["cuda"], "the wheel was built without the CUDA kernel"
import importlib.resources as resources
assert resources.files("red_kernels").joinpath("py.typed").is_file(), "py.typed missing from the wheel"
args = (torch.randn(2, 5, 8, dtype=torch.bfloat16), torch.randn(8), 0.5)
kwargs = dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), response_start=2)
fused, eager = redistribute(*args, **kwargs, backend="cpu"), redistribute(*args, **kwargs, backend="eager")
for got, want in zip(fused, eager):
    torch.testing.assert_close(got, want)
from red_ppo.config import default_config_path
assert default_config_path().is_file(), "red_ppo's demo config is missing from the wheel"
from red_ppo.diagnose import load_validation
assert load_validation(), "red_ppo's diagnose_validation.json (the verdict's thresholds) is missing from the wheel"
print("wheel ok:", info, available_backends("cpu"))
"""


def main() -> None:
    dist = sys.argv[1] if len(sys.argv) > 1 else "dist"
    wheels = glob.glob(os.path.join(dist, "red_kernels-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"check_wheel: expected one red_kernels wheel in {dist}, found {wheels}")
    with tempfile.TemporaryDirectory(prefix="red-wheel-") as root:
        venv = os.path.join(root, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "borrowed_dependencies.pth"), "w") as pth:
            pth.write(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], check=True)
        env = {**os.environ, "WHEEL_VENV": venv}
        subprocess.run([python, "-c", SMOKE], check=True, cwd=root, env=env)


if __name__ == "__main__":
    main()
