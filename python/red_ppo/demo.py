"""`red-ppo demo`: RED against sparse rewards on the synthetic language, where the true credit of
every token is known.

1. supervised pre-training of a tiny policy (cached in the run folder);
2. a tiny Bradley-Terry reward model on prefix and minimal-edit preference pairs (cached);
3. PPO in two conditions: ``oracle`` (the hidden scorer's exact prefix scores through
   ``PPOTrainer``'s ``reward_fn``) and ``learned`` (the reward model of step 2), each with its arms
   (``sparse``, ``red``, and ``sparse-rm-critic``: sparse with the critic started as the reward
   model) and paired seeds (an arm's seed-s run starts from the same policy and prompts as
   every other arm's seed-s run). Runs are spread over ``demo.workers`` processes.

Then a table, ``summary.json``, ``reward_curves.png`` and ``credit_correlation.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from red_ppo.config import Config, ConfigError, ModelSource, to_dict, validate_trainer
from red_ppo.demo_config import ARMS
from red_ppo.metrics import read_metrics
from red_ppo.pretrain import pretrain_policy, train_reward_model
from red_ppo.sources import OracleScores
from red_ppo.stats import curve_area, paired_difference, samples_to_level
from red_ppo.synthetic import SyntheticTask, build_tokenizer, spearman
from red_ppo.trainer import PPOTrainer

PAIRS = [("red", "sparse"), ("sparse-rm-critic", "sparse"), ("red", "sparse-rm-critic")]
LEVELS = (0.5, 0.8)


class CreditTrainer(PPOTrainer):
    """`PPOTrainer` that also logs, every step, how well the advantages (before whitening) and the
    reward-model rewards rank the true per-token credit (Spearman, pooled over the batch's tokens)."""

    def __init__(self, cfg: Config, task: SyntheticTask, **kwargs) -> None:
        super().__init__(cfg, sample_metrics=task.metrics, **kwargs)
        self.task = task

    def make_experience(self, rollout, prompts):
        exp = super().make_experience(rollout, prompts)
        advantages, rewards, truth = [], [], []
        for row, (prompt, response) in enumerate(zip(rollout.prompt_lists(), rollout.response_lists())):
            truth += self.task.token_credit(prompt, response)
            advantages += exp["raw_advantages"][row, :len(response)].tolist()
            rewards += exp["rm_rewards"][row, :len(response)].tolist()
        exp["stats"]["credit/advantage_spearman"] = spearman(advantages, truth)
        exp["stats"]["credit/reward_spearman"] = spearman(rewards, truth)
        return exp


def run_config(cfg: Config, run_dir: Path, condition: str, arm: str, seed: int,
               reward_model: Path | None = None) -> Config:
    """The run's config: its folder, seed and the arm's settings (`ARMS`); the reward model (for the
    learned condition's scores and every critic's start) is ``reward_model`` or ``run_dir/reward_model``."""
    run = dataclasses.replace(cfg.run, output_dir=str(run_dir / condition / f"{arm}-seed{seed}"), seed=seed,
                              overwrite=True, progress=False)
    model = dataclasses.replace(cfg.model, tokenizer="synthetic", reference=None,
                                policy=ModelSource(path=str(run_dir / "sft")),
                                reward_model=ModelSource(path=str(reward_model or run_dir / "reward_model")))
    data = dataclasses.replace(cfg.data, source="synthetic")
    out = dataclasses.replace(cfg, run=run, model=model, data=data)
    for section, key, value in ARMS[arm]:
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{key: value})})
    validate_trainer(out)
    return out


def train_one(job: tuple) -> dict:
    """One PPO run (in a worker process): ``(config, condition, arm, seed, oracle)``; ``oracle`` is None
    for the reward model's scores, else the keyword arguments of the `OracleScores` that replaces them
    (``noise``, ``errors``, ``scale``)."""
    cfg, condition, arm, seed, oracle = job
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    task = cfg.synthetic.task()
    reward_fn = OracleScores(task, seed=10_000 + seed, **oracle) if oracle is not None else None
    start = time.perf_counter()
    CreditTrainer(cfg, task, tokenizer=build_tokenizer(), reward_fn=reward_fn).train()
    return {"condition": condition, "arm": arm, "seed": seed, "folder": cfg.run.output_dir,
            "seconds": time.perf_counter() - start}


def run_jobs(jobs: list[tuple], workers: int, log=print) -> list[dict]:
    done = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            done.append(train_one(job))
            log(f"[3/3] PPO {len(done)}/{len(jobs)}: {done[-1]['condition']} {done[-1]['arm']} seed "
                f"{done[-1]['seed']}, {done[-1]['seconds']:.0f}s")
        return done
    # spawn: a fresh interpreter per worker, no forked OpenMP or torch thread state
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for result in pool.imap_unordered(train_one, jobs):
            done.append(result)
            log(f"[3/3] PPO {len(done)}/{len(jobs)}: {result['condition']} {result['arm']} seed {result['seed']}, "
                f"{result['seconds']:.0f}s")
    return done


def _curves(rows: list[dict]) -> dict:
    evals = [r for r in rows if r.get("eval/gt/score") is not None]
    steps = [r for r in rows if r.get("credit/advantage_spearman") is not None]
    return {"samples": [r["samples"] for r in evals], "gt": [r["eval/gt/score"] for r in evals],
            "rm_score": [r["eval/score"] for r in evals], "length": [r["eval/response_length"] for r in evals],
            "kl": [r["eval/kl_sequence"] for r in evals],
            "credit_steps": [r["step"] for r in steps],
            "advantage_spearman": [r["credit/advantage_spearman"] for r in steps],
            "reward_spearman": [r["credit/reward_spearman"] for r in steps]}


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _mean_sd(values) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(results: list[dict], pairs: list[tuple[str, str]] = PAIRS) -> dict:
    """Per run: curves and measures; per condition and arm: mean and sd over seeds; paired differences
    (``a - b`` for each ``(a, b)`` of ``pairs`` that the condition ran)."""
    runs: dict = {}
    for r in results:
        curves = _curves(read_metrics(Path(r["folder"]) / "metrics.jsonl"))
        runs.setdefault(r["condition"], {}).setdefault(r["arm"], {})[r["seed"]] = {
            "folder": r["folder"], "seconds": r["seconds"], "curves": curves, "start_gt": curves["gt"][0],
            "area": curve_area(curves["samples"], curves["gt"], curves["gt"][0]),
            "final_gt": curves["gt"][-1], "final_rm_score": curves["rm_score"][-1],
            "final_length": curves["length"][-1], "final_kl": curves["kl"][-1],
            "advantage_spearman": _finite_mean(curves["advantage_spearman"]),
            "first_advantage_spearman": curves["advantage_spearman"][0] if curves["advantage_spearman"] else None}
    oracle_red = runs.get("oracle", {}).get("red", {})
    gain = _finite_mean([m["final_gt"] - m["start_gt"] for m in oracle_red.values()]) if oracle_red else math.nan
    for arms in runs.values():
        for seeds in arms.values():
            for m in seeds.values():
                c = m["curves"]
                m["samples_to"] = {f"{q:.0%}": (samples_to_level(c["samples"], c["gt"], m["start_gt"] + q * gain)
                                                if math.isfinite(gain) else None) for q in LEVELS}
    keys = ("area", "final_gt", "final_rm_score", "final_length", "final_kl", "advantage_spearman",
            "first_advantage_spearman")
    arms_summary = {}
    for condition, arms in runs.items():
        for arm, seeds in arms.items():
            entry = {k: _mean_sd([m[k] for m in seeds.values()]) for k in keys}
            for q in LEVELS:
                reached = [m["samples_to"][f"{q:.0%}"] for m in seeds.values()]
                hit = [x for x in reached if x is not None]
                entry[f"samples_to_{q:.0%}"] = {"median": float(np.median(hit)) if hit else None,
                                                "reached": len(hit), "n": len(reached)}
            arms_summary.setdefault(condition, {})[arm] = entry
    paired = {}
    for condition, arms in runs.items():
        for a, b in pairs:
            if a in arms and b in arms:
                paired.setdefault(condition, {})[f"{a} - {b}"] = {
                    k: paired_difference({s: m[k] for s, m in arms[a].items()},
                                         {s: m[k] for s, m in arms[b].items()})
                    for k in ("area", "final_gt")}
    return {"oracle_red_gain": gain, "arms": arms_summary, "paired": paired, "runs": runs}


def format_table(summary: dict) -> str:
    def cell(entry, fmt="{:.2f}"):
        return "n/a" if entry["n"] == 0 else f"{fmt.format(entry['mean'])} +- {fmt.format(entry['sd'])}"

    def reach(entry):
        if entry["reached"] == 0:
            return f"never (0/{entry['n']})"
        return f"{entry['median']:.0f} ({entry['reached']}/{entry['n']})"

    header = (f"{'condition':<10}{'arm':<18}{'GT gain (AUC)':>16}{'final GT':>16}{'final RM':>16}{'length':>16}"
              f"{'KL':>14}{'samples to 50%':>18}{'to 80%':>16}{'adv-credit rho':>16}")
    lines = [header, "-" * len(header)]
    for condition, arms in summary["arms"].items():
        for arm, e in arms.items():
            lines.append(f"{condition:<10}{arm:<18}{cell(e['area']):>16}{cell(e['final_gt']):>16}"
                         f"{cell(e['final_rm_score']):>16}{cell(e['final_length'], '{:.1f}'):>16}"
                         f"{cell(e['final_kl']):>14}{reach(e['samples_to_50%']):>18}{reach(e['samples_to_80%']):>16}"
                         f"{cell(e['advantage_spearman']):>16}")
    lines.append("")
    lines.append("paired differences per seed (mean, t 95% interval over seeds, seeds with a > b, sign-test p):")
    for condition, pairs in summary["paired"].items():
        for name, measures in pairs.items():
            parts = []
            for key, label in (("area", "GT gain (AUC)"), ("final_gt", "final GT")):
                d = measures[key]
                parts.append(f"{label} {d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] "
                             f"({d['positive']}/{d['n']} > 0, p={d['sign_p']:.2g})")
            lines.append(f"  {condition:<8} {name:<26} " + "; ".join(parts))
    return "\n".join(lines)


def _band(ax, xs, ys, label):
    length = min(len(x) for x in xs)
    x = np.asarray(xs[0][:length], dtype=np.float64)
    y = np.asarray([v[:length] for v in ys], dtype=np.float64)
    mean = np.nanmean(y, 0)
    line, = ax.plot(x, mean, label=f"{label} (n={len(ys)})")
    if len(ys) > 1:
        sd = np.nanstd(y, 0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)


def plot_summary(summary: dict, out_curves: Path, out_credit: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    conditions = list(runs)
    panels = [("gt", "held-out ground truth"), ("rm_score", "held-out reward score"), ("length", "response length")]
    fig, axes = plt.subplots(len(panels), len(conditions), figsize=(5 * len(conditions), 3.2 * len(panels)),
                             squeeze=False)
    for col, condition in enumerate(conditions):
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for arm, seeds in runs[condition].items():
                curves = [m["curves"] for m in seeds.values()]
                _band(ax, [c["samples"] for c in curves], [c[key] for c in curves], arm)
            ax.set_title(f"{condition}: {label}")
            ax.set_xlabel("samples")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("mean +- 1 sd over seeds")
    fig.tight_layout()
    fig.savefig(out_curves, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 3.4), squeeze=False)
    for col, condition in enumerate(conditions):
        ax = axes[0][col]
        for arm, seeds in runs[condition].items():
            curves = [m["curves"] for m in seeds.values()]
            _band(ax, [c["credit_steps"] for c in curves], [c["advantage_spearman"] for c in curves], arm)
        ax.set_title(f"{condition}: Spearman(advantage, true token credit)")
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_credit, dpi=100)
    plt.close(fig)


def pretrain(cfg: Config, run_dir: Path, log=print) -> tuple[dict, dict]:
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    tokenizer, task = build_tokenizer(), cfg.synthetic.task()
    sft = pretrain_policy(task, tokenizer, cfg.synthetic, run_dir / "sft", log=log)
    rm = train_reward_model(task, tokenizer, run_dir / "sft", cfg.synthetic, run_dir / "reward_model",
                            cfg.generation.max_new_tokens, cfg.reward.baseline, log=log)
    return sft, rm


def check_evaluation(cfg: Config) -> None:
    """The measures need held-out evaluations at the start and the end of every run."""
    if cfg.run.eval_prompts < 1:
        raise ConfigError(f"run.eval_prompts: expected at least 1 for red-ppo demo and study (their measures are "
                          f"held-out evaluations), got {cfg.run.eval_prompts}")


def run_demo(cfg: Config, log=print) -> dict:
    check_evaluation(cfg)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sft, rm = pretrain(cfg, run_dir, log)
    t_pretrain = time.perf_counter() - t0
    d = cfg.demo
    jobs = [(run_config(cfg, run_dir, condition, arm, seed), condition, arm, seed, oracle)
            for condition, arms, seeds, oracle in (
                ("oracle", d.oracle_arms, d.oracle_seeds, {"noise": d.oracle_noise}),
                ("learned", d.learned_arms, d.learned_seeds, None))
            for seed in seeds for arm in arms]
    results = run_jobs(jobs, d.workers, log)
    summary = summarise(results)
    summary.update({
        "supervised_policy": sft, "reward_model": rm,
        "seconds": {"pretraining": t_pretrain, "ppo": time.perf_counter() - t0 - t_pretrain,
                    "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "cpus": os.cpu_count(),
        "workers": d.workers, "threads_per_worker": cfg.run.num_threads, "config": to_dict(cfg),
    })
    table = format_table(summary)
    summary["table"] = table + "\n" + (
        f"reward model: held-out pairwise accuracy {rm['heldout_accuracy']:.1%}, score-vs-truth Spearman "
        f"{rm['score_spearman']:.3f}, RED token-credit Spearman {rm['fidelity_spearman']:.3f} (pooled over "
        f"{rm['fidelity_tokens']} tokens of {rm['fidelity_responses']} held-out responses); pairs {rm.get('pairs')}\n"
        f"levels: start + 50% / 80% of the oracle RED gain ({summary['oracle_red_gain']:.2f}); "
        f"{summary['seconds']['total']:.0f}s in all ({t_pretrain:.0f}s pre-training), {d.workers} workers x "
        f"{cfg.run.num_threads} thread(s), load average {load_start[0]:.1f} at the start")
    plot_summary(summary, run_dir / "reward_curves.png", run_dir / "credit_correlation.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log("")
    log(summary["table"])
    log(f"\nwrote {run_dir / 'summary.json'}, {run_dir / 'reward_curves.png'} and {run_dir / 'credit_correlation.png'}")
    return summary
