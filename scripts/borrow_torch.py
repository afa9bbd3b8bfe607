"""Let another venv use this interpreter's torch instead of installing its own.

    .venv/bin/python scripts/borrow_torch.py .venv-trl

A CUDA build of torch takes about 6 GB with the NVIDIA libraries it depends on; the TRL and verl venvs of
``make test-trl`` and ``make test-verl`` each installed their own copy of the very torch ``.venv`` has, and a
CI machine ran out of disk on the third. Instead, this puts into the target venv a directory of symlinks to
torch and the distributions it requires (its requirement closure here, extras and markers evaluated), and a
``.pth`` file that appends that directory to the venv's ``sys.path``. The venv's own site-packages stays first,
so a package the target installs itself (a transformers that verl pins, say) wins over a borrowed one, and pip
sees the borrowed torch as installed and installs no other.

The directory is rebuilt on every call, so it follows the source venv when that is rebuilt; it lies inside the
target venv, so ``make clean`` leaves it alone.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FARM = "borrowed-torch"
PTH = "borrowed-torch.pth"


def closure(root: str) -> list[metadata.Distribution]:
    """``root`` and every distribution it requires here, following extras and environment markers."""
    found: dict[str, metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        seen = extras_seen.setdefault(key, set())
        if key in found and extras <= seen:
            continue
        seen |= extras
        try:
            dist = found.get(key) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform's markers asked for but nobody installed
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [{"extra": e} for e in seen] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
                todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


def top_levels(dist: metadata.Distribution) -> set[str]:
    """The names a distribution puts directly into site-packages (packages, modules, its dist-info)."""
    names = set()
    for path in dist.files or []:
        first = path.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue  # console scripts outside site-packages; bytecode and .pth files are not borrowed
        names.add(first)
    return names


def site_packages(python: str) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", help="the venv that borrows this interpreter's torch")
    args = parser.parse_args()
    python = os.path.join(args.venv, "bin", "python")
    if not os.access(python, os.X_OK):
        sys.exit(f"borrow_torch: venv must be a venv with bin/python; got {args.venv!r}")
    target_site = site_packages(python)
    farm = os.path.join(os.path.abspath(args.venv), FARM)
    shutil.rmtree(farm, ignore_errors=True)
    os.makedirs(farm)
    dists = closure("torch")
    for dist in dists:
        base = str(dist.locate_file(""))
        for name in sorted(top_levels(dist)):
            link = os.path.join(farm, name)
            if not os.path.lexists(link) and os.path.lexists(os.path.join(base, name)):
                os.symlink(os.path.join(base, name), link)
    with open(os.path.join(target_site, PTH), "w") as pth:
        pth.write(farm + "\n")
    print(f"borrow_torch: {args.venv} borrows torch {metadata.version('torch')} and {len(dists) - 1} "
          f"distributions it requires from {sys.prefix}")


if __name__ == "__main__":
    main()
