"""The synthetic language, its hidden scorer, and a tiny run of the whole demo."""

import json
import math
import random

import pytest

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


TINY_POLICY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
               "tie_word_embeddings": True}


def test_tiny_demo_end_to_end(tmp_path):
    from red_ppo.demo import run_demo

    overrides = [f"run.output_dir={tmp_path / 'demo'}", "run.total_steps=2", "run.eval_every=1",
                 "run.eval_prompts=8", "run.progress=false", "rollout.batch_size=8", "rollout.forward_batch_size=8",
                 "ppo.minibatch_size=4", "generation.max_new_tokens=6", "synthetic.sft_steps=4",
                 "synthetic.sft_batch_size=8", "synthetic.rm_pairs=16", "synthetic.rm_batch_size=8",
                 "synthetic.heldout_responses=16", "demo.seeds=[0, 1]",
                 f"synthetic.policy_config={json.dumps(TINY_POLICY)}"]
    cfg = load_config(default_config_path(), overrides)
    lines = []
    summary = run_demo(cfg, log=lines.append)
    out = tmp_path / "demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["table"] == summary["table"] and summary["table"] in lines
    assert set(saved["modes"]) == {"sparse", "red"}
    for mode in ("sparse", "red"):
        agg = saved["modes"][mode]
        assert agg["final_gt_score"]["n"] == 2 and math.isfinite(agg["final_rm_score"]["mean"])
        assert len(saved["runs"][mode]) == 2
    assert -1.0 <= saved["reward_model"]["fidelity_spearman"] <= 1.0
    assert (out / "reward_curves.png").stat().st_size > 0
    assert (out / "sft" / "pretrain.json").is_file() and (out / "reward_model" / "pretrain.json").is_file()
    assert "RED token-credit fidelity" in summary["table"]

    # Steps 1 and 2 are cached and reused.
    again = []
    run_demo(load_config(default_config_path(), overrides + ["demo.seeds=[0]", "demo.modes=[red]"]), log=again.append)
    assert any("reusing" in line and "sft" in line for line in again)
    assert any("reusing" in line and "reward_model" in line for line in again)
