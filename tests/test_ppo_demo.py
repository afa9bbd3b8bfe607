"""The synthetic language, its hidden scorer, and a tiny run of the whole demo."""

import json
import math
import random

import pytest

from conftest import TINY_POLICY
from red_ppo.config import default_config_path, load_config
from red_ppo.synthetic import NO_EOS, PROPER_END, SyntheticTask, build_tokenizer, rank, spearman

pytest.importorskip("transformers")


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_tokenizer_is_a_real_left_padding_tokenizer():
    tok = build_tokenizer()
    assert tok.padding_side == "left" and len(tok) == 68
    batch = tok(["sea :", "sky calm :"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["input_ids"][0][1] == tok.bos_token_id
    assert tok.decode(ids(tok, "wave boat . <eos>"), skip_special_tokens=True) == "wave boat ."
    assert ids(tok, "zzz") == [tok.unk_token_id]


def test_ground_truth_credit_by_hand():
    tok, task = build_tokenizer(), SyntheticTask()
    prompt = ids(tok, "sea calm :", special=True)
    # wave (+1), wave again (+1 - 1), star (other topic -1), the (0), '.' (0), <eos> after '.' (+2)
    credit = task.token_credit(prompt, ids(tok, "wave wave star the . <eos>"))
    assert credit == [1.0, 0.0, -1.0, 0.0, 0.0, PROPER_END]
    # <eos> without '.', then nothing after it counts
    assert task.token_credit(prompt, ids(tok, "fish <eos> wave")) == [1.0, 0.0]
    # no <eos>: the last token carries the penalty; a malformed token costs 1
    assert task.token_credit(prompt, ids(tok, "boat :")) == [1.0, -1.0 + NO_EOS]
    # every word after the tenth is verbose
    long = task.token_credit(prompt, ids(tok, " ".join(["wave", "boat"] * 6) + " . <eos>"))
    assert long[:10] == [1.0] * 10 and long[10:12] == [0.5, 0.5] and long[-1] == PROPER_END
    assert task.score(prompt, ids(tok, "wave . <eos>")) == 3.0
    metrics = task.metrics([prompt, prompt], [ids(tok, "wave . <eos>"), ids(tok, "wave")])
    assert metrics == {"gt/score": (3.0 + 1.0 + NO_EOS) / 2, "gt/proper_ending": 0.5}


def test_language_samples_are_well_formed():
    tok, task = build_tokenizer(), SyntheticTask(max_words=12)
    rng = random.Random(0)
    for _ in range(200):
        prompt = task.sample_prompt(rng)
        response = task.sample_response(rng, prompt.split()[0])
        words = response.split()
        assert words[-1] == "<eos>" and 2 <= len(words) <= 14
        assert tok.unk_token_id not in ids(tok, response)


def test_rank_correlation():
    assert rank([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_oracle_scores_are_the_true_prefix_credit():
    import torch

    from red_ppo.demo import OracleScores
    from red_ppo.rollout import build_rollout, left_pad

    tok, task = build_tokenizer(), SyntheticTask(verbose_after=2, proper_end=0.5, no_eos=-1.0)
    prompts = [ids(tok, "sea calm :", special=True), ids(tok, "sky :", special=True)]
    responses = [ids(tok, "wave wave star the . <eos> fish"), ids(tok, "cloud rain rain : the moon star")]
    width = max(len(r) for r in responses)
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    padded = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    rollout = build_rollout(prompt_ids, prompt_mask, padded, tok.eos_token_id, tok.pad_token_id)
    P = rollout.prompt_width
    state = torch.get_rng_state()
    scores = OracleScores(task)(rollout.input_ids, rollout.attention_mask, P)
    assert torch.equal(torch.get_rng_state(), state)
    for row, (prompt, response) in enumerate(zip(rollout.prompt_lists(), rollout.response_lists())):
        credit = task.token_credit(prompt, response)
        assert scores[row, :P].abs().sum() == 0
        differences = torch.diff(scores[row, P:P + len(response)], prepend=torch.zeros(1))
        assert differences.tolist() == pytest.approx(credit)
        assert scores[row, P + len(response) - 1].item() == pytest.approx(task.score(prompt, response))
    assert task.token_credit(prompts[0], ids(tok, "wave boat fish"))[-1] == 1.0 - 0.5 - 1.0  # verbose, no <eos>
    assert task.token_credit(prompts[0], ids(tok, "wave boat fish"), complete=False)[-1] == 1.0 - 0.5
    noisy = OracleScores(task, noise=3.0, seed=1)(rollout.input_ids, rollout.attention_mask, P)
    again = OracleScores(task, noise=3.0, seed=1)(rollout.input_ids, rollout.attention_mask, P)
    assert torch.equal(noisy, again) and not torch.equal(noisy, scores)
    assert torch.equal(noisy[rollout.attention_mask == 0], scores[rollout.attention_mask == 0])


def test_preference_pairs_by_kind():
    from red_ppo.pretrain import make_pair, pair_kinds

    tok, task = build_tokenizer(), SyntheticTask()
    rng = random.Random(0)
    kinds = pair_kinds(10, 0.3, 0.5, rng)
    assert sorted(kinds) == ["edit"] * 5 + ["independent"] * 2 + ["prefix"] * 3
    prompt = ids(tok, "sea :", special=True)
    a, b = ids(tok, "wave boat the . <eos>"), ids(tok, "star <eos>")
    for _ in range(50):
        _, (x, x_done), (y, y_done), kind = make_pair(task, rng, "prefix", prompt, a, b, 48)
        assert kind == "prefix" and 1 <= len(x) < len(y) <= len(a) and y == a[:len(y)] and x == a[:len(x)]
        assert not x_done and y_done == (len(y) == len(a))
        _, (x, x_done), (y, y_done), kind = make_pair(task, rng, "edit", prompt, a, b, 48)
        assert kind == "edit" and x == a and x_done and y_done and y[-1] == tok.eos_token_id
        assert abs(len(y) - len(a)) <= 1 and y != a
    assert make_pair(task, rng, "independent", prompt, a, b, 48)[1:] == ((a, True), (b, True), "independent")
    assert make_pair(task, rng, "prefix", prompt, [tok.eos_token_id], b, 48)[3] == "independent"


def test_curve_measures_and_the_paired_difference_by_hand():
    from red_ppo.stats import curve_area, paired_difference, samples_to_level

    # gains 0, 1, 3 over samples 0, 10, 20: trapezoids 5 + 20, over 20 samples
    assert curve_area([0, 10, 20], [1.0, 2.0, 4.0], start=1.0) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="samples: expected at least two increasing points"):
        curve_area([0, 0], [1.0, 2.0], 0.0)
    assert samples_to_level([0, 10, 20], [1.0, 2.0, 4.0], 2.0) == 10.0
    assert samples_to_level([0, 10, 20], [1.0, 2.0, 4.0], 5.0) is None
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 5: 9.0}, {0: 0.0, 1: 3.0, 2: 1.0})
    assert d["seeds"] == [0, 1, 2] and d["differences"] == [1.0, -1.0, 2.0] and d["mean"] == pytest.approx(2 / 3)
    assert (d["positive"], d["negative"], d["ties"], d["n"]) == (2, 1, 0, 3)
    # squared deviations 1/9 + 25/9 + 16/9 = 14/3 over 2 degrees of freedom; t_{0.975, 2} = 4.302653 (table)
    half = 4.302652730 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert d["ci95"] == pytest.approx([2 / 3 - half, 2 / 3 + half], abs=1e-8)
    assert d["sign_p"] == 1.0  # 2 up and 1 down: P(a split at least this uneven) = 2 (1 + 3) / 8, capped at 1


TINY_DEMO = ["run.total_steps=2", "run.eval_every=1", "run.eval_prompts=8", "run.progress=false",
             "rollout.batch_size=8", "rollout.forward_batch_size=8", "ppo.minibatch_size=4",
             "generation.max_new_tokens=6", "synthetic.sft_steps=4", "synthetic.sft_batch_size=8",
             "synthetic.rm_pairs=16", "synthetic.rm_batch_size=8", "synthetic.heldout_responses=16"]


def test_tiny_demo_end_to_end(tmp_path):
    from red_ppo.demo import run_demo

    overrides = [f"run.output_dir={tmp_path / 'demo'}", *TINY_DEMO, "demo.oracle_seeds=[0]",
                 "demo.learned_seeds=[0, 1]", "demo.workers=2",
                 f"synthetic.policy_config={json.dumps(TINY_POLICY)}"]
    cfg = load_config(default_config_path(), overrides)
    lines = []
    summary = run_demo(cfg, log=lines.append)
    out = tmp_path / "demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["table"] == summary["table"] and summary["table"] in lines
    assert set(saved["arms"]) == {"oracle", "learned"}
    assert set(saved["arms"]["oracle"]) == {"sparse", "red"}
    assert set(saved["arms"]["learned"]) == {"sparse", "red", "sparse-rm-critic"}
    for arm, entry in saved["arms"]["learned"].items():
        assert entry["final_gt"]["n"] == 2 and math.isfinite(entry["area"]["mean"]), arm
    run = saved["runs"]["oracle"]["red"]["0"]
    assert run["curves"]["samples"] == [0, 8, 16] and len(run["curves"]["advantage_spearman"]) == 2
    assert set(saved["paired"]["learned"]) == {"red - sparse", "sparse-rm-critic - sparse", "red - sparse-rm-critic"}
    assert saved["paired"]["learned"]["red - sparse"]["area"]["n"] == 2
    assert math.isfinite(saved["oracle_red_gain"])
    assert (out / "reward_curves.png").stat().st_size > 0 and (out / "credit_correlation.png").stat().st_size > 0
    assert "paired differences per seed" in summary["table"] and "RED token-credit Spearman" in summary["table"]
    assert saved["reward_model"]["pairs"]["prefix"] + saved["reward_model"]["pairs"]["edit"] > 0

    # Steps 1 and 2 are cached and reused.
    again = []
    run_demo(load_config(default_config_path(), overrides + ["demo.learned_seeds=[0]", "demo.oracle_seeds=[]",
                                                           "demo.learned_arms=[red]", "demo.workers=1"]),
             log=again.append)
    assert any("reusing" in line and "sft" in line for line in again)
    assert any("reusing" in line and "reward_model" in line for line in again)
