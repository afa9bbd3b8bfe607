"""Reward curves from ``metrics.jsonl``: one line per run, or per group a mean with a band over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from red_ppo.metrics import read_metrics

PANELS = [("reward/score", "reward-model score"), ("gt/score", "ground-truth score"),
          ("kl/sequence", "KL to reference"), ("response/length", "response length")]


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


def plot_groups(groups: dict[str, list[Path]], out: Path, window: int = 5, title: str | None = None) -> Path:
    """One panel per metric present; each group is drawn as its mean over runs with a +-1 std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: [read_metrics(Path(folder) / "metrics.jsonl") for folder in folders]
            for name, folders in groups.items()}
    panels = [(k, label) for k, label in PANELS if any(_series(r, k)[0].size for rs in runs.values() for r in rs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, rows_list in runs.items():
            series = [_series(rows, key) for rows in rows_list]
            series = [(s, smooth(v, window)) for s, v in series if len(s)]
            if not series:
                continue
            length = min(len(s) for s, _ in series)
            steps = series[0][0][:length]
            values = np.stack([v[:length] for _, v in series])
            mean = values.mean(0)
            line, = ax.plot(steps, mean, label=f"{name} (n={len(series)})" if len(series) > 1 else name)
            if len(series) > 1:
                std = values.std(0)
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    if panels:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(folders: list[Path], out: Path, window: int = 5) -> Path:
    """Each run folder as its own line, named by the folder."""
    return plot_groups({Path(f).name: [Path(f)] for f in folders}, out, window)
