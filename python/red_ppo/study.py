"""`red-ppo study`: how RED's gain over sparse rewards depends on the reward's token-credit fidelity.

The synthetic language's true per-token credit is known, so the fidelity of every reward source
can be measured, as the Spearman correlation between its RED token rewards and the true credit
on the same held-out responses: the oracle (fidelity 1), the oracle with independent Gaussian noise
on every prefix score (``study.noise_levels``), and Bradley-Terry reward models trained on
``study.rm_pairs`` preference pairs each. At every level, paired ``sparse`` and ``red`` runs over
``study.seeds``; the plot puts the paired RED-minus-sparse gain (area under the held-out
ground-truth curve, bootstrap 95% interval over seeds) against the measured fidelity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from red_ppo.config import Config, to_dict
from red_ppo.demo import check_evaluation, pretrain, run_config, run_jobs, summarise
from red_ppo.pretrain import train_reward_model
from red_ppo.synthetic import SyntheticTask, build_tokenizer, spearman

ARMS = ("sparse", "red")


def oracle_fidelity(task: SyntheticTask, prompts: list[list[int]], responses: list[list[int]], noise: float,
                    seed: int = 0) -> float:
    """Spearman of the noisy oracle's RED token rewards against the true credit, pooled over the
    tokens of the held-out responses (noise drawn as in `red_ppo.demo.OracleScores`)."""
    generator = torch.Generator().manual_seed(seed)
    rewards, truth = [], []
    for prompt, response in zip(prompts, responses):
        credit = task.token_credit(prompt, response)
        if not credit:
            continue
        scores = torch.tensor(credit, dtype=torch.float64).cumsum(0)
        scores = scores + noise * torch.randn(len(credit), generator=generator, dtype=torch.float64)
        rewards += torch.diff(scores, prepend=torch.zeros(1, dtype=torch.float64)).tolist()
        truth += credit
    return spearman(rewards, truth)


def study_settings(cfg: Config, quick: bool) -> dict:
    st = cfg.study
    if quick:
        return {"seeds": list(st.quick_seeds), "noise_levels": list(st.quick_noise_levels),
                "rm_pairs": list(st.quick_rm_pairs), "total_steps": st.quick_total_steps}
    return {"seeds": list(st.seeds), "noise_levels": list(st.noise_levels), "rm_pairs": list(st.rm_pairs),
            "total_steps": cfg.run.total_steps}


def run_study(cfg: Config, quick: bool = False, log=print) -> dict:
    check_evaluation(cfg)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    settings = study_settings(cfg, quick)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, total_steps=settings["total_steps"]))
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _, main_rm = pretrain(cfg, run_dir, log)  # the policy, and the configured reward model (critics start from it)
    tokenizer, task = build_tokenizer(), cfg.synthetic.task()
    held = json.loads((run_dir / "reward_model" / "heldout.json").read_text())
    conditions = [{"name": "oracle", "noise": 0.0, "fidelity": 1.0, "reward_model": None}]
    for sigma in settings["noise_levels"]:
        conditions.append({"name": f"oracle+noise{sigma:g}", "noise": float(sigma), "reward_model": None,
                           "fidelity": oracle_fidelity(task, held["prompts"], held["responses"], sigma)})
    for pairs in settings["rm_pairs"]:
        if pairs == cfg.synthetic.rm_pairs:
            folder, info = run_dir / "reward_model", main_rm
        else:
            folder = run_dir / f"reward_model-{pairs}pairs"
            s = dataclasses.replace(cfg.synthetic, rm_pairs=pairs)
            info = train_reward_model(task, tokenizer, run_dir / "sft", s, folder, cfg.generation.max_new_tokens,
                                      cfg.reward.baseline, log=log)
        conditions.append({"name": f"learned-{pairs}pairs", "noise": None, "reward_model": str(folder),
                           "fidelity": info["fidelity_spearman"], "heldout_accuracy": info["heldout_accuracy"]})
    t_pretrain = time.perf_counter() - t0
    jobs = []
    for c in conditions:
        for seed in settings["seeds"]:
            for arm in ARMS:
                rm = Path(c["reward_model"]) if c["reward_model"] else None
                jobs.append((run_config(cfg, run_dir, c["name"], arm, seed, rm), c["name"], arm, seed, c["noise"]))
    results = run_jobs(jobs, cfg.demo.workers, log)
    summary = summarise(results, cfg.demo.bootstrap)
    points = []
    for c in conditions:
        pair = summary["paired"].get(c["name"], {}).get("red - sparse")
        if pair is None:
            continue
        points.append({**c, "gain_area": pair["area"], "gain_final_gt": pair["final_gt"]})
    summary.update({
        "quick": quick, "settings": settings, "points": points,
        "seconds": {"pretraining": t_pretrain, "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "workers": cfg.demo.workers,
        "threads_per_worker": cfg.run.num_threads, "config": to_dict(cfg),
    })
    summary["table"] = format_study(summary)
    plot_study(points, run_dir / "study.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log("")
    log(summary["table"])
    log(f"\nwrote {run_dir / 'summary.json'} and {run_dir / 'study.png'}")
    return summary


def format_study(summary: dict) -> str:
    header = (f"{'reward source':<24}{'fidelity rho':>14}{'RED - sparse, GT gain (AUC)':>36}"
              f"{'RED - sparse, final GT':>34}")
    lines = [header, "-" * len(header)]
    for p in summary["points"]:
        cells = []
        for key in ("gain_area", "gain_final_gt"):
            d = p[key]
            cells.append(f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] {d['positive']}/{d['n']}")
        lines.append(f"{p['name']:<24}{p['fidelity']:>14.3f}{cells[0]:>36}{cells[1]:>34}")
    st = summary["settings"]
    lines.append(f"paired seeds {st['seeds']}, {st['total_steps']} steps per run; mean [bootstrap 95% interval] "
                 f"k/n seeds with RED ahead; {summary['seconds']['total']:.0f}s in all, {summary['workers']} workers x "
                 f"{summary['threads_per_worker']} thread(s), load average {summary['load_average']['start'][0]:.1f} "
                 f"at the start")
    return "\n".join(lines)


def plot_study(points: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for p in points:
        d = p["gain_area"]
        if not math.isfinite(d["mean"]):
            continue
        low, high = d["ci95"]
        ax.errorbar([p["fidelity"]], [d["mean"]], yerr=[[d["mean"] - low], [high - d["mean"]]], fmt="o", capsize=4)
        ax.annotate(p["name"], (p["fidelity"], d["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("token-credit fidelity (Spearman of RED rewards vs true credit)")
    ax.set_ylabel("RED - sparse, ground-truth AUC gain")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

