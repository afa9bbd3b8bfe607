"""`red-ppo study`: does RED help PPO with a reward model of realistic quality, and with which kind of error?

On the synthetic language the true credit of every token is known, so every reward source's quality is
measured on a fixed held-out pool before any PPO run (`red_ppo.sources`). The sources:

* ``oracle``: the true prefix scores;
* at each accuracy level k (``study.rm_levels``): ``learned-k``, a Bradley-Terry reward model (the
  ``synthetic.rm_*`` recipe, kept after that many optimiser steps of one training run); ``noise-k``, the
  oracle with independent Gaussian noise on every prefix score; ``systematic-k``, the oracle with a fixed
  per-(topic, token) error table. The two oracle kinds' error sizes are set by bisection so that their
  held-out pairwise accuracy matches ``learned-k``'s: at one accuracy, three kinds of error.

With ``study.standardise`` every source is multiplied by one factor that gives its held-out sequence scores
the truth's sd (a learned reward model as a copy whose head is scaled), so one ``kl_coef`` regularises all
alike. Every factor, error size and measure is written to ``sources.json`` before the first PPO run.

Every source runs the arms ``sparse`` and ``red``; ``study.control_sources`` also run ``sparse-lam1`` and
``sparse-noclip`` (is sparse slow for want of dense credit, or because its critic cannot learn?); every
learned source runs ``sparse-rm-critic``. Arms share seeds (paired). The measures are the demo's (area under
the held-out ground-truth curve, final ground truth, KL), with paired t-intervals over seeds and a sign test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from red_ppo.config import Config, to_dict
from red_ppo.data import Prompt
from red_ppo.demo import check_evaluation, run_config, run_jobs, summarise
from red_ppo.diagnose import diagnose
from red_ppo.pretrain import pretrain_policy, train_reward_model
from red_ppo.sources import (OracleScores, match_accuracy, oracle_measures, standardising_scale,
                             systematic_errors, truth_sd)
from red_ppo.study_config import KINDS, source_names
from red_ppo.synthetic import build_tokenizer, spearman

CONTROLS = ("sparse-lam1", "sparse-noclip")
PAIRS = [("red", "sparse"), ("sparse-lam1", "sparse"), ("sparse-noclip", "sparse"), ("red", "sparse-lam1"),
         ("red", "sparse-noclip"), ("sparse-rm-critic", "sparse"), ("red", "sparse-rm-critic")]
NOISE_SEED, SOURCE_SEED = 17, 0


def study_settings(cfg: Config, quick: bool) -> dict:
    st = cfg.study
    if quick:
        return {"seeds": list(st.quick_seeds), "rm_levels": list(st.quick_rm_levels),
                "control_sources": list(st.quick_control_sources),
                "rm_critic_sources": list(st.quick_rm_critic_sources), "total_steps": st.quick_total_steps}
    return {"seeds": list(st.seeds), "rm_levels": list(st.rm_levels), "control_sources": list(st.control_sources),
            "rm_critic_sources": list(st.rm_critic_sources), "total_steps": st.total_steps}


def arms_of(name: str, settings: dict) -> list[str]:
    arms = ["sparse", "red"]
    if name in settings["control_sources"]:
        arms += list(CONTROLS)
    if name in settings["rm_critic_sources"]:
        arms.append("sparse-rm-critic")
    return arms


def scaled_reward_model(source: Path, scale: float, out: Path) -> Path:
    """A copy of the reward model in ``source`` whose score head (weight and any bias) is multiplied by
    ``scale``: every prefix score, and so every RED token reward, scales by it."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        for p in rm.score.parameters():
            p.mul_(scale)
    out.mkdir(parents=True, exist_ok=True)
    rm.save_pretrained(out)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(Path(source) / name, out / name)
    return out


def build_sources(cfg: Config, run_dir: Path, settings: dict, log=print) -> list[dict]:
    """Every reward source of the study with its held-out measures, error size and standardising factor."""
    tokenizer, task = build_tokenizer(), cfg.synthetic.task()
    levels = settings["rm_levels"]
    folder = run_dir / "reward_model"
    s = cfg.synthetic
    info = train_reward_model(task, tokenizer, run_dir / "sft", s, folder, cfg.generation.max_new_tokens,
                              cfg.reward.baseline, log=log, checkpoints=levels)
    held = json.loads((folder / "heldout.json").read_text())
    prompts, responses = held["prompts"], held["responses"]
    target_sd = truth_sd(task, prompts, responses)
    unit_errors = systematic_errors(1.0, cfg.study.systematic_seed)

    def scale_for(sd: float) -> float:
        return standardising_scale(sd, target_sd) if cfg.study.standardise else 1.0

    oracle = oracle_measures(task, prompts, responses)
    sources = [{"name": "oracle", "kind": "oracle", "level": 0, "oracle": {"noise": 0.0, "errors": None},
                "sigma": 0.0, **oracle, "scale": scale_for(oracle["score_sd"])}]
    for k, steps in enumerate(levels, 1):
        learned = info["checkpoints"][str(steps)]
        accuracy = learned["heldout_accuracy"]
        noise = match_accuracy(lambda x: oracle_measures(task, prompts, responses, noise=x,
                                                         seed=NOISE_SEED)["heldout_accuracy"], accuracy)
        systematic = match_accuracy(lambda x: oracle_measures(task, prompts, responses, errors=x * unit_errors)
                                    ["heldout_accuracy"], accuracy)
        for kind, sigma in (("noise", noise), ("systematic", systematic)):
            kwargs = {"noise": sigma, "errors": None} if kind == "noise" else {"noise": 0.0, "errors": sigma}
            m = oracle_measures(task, prompts, responses, noise=kwargs["noise"], seed=NOISE_SEED,
                                errors=None if kwargs["errors"] is None else sigma * unit_errors)
            sources.append({"name": f"{kind}-{k}", "kind": kind, "level": k, "oracle": kwargs, "sigma": sigma, **m,
                            "scale": scale_for(m["score_sd"])})
        scale = scale_for(learned["score_sd"])
        path = scaled_reward_model(folder / f"step-{steps:06d}", scale, run_dir / "sources" / f"learned-{k}")
        sources.append({"name": f"learned-{k}", "kind": "learned", "level": k, "rm_steps": steps,
                        "reward_model": str(path), "scale": scale,
                        **{key: learned[key] for key in ("heldout_accuracy", "score_sd", "fidelity_spearman",
                                                         "score_spearman", "final_loss")}})
    order = {name: i for i, name in enumerate(source_names(len(levels)))}
    sources.sort(key=lambda x: order[x["name"]])
    record = {"truth_sd": target_sd, "heldout_responses": len(responses), "standardise": cfg.study.standardise,
              "systematic_seed": cfg.study.systematic_seed, "noise_seed": NOISE_SEED,
              "reward_model": {k: info[k] for k in ("steps", "init", "pairs", "heldout_accuracy", "final_loss")},
              "sources": sources}
    (run_dir / "sources.json").write_text(json.dumps(record, indent=2))
    for x in sources:
        sigma = f", sigma {x['sigma']:.3f}" if "sigma" in x else ""
        log(f"[2/3] {x['name']:<14} accuracy {x['heldout_accuracy']:.1%}, fidelity {x['fidelity_spearman']:+.3f}, "
            f"score sd {x['score_sd']:.2f} -> x{x['scale']:.2f}{sigma}")
    return sources


def oracle_kwargs(source: dict, cfg: Config) -> dict | None:
    """The `OracleScores` keyword arguments of an oracle source (None: a reward model's scores)."""
    if "oracle" not in source:
        return None
    errors = source["oracle"]["errors"]
    table = None if errors is None else errors * systematic_errors(1.0, cfg.study.systematic_seed)
    return {"noise": source["oracle"]["noise"], "errors": table, "scale": source["scale"]}


def diagnose_sources(cfg: Config, run_dir: Path, sources: list[dict], log=print) -> dict:
    """`red_ppo.diagnose.diagnose` on every source with the supervised policy (the policy every PPO run starts
    from), before any PPO run: the diagnostic's side of its validation."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from red_kernels.hf import score_prefixes

    tokenizer, task = build_tokenizer(), cfg.synthetic.task()
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "sft").eval()
    prompts = [Prompt(ids=tokenizer(p)["input_ids"], text=p, messages=None) for p in task.prompts]
    out = {}
    for source in sources:
        kwargs = oracle_kwargs(source, cfg)
        if kwargs is not None:
            score_fn = OracleScores(task, seed=NOISE_SEED, **kwargs)
        else:
            rm = AutoModelForSequenceClassification.from_pretrained(source["reward_model"]).eval()
            score_fn = lambda ids, mask, start, model=rm: score_prefixes(model, ids, mask, start).scores
        with torch.no_grad():
            r = diagnose(policy, tokenizer, prompts, score_fn, prefixes=cfg.study.diagnose_prefixes,
                         continuations=cfg.study.diagnose_continuations, generation=cfg.generation,
                         seed=SOURCE_SEED, log=lambda *_: None)
        out[source["name"]] = {k: r[k] for k in ("consistency", "consistency_ci95", "calibration_slope",
                                                 "calibration_slope_ci95", "advantage_se_mean", "advantage_sd",
                                                 "prefixes", "continuations", "seconds")}
        log(f"[2/3] diagnose {source['name']:<14} consistency {r['consistency']:+.2f} "
            f"[{r['consistency_ci95'][0]:+.2f}, {r['consistency_ci95'][1]:+.2f}], calibration slope "
            f"{r['calibration_slope']:.2f}, {r['seconds']:.0f}s")
    return out


def _rank_correlation(x: list[float], y: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho of ``x`` against ``y`` over the sources, with a percentile-bootstrap 95% interval over
    the sources (resamples where rho is undefined left out)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rhos = [spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(resamples))]
    rhos = [r for r in rhos if math.isfinite(r)]
    low, high = np.quantile(rhos, [0.025, 0.975]) if rhos else (math.nan, math.nan)
    return {"rho": spearman(x, y), "ci95": [float(low), float(high)], "n": len(x)}


def validation(points: list[dict]) -> dict:
    """The diagnostic's validation: each source's consistency beside its measured RED - sparse gain (area), in
    the form `red_ppo.diagnose.load_validation` reads, and how well consistency (and, for comparison, the
    token-credit fidelity that needs the ground truth) predicts the gain across the sources.

    The verdict's ``sources`` are the sources a reward model can be: deterministic scorers (the oracle, the
    systematic and the learned ones). The independent-noise sources, redrawn at every call, are kept apart
    (``independent_noise``): no reward model scores the same text differently each time, and their noise
    lowers the consistency while averaging out over a batch."""
    rows = [p for p in points if "diagnose" in p and "red - sparse" in p["paired"]]
    measured = [{"name": p["name"], "kind": p["kind"], "consistency": p["diagnose"]["consistency"],
                 "consistency_ci95": p["diagnose"]["consistency_ci95"],
                 "gain": p["paired"]["red - sparse"]["area"]["mean"],
                 "gain_ci95": p["paired"]["red - sparse"]["area"]["ci95"],
                 "calibration_slope": p["diagnose"]["calibration_slope"], "heldout_accuracy": p["heldout_accuracy"],
                 "fidelity_spearman": p["fidelity_spearman"]} for p in rows]
    sources = [s for s in measured if s["kind"] != "noise"]

    def correlation(group: list[dict], key: str) -> dict:
        return _rank_correlation([s[key] for s in group], [s["gain"] for s in group])

    return {"sources": sources, "independent_noise": [s for s in measured if s["kind"] == "noise"],
            "consistency_vs_gain": correlation(measured, "consistency"),
            "fidelity_vs_gain": correlation(measured, "fidelity_spearman"),
            "consistency_vs_gain_deterministic": correlation(sources, "consistency")}


def run_study(cfg: Config, quick: bool = False, log=print) -> dict:
    check_evaluation(cfg)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    settings = study_settings(cfg, quick)
    # every run: the study's length and evaluation size; no TensorBoard files or sample pages (summary.json
    # holds what the study reads); the critic's start of study.critic_init
    run = dataclasses.replace(cfg.run, total_steps=settings["total_steps"], eval_prompts=cfg.study.eval_prompts,
                              report_to=[], sample_pages=0)
    cfg = dataclasses.replace(cfg, run=run, model=dataclasses.replace(cfg.model, critic_init=cfg.study.critic_init))
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    pretrain_policy(cfg.synthetic.task(), build_tokenizer(), cfg.synthetic, run_dir / "sft", log=log)
    sources = build_sources(cfg, run_dir, settings, log)
    diagnosed = diagnose_sources(cfg, run_dir, sources, log)
    t_pretrain = time.perf_counter() - t0
    # the critics of every source start alike (study.critic_init); the reward model a run builds but does not
    # score with (an oracle source's) is the last learned level's
    default_rm = Path(sources[-1]["reward_model"])
    jobs = []
    for seed in settings["seeds"]:
        for source in sources:
            rm = Path(source["reward_model"]) if "reward_model" in source else default_rm
            for arm in arms_of(source["name"], settings):
                jobs.append((run_config(cfg, run_dir, source["name"], arm, seed, rm), source["name"], arm, seed,
                             oracle_kwargs(source, cfg)))
    log(f"[3/3] {len(jobs)} PPO runs")
    results = run_jobs(jobs, cfg.demo.workers, log)
    summary = summarise(results, PAIRS)
    points = []
    for source in sources:
        pairs = summary["paired"].get(source["name"], {})
        arms = summary["arms"].get(source["name"], {})
        points.append({**{k: v for k, v in source.items() if k != "oracle"}, "diagnose": diagnosed[source["name"]],
                       "paired": pairs,
                       "final_kl": {arm: e["final_kl"] for arm, e in arms.items()},
                       "final_gt": {arm: e["final_gt"] for arm, e in arms.items()}})
    checked = validation(points)
    (run_dir / "diagnose_validation.json").write_text(json.dumps({
        "source": f"red-ppo study{' --quick' if quick else ''}: {len(settings['seeds'])} paired seeds, "
                  f"{settings['total_steps']} steps per run, diagnose with {cfg.study.diagnose_prefixes} prefixes x "
                  f"{cfg.study.diagnose_continuations} continuations on the supervised policy",
        **checked}, indent=2))
    summary.update({
        "quick": quick, "settings": settings, "points": points, "validation": checked,
        "seconds": {"pretraining": t_pretrain, "ppo": time.perf_counter() - t0 - t_pretrain,
                    "total": time.perf_counter() - t0},
        "load_average": {"start": load_start, "end": os.getloadavg()}, "workers": cfg.demo.workers,
        "threads_per_worker": cfg.run.num_threads, "config": to_dict(cfg),
    })
    summary["table"] = format_study(summary)
    plot_study(summary, run_dir / "study.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log("")
    log(summary["table"])
    log(f"\nwrote {run_dir / 'sources.json'}, {run_dir / 'summary.json'} and {run_dir / 'study.png'}")
    return summary


def _cell(d: dict) -> str:
    if d["n"] == 0 or not math.isfinite(d["mean"]):
        return "n/a"
    return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] {d['positive']}/{d['n']} p={d['sign_p']:.2g}"


def format_study(summary: dict) -> str:
    header = (f"{'source':<14}{'accuracy':>9}{'fidelity':>9}{'consist.':>9}{'scale':>7}{'RED - sparse, GT area':>42}"
              f"{'RED - sparse, final GT':>42}{'final KL sparse / RED':>24}")
    lines = [header, "-" * len(header)]
    for p in summary["points"]:
        pair = p["paired"].get("red - sparse")
        if pair is None:
            continue
        kl = p["final_kl"]
        lines.append(f"{p['name']:<14}{p['heldout_accuracy']:>9.1%}{p['fidelity_spearman']:>9.3f}"
                     f"{p['diagnose']['consistency']:>9.2f}{p['scale']:>7.2f}"
                     f"{_cell(pair['area']):>42}{_cell(pair['final_gt']):>42}"
                     f"{kl['sparse']['mean']:>12.1f} / {kl['red']['mean']:<9.1f}")
    v = summary["validation"]
    for key, label in (("consistency_vs_gain", "diagnose consistency"), ("fidelity_vs_gain", "token-credit fidelity"),
                       ("consistency_vs_gain_deterministic", "diagnose consistency, deterministic sources")):
        c = v[key]
        lines.append(f"{label} against the RED - sparse area, over the {c['n']} sources: Spearman {c['rho']:+.2f} "
                     f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] (bootstrap over sources)")
    lines.append("")
    lines.append("controls (paired differences in GT area):")
    for p in summary["points"]:
        for name, pair in p["paired"].items():
            if name != "red - sparse":
                lines.append(f"  {p['name']:<14}{name:<30}{_cell(pair['area'])}")
    st = summary["settings"]
    lines.append(f"paired seeds {st['seeds']}, {st['total_steps']} steps per run; mean [t 95% interval over seeds] "
                 f"k/n seeds with a > b, two-sided sign-test p; {summary['seconds']['total']:.0f}s in all "
                 f"({summary['seconds']['pretraining']:.0f}s before PPO), {summary['workers']} workers x "
                 f"{summary['threads_per_worker']} thread(s), load average {summary['load_average']['start'][0]:.1f} "
                 f"at the start")
    return "\n".join(lines)


def plot_study(summary: dict, out: Path) -> None:
    """Left: RED - sparse GT area against held-out accuracy, one marker per kind of error. Right: each run's
    final ground truth against its final KL, sparse and RED, every source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"oracle": "*", **dict(zip(KINDS, "o^s"))}
    for kind, marker in markers.items():
        xs, ys, lows, highs = [], [], [], []
        for p in summary["points"]:
            d = p["paired"].get("red - sparse", {}).get("area")
            if p["kind"] != kind or d is None or not math.isfinite(d["mean"]):
                continue
            xs.append(p["heldout_accuracy"])
            ys.append(d["mean"])
            lows.append(d["mean"] - d["ci95"][0])
            highs.append(d["ci95"][1] - d["mean"])
        if xs:
            left.errorbar(xs, ys, yerr=[lows, highs], fmt=marker, capsize=4, label=kind, ms=8)
    left.axhline(0.0, color="grey", lw=0.8)
    left.set_xlabel("held-out pairwise accuracy of the reward source")
    left.set_ylabel("RED - sparse, ground-truth area (t 95%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    runs = summary["runs"]
    colours = {"sparse": "tab:blue", "red": "tab:red"}
    for name, arms in runs.items():
        for arm, colour in colours.items():
            seeds = arms.get(arm, {})
            kl = [m["final_kl"] for m in seeds.values()]
            gt = [m["final_gt"] for m in seeds.values()]
            right.scatter(kl, gt, s=10, color=colour, alpha=0.5, label=arm if name == "oracle" else None)
            if kl:
                right.annotate(name, (float(np.mean(kl)), float(np.mean(gt))), fontsize=6)
    right.set_xlabel("final KL to the reference (nats per response)")
    right.set_ylabel("final held-out ground truth")
    right.set_xscale("symlog", linthresh=1.0)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
