"""Checkpoints written atomically (a temporary file, fsync, then rename), holding everything
needed to continue a run exactly: models, optimisers, schedulers, the KL controller,
the prompt sampler and every RNG state. Beside each ``step-NNNNNN.pt``, the policy as a
Hugging Face folder ``step-NNNNNN-hf/`` (``save_pretrained`` of the model and its tokenizer),
written to a temporary folder and renamed, and pruned with the ``.pt`` files."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

NAME = re.compile(r"^step-(\d{6,})\.pt$")
PRETRAINED_NAME = re.compile(r"^step-(\d{6,})-hf$")
PRETRAINED_TMP = re.compile(r"^\.step-\d{6,}-hf\.(tmp|old)-\d+$")  # left by a crash during a save


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:06d}.pt"


def pretrained_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:06d}-hf"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := NAME.match(name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _fsync_folder(folder: Path) -> None:
    try:  # make a rename inside ``folder`` durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj, path: Path) -> None:
    """torch.save to ``path`` so that a crash leaves either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_folder(path.parent)


def save_pretrained_atomic(path: Path, *parts) -> None:
    """``part.save_pretrained`` of each of ``parts`` (a model, its tokenizer) into the folder ``path``, so
    that a crash leaves the old folder or the complete new one (under ``.NAME.old-PID`` if it came
    between the two renames that replace an existing folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    try:
        for part in parts:
            part.save_pretrained(tmp)
        for name in os.listdir(tmp):
            if (tmp / name).is_file():
                with open(tmp / name, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
    _fsync_folder(path.parent)


def save_checkpoint(folder: Path, step: int, state: dict, keep: int, pretrained: tuple = ()) -> Path:
    """``state`` as ``step-NNNNNN.pt`` (what --resume reads) and, given ``pretrained`` (the policy and its
    tokenizer), their ``save_pretrained`` folder ``step-NNNNNN-hf`` written first; then only the newest
    ``keep`` of each remain."""
    folder, path = Path(folder), checkpoint_path(folder, step)
    if pretrained:
        save_pretrained_atomic(pretrained_path(folder, step), *pretrained)
    atomic_save(state, path)
    kept = list_checkpoints(folder)[-keep:]
    steps = {number for number, _ in kept}
    for name in os.listdir(folder):
        if (m := NAME.match(name)) and int(m.group(1)) not in steps:
            (folder / name).unlink(missing_ok=True)
        elif ((m := PRETRAINED_NAME.match(name)) and int(m.group(1)) not in steps) or PRETRAINED_TMP.match(name):
            shutil.rmtree(folder / name, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict:
    # The checkpoint holds Python RNG tuples and config dicts, so it is not weights_only.
    return torch.load(path, map_location="cpu", weights_only=False)
