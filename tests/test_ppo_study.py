"""`red-ppo study`: the noisy oracle's measured fidelity and a tiny end-to-end `--quick` run."""

import json
import math

import pytest

from conftest import TINY_POLICY
from red_ppo.config import ConfigError, default_config_path, load_config
from red_ppo.synthetic import SyntheticTask, build_tokenizer

pytest.importorskip("transformers")

def test_oracle_fidelity_falls_with_noise():
    import random

    from red_ppo.study import oracle_fidelity

    tok, task = build_tokenizer(), SyntheticTask()
    rng = random.Random(0)
    prompts = [task.sample_prompt(rng) for _ in range(200)]
    responses = [task.sample_response(rng, p.split()[0], perturb=True) for p in prompts]
    p_ids = tok(prompts)["input_ids"]
    r_ids = tok(responses, add_special_tokens=False)["input_ids"]
    assert oracle_fidelity(task, p_ids, r_ids, 0.0) == pytest.approx(1.0)
    small, large = oracle_fidelity(task, p_ids, r_ids, 0.3), oracle_fidelity(task, p_ids, r_ids, 3.0)
    assert 1.0 > small > large > 0.0
    assert oracle_fidelity(task, p_ids, r_ids, 3.0, seed=0) == large  # its own generator, fixed seed


def test_demo_and_study_need_evaluations(tmp_path):
    from red_ppo.demo import run_demo
    from red_ppo.study import run_study

    cfg = load_config(default_config_path(), [f"run.output_dir={tmp_path}", "run.eval_prompts=0"])
    for run in (run_demo, run_study):
        with pytest.raises(ConfigError, match="run.eval_prompts: expected at least 1 for red-ppo demo and study"):
            run(cfg)


def test_study_settings_are_validated():
    with pytest.raises(ConfigError, match=r"study.noise_levels: expected a list of numbers > 0, got \[0\]"):
        load_config(default_config_path(), ["study.noise_levels=[0]"])
    with pytest.raises(ConfigError, match=r"study.quick_rm_pairs: expected a list of distinct integers >= 2"):
        load_config(default_config_path(), ["study.quick_rm_pairs=[8, 8]"])


def test_tiny_study_quick_end_to_end(tmp_path):
    from red_ppo.cli import main

    overrides = ["run.eval_every=1", "run.eval_prompts=8", "run.progress=false", "rollout.batch_size=8",
                 "rollout.forward_batch_size=8", "ppo.minibatch_size=4", "generation.max_new_tokens=6",
                 "synthetic.sft_steps=4", "synthetic.sft_batch_size=8", "synthetic.rm_pairs=16",
                 "synthetic.rm_batch_size=8", "synthetic.heldout_responses=16", "demo.bootstrap=200",
                 "demo.workers=1", "study.quick_seeds=[0, 1]", "study.quick_noise_levels=[2.0]",
                 "study.quick_rm_pairs=[8, 16]", "study.quick_total_steps=2",
                 f"synthetic.policy_config={json.dumps(TINY_POLICY)}"]
    args = ["study", "--quick", "--run-dir", str(tmp_path / "study")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    saved = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert saved["quick"] and saved["settings"]["total_steps"] == 2
    names = [p["name"] for p in saved["points"]]
    assert names == ["oracle", "oracle+noise2", "learned-8pairs", "learned-16pairs"]
    for point in saved["points"]:
        assert -1.0 <= point["fidelity"] <= 1.0 and point["gain_area"]["n"] == 2
        assert math.isfinite(point["gain_area"]["mean"])
    assert saved["points"][0]["fidelity"] == 1.0
    assert (tmp_path / "study" / "reward_model-8pairs" / "pretrain.json").is_file()
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    assert "fidelity rho" in saved["table"]
