"""Per-step metrics: one JSON line per step in ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsLog:
    """Appends to ``metrics.jsonl`` and TensorBoard; on resume, drops lines after the checkpoint."""

    def __init__(self, folder: Path, resume_step: int | None, tensorboard: bool = True) -> None:
        self.path = Path(folder) / "metrics.jsonl"
        if resume_step is not None:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        self.handle = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(Path(folder) / "tb"), purge_step=purge)

    def write(self, row: dict) -> None:
        # JSON has no NaN: a metric that is undefined for this step (e.g. explained variance) is null.
        self.handle.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()
