"""Per-step metrics: one JSON line per step in ``metrics.jsonl``, and the scalars in TensorBoard and/or
Weights & Biases (``run.report_to``)."""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

from red_ppo.config import ConfigError


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def import_wandb(report_to: list[str]):
    """The ``wandb`` module when ``report_to`` names it (None otherwise); a ConfigError when it is not installed,
    so that a run fails before loading any model."""
    if "wandb" not in report_to:
        return None
    try:
        return importlib.import_module("wandb")
    except ImportError as error:
        raise ConfigError(f"run.report_to: expected wandb to be installed for {list(report_to)!r}, got 'import "
                          f"wandb' failing ({error}); pip install wandb, or remove wandb from run.report_to") \
            from None


class MetricsLog:
    """Appends to ``metrics.jsonl``, TensorBoard (``tb/``) and W&B as ``report_to`` says; on resume, drops
    lines after the checkpoint. ``config`` is the run's configuration, given to ``wandb.init``."""

    def __init__(self, folder: Path, resume_step: int | None, report_to: list[str] = ("tensorboard",),
                 config: dict | None = None, wandb_project: str | None = None) -> None:
        folder = Path(folder)
        self.path = folder / "metrics.jsonl"
        if resume_step is not None:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        self.handle = open(self.path, "a")
        self.writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(folder / "tb"), purge_step=purge)
        self.wandb = import_wandb(report_to)
        if self.wandb is not None:
            self.wandb.init(project=wandb_project or "red-ppo", name=folder.name, config=config, dir=str(folder))

    def write(self, row: dict) -> None:
        # JSON has no NaN: a metric that is undefined for this step (e.g. explained variance) is null.
        self.handle.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        self.handle.flush()
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
