"""`red-ppo study`: its reward sources (the oracle's two kinds of error, accuracy matching, one scale) and a
tiny end-to-end `--quick` run."""

import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import TINY_POLICY
from red_ppo.config import ConfigError, default_config_path, load_config
from red_ppo.synthetic import VOCAB, SyntheticTask, build_tokenizer

pytest.importorskip("transformers")


def _pool(count=400, seed=0):
    tok, task = build_tokenizer(), SyntheticTask()
    rng = random.Random(seed)
    prompts = [task.sample_prompt(rng) for _ in range(count // 2) for _ in range(2)]
    responses = [task.sample_response(rng, p.split()[0], perturb=rng.random() < 0.5) for p in prompts]
    return task, tok(prompts)["input_ids"], tok(responses, add_special_tokens=False)["input_ids"]


def _padded(tok, prompt_ids, response_ids):
    from red_ppo.rollout import left_pad

    ids, mask = left_pad(prompt_ids, tok.pad_token_id)
    width = ids.shape[1]
    rows = [list(r) for r in ids.tolist()]
    longest = max(len(r) for r in response_ids)
    full = torch.full((len(rows), width + longest), tok.pad_token_id)
    real = torch.zeros_like(full)
    for i, (row, response) in enumerate(zip(rows, response_ids)):
        full[i, :width] = torch.tensor(row)
        real[i, :width] = mask[i]
        full[i, width:width + len(response)] = torch.tensor(response)
        real[i, width:width + len(response)] = 1
    return full, real, width


def test_systematic_errors_are_fixed_per_topic_and_token():
    from red_ppo.sources import OracleScores, systematic_errors

    tok, task = build_tokenizer(), SyntheticTask()
    table = systematic_errors(2.0, seed=3)
    assert table.shape == (8, len(VOCAB)) and np.array_equal(table, systematic_errors(2.0, seed=3))
    assert 1.6 < table.std() < 2.4  # N(0, 2^2) over 544 draws
    source = OracleScores(task, errors=table, scale=0.5)
    prompts = tok(["sea calm :", "sea :", "sky :"])["input_ids"]
    response = tok("wave wave star . <eos>", add_special_tokens=False)["input_ids"]
    ids, mask, width = _padded(tok, prompts, [response] * 3)
    scores = source(ids, mask, width).double()
    for row, topic in enumerate([0, 0, 1]):
        credit = [c + table[topic, t] for c, t in zip(task.token_credit(prompts[row], response), response)]
        expected = 0.5 * torch.tensor(credit, dtype=torch.float64).cumsum(0)
        assert torch.allclose(scores[row, width:], expected, atol=1e-5)
    # the same prompt topic, the same errors: a policy can aim for them; another topic, other errors
    assert torch.equal(scores[0, width:], scores[1, width:]) and not torch.equal(scores[0, width:], scores[2, width:])
    assert torch.equal(scores, source(ids, mask, width).double())  # no randomness at all
    with pytest.raises(ValueError, match=r"errors: expected a \[8, 68\] table"):
        OracleScores(task, errors=np.zeros((3, 3)))


def test_oracle_measures_and_matching_accuracy():
    from red_ppo.sources import match_accuracy, oracle_measures, pair_accuracy, systematic_errors, truth_sd

    task, prompts, responses = _pool()
    exact = oracle_measures(task, prompts, responses)
    assert exact["heldout_accuracy"] == 1.0 and exact["fidelity_spearman"] == pytest.approx(1.0)
    assert exact["score_sd"] == pytest.approx(truth_sd(task, prompts, responses))
    unit = systematic_errors(1.0, seed=0)
    for kind in ("noise", "errors"):
        def accuracy(x):
            kwargs = {"noise": x} if kind == "noise" else {"errors": x * unit}
            return oracle_measures(task, prompts, responses, **kwargs)["heldout_accuracy"]
        small, large = accuracy(0.5), accuracy(4.0)
        assert 1.0 > small > large > 0.5, kind
        sigma = match_accuracy(accuracy, 0.75)
        # one held-out pair is 1/pairs of accuracy: bisection lands on the step nearest the target
        pairs = sum(task.score(prompts[i], responses[i]) != task.score(prompts[i + 1], responses[i + 1])
                    for i in range(0, len(prompts), 2))
        assert abs(accuracy(sigma) - 0.75) <= 1.5 / pairs, kind
    assert match_accuracy(lambda x: 0.9, 0.5, high=8.0) == 8.0  # out of reach: the largest error
    assert pair_accuracy([1.0, 1.0, 2.0, 1.0], [2.0, 1.0, 3.0, 0.0]) == 0.75  # a tied score counts one half


def test_study_settings_are_validated():
    with pytest.raises(ConfigError, match=r"study.rm_levels: expected a non-empty increasing list"):
        load_config(default_config_path(), ["study.rm_levels=[64, 32]"])
    with pytest.raises(ConfigError, match=r"study.control_sources: expected a list of distinct sources from"):
        load_config(default_config_path(), ["study.control_sources=[learned-9]"])
    with pytest.raises(ConfigError, match=r"study.critic_init: expected one of"):
        load_config(default_config_path(), ["study.critic_init=reward_model"])


def test_the_study_is_fixed_in_advance():
    """The committed configuration: ten or more paired seeds, every source standardised to one scale, the
    controls beside the oracle, the reward-model critic beside a learned model."""
    cfg = load_config(default_config_path())
    assert len(cfg.study.seeds) >= 10 and cfg.study.standardise
    assert "oracle" in cfg.study.control_sources and cfg.study.rm_critic_sources
    assert cfg.synthetic.rm_init == "scratch"


def test_demo_and_study_need_evaluations(tmp_path):
    from red_ppo.demo import run_demo
    from red_ppo.study import run_study

    cfg = load_config(default_config_path(), [f"run.output_dir={tmp_path}", "run.eval_prompts=0"])
    for run in (run_demo, run_study):
        with pytest.raises(ConfigError, match="run.eval_prompts: expected at least 1 for red-ppo demo and study"):
            run(cfg)


def test_tiny_study_quick_end_to_end(tmp_path):
    from red_ppo.cli import main
    from red_ppo.pretrain import credit_fidelity

    overrides = ["run.eval_every=1", "run.eval_prompts=8", "run.progress=false", "rollout.batch_size=8",
                 "rollout.forward_batch_size=8", "ppo.minibatch_size=4", "generation.max_new_tokens=6",
                 "synthetic.sft_steps=4", "synthetic.sft_batch_size=8", "synthetic.rm_pairs=48",
                 "synthetic.rm_batch_size=8", "synthetic.heldout_responses=64",
                 "demo.workers=2", "study.quick_seeds=[0, 1]", "study.quick_rm_levels=[6]",
                 "study.quick_control_sources=[oracle, learned-1]", "study.quick_rm_critic_sources=[learned-1]",
                 "study.quick_total_steps=2", "study.eval_prompts=8",
                 "study.diagnose_prefixes=12", "study.diagnose_continuations=4",
                 f"synthetic.policy_config={json.dumps(TINY_POLICY)}"]
    args = ["study", "--quick", "--run-dir", str(tmp_path / "study")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    out = tmp_path / "study"
    saved = json.loads((out / "summary.json").read_text())
    sources = json.loads((out / "sources.json").read_text())
    names = ["oracle", "noise-1", "systematic-1", "learned-1"]
    assert [s["name"] for s in sources["sources"]] == names == [p["name"] for p in saved["points"]]
    # the one scale, fixed before any PPO run: sources.json is older than every run's metrics
    first_run = min(f.stat().st_mtime for f in out.glob("*/*-seed*/metrics.jsonl"))
    assert (out / "sources.json").stat().st_mtime < first_run
    for s in sources["sources"]:
        assert s["scale"] * s["score_sd"] == pytest.approx(sources["truth_sd"], rel=1e-9), s["name"]
    # a learned source is its reward model with the head scaled: every prefix score times the factor, so its
    # held-out sd is the truth's
    from transformers import AutoModelForSequenceClassification

    from red_kernels.hf import score_prefixes

    held = json.loads((out / "reward_model" / "heldout.json").read_text())
    learned = sources["sources"][-1]
    scaled = AutoModelForSequenceClassification.from_pretrained(learned["reward_model"]).eval()
    original = AutoModelForSequenceClassification.from_pretrained(out / "reward_model" / "step-000006").eval()
    tok = build_tokenizer()
    ids, mask, width = _padded(tok, held["prompts"][:8], held["responses"][:8])
    with torch.no_grad():
        a, b = (score_prefixes(m, ids, mask, width).scores for m in (scaled, original))
    assert torch.allclose(a, learned["scale"] * b, rtol=1e-5, atol=1e-6)
    m = credit_fidelity(scaled, tok, SyntheticTask(), held["prompts"], held["responses"])
    assert m["score_sd"] == pytest.approx(sources["truth_sd"], rel=1e-4)
    # the oracle's two kinds are matched to the learned model's accuracy (bisection), or, for a model worse than
    # chance (this tiny one may be), given the largest error
    acc = {s["kind"]: s["heldout_accuracy"] for s in sources["sources"] if s["level"] == 1}
    pairs = len(held["responses"]) // 2
    for kind in ("noise", "systematic"):
        sigma = next(s["sigma"] for s in sources["sources"] if s["name"] == f"{kind}-1")
        assert abs(acc[kind] - acc["learned"]) <= 1.5 / pairs or (sigma == 64.0 and acc[kind] > acc["learned"])
    runs = saved["runs"]
    controls = {"sparse", "red", "sparse-lam1", "sparse-noclip"}
    assert set(runs["oracle"]) == controls and set(runs["learned-1"]) == controls | {"sparse-rm-critic"}
    assert set(runs["noise-1"]) == set(runs["systematic-1"]) == {"sparse", "red"}
    for point in saved["points"]:
        d = point["paired"]["red - sparse"]["area"]
        assert d["n"] == 2 and math.isfinite(d["mean"]) and 0.0 <= d["sign_p"] <= 1.0
    assert "sparse-lam1 - sparse" in saved["points"][0]["paired"]
    # the diagnostic's validation: every source's consistency beside its measured gain, as `verdict` reads it
    from red_ppo.diagnose import load_validation, thresholds

    validated = load_validation(out / "diagnose_validation.json")
    # the verdict's sources are the deterministic ones (a reward model cannot redraw its noise at every call)
    assert [s["name"] for s in validated] == ["oracle", "systematic-1", "learned-1"]
    assert set(thresholds(validated)) == {"helps_above", "no_help_below", "separates"}
    points = {p["name"]: p for p in saved["points"]}
    for s in validated:
        assert s["gain"] == points[s["name"]]["paired"]["red - sparse"]["area"]["mean"]
        assert s["consistency"] == points[s["name"]]["diagnose"]["consistency"]
        assert points[s["name"]]["diagnose"]["prefixes"] == 12
    assert [s["name"] for s in saved["validation"]["independent_noise"]] == ["noise-1"]
    assert saved["validation"]["consistency_vs_gain"]["n"] == 4
    assert (out / "study.png").stat().st_size > 0
    assert "RED - sparse, GT area" in saved["table"] and "controls" in saved["table"]


def test_reward_model_recipe_learns_on_a_quick_setting(tmp_path):
    """The study's reward-model recipe (`rm_init: scratch`, fresh pairs, the demo's pair mix) on a small
    setting: 100 optimiser steps of 32 pairs on a briefly trained policy's responses. Measured here: held-out
    accuracy 62.3% (231 pairs, so a standard error of about 3 points) and token-credit fidelity 0.16, where chance
    is 50% and 0; the run is deterministic for a given CPU and thread count. The full recipe's accuracies are the
    study's own measures (sources.json)."""
    from red_ppo.pretrain import pretrain_policy, train_reward_model
    from red_ppo.synthetic import SyntheticConfig

    demo = load_config(default_config_path()).synthetic
    s = SyntheticConfig(max_words=demo.max_words, verbose_after=demo.verbose_after, proper_end=demo.proper_end,
                        no_eos=demo.no_eos, sft_steps=20, sft_batch_size=32, rm_init=demo.rm_init, rm_pairs=3200,
                        rm_batch_size=32, rm_epochs=1, rm_prefix_pairs=demo.rm_prefix_pairs,
                        rm_edit_pairs=demo.rm_edit_pairs, rm_lr=demo.rm_lr, heldout_responses=512)
    task, tok = s.task(), build_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as measured
    try:
        pretrain_policy(task, tok, s, tmp_path / "sft", log=lambda *_: None)
        info = train_reward_model(task, tok, tmp_path / "sft", s, tmp_path / "rm", 24, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert info["init"] == "scratch" and info["steps"] == 100
    assert info["heldout_accuracy"] > 0.56 and info["fidelity_spearman"] > 0.08
