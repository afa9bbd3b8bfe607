"""What a run writes for a researcher: the policy as a Hugging Face folder beside every checkpoint (tokenizer and
chat template included, pruned with the checkpoints), the samples of each evaluation with their scores and a page of
RED token rewards, the win rate against the initial policy and a judge's, ``run.report_to`` (W&B through a fake
module: wandb is not a dependency), and an exact resume with all of it switched on."""

import html
import importlib.machinery
import json
import math
import random
import re
import sys
import types

import numpy as np
import pytest
import torch

from conftest import tiny_config
from red_ppo import checkpoint as ckpt
from red_ppo.config import ConfigError, load_config, to_dict
from red_ppo.data import Prompt
from red_ppo.metrics import read_metrics
from red_ppo.rewards import red_rewards
from red_ppo.samples import reward_page, token_texts

pytest.importorskip("transformers")

# Three steps, two epochs of minibatches of 4 with a learning rate large enough that the policy moves every step.
RUN = {
    "run": {"total_steps": 3, "save_every": 1, "eval_every": 1, "eval_prompts": 8, "num_threads": 1,
            "progress": False},
    "generation": {"max_new_tokens": 6},
    "rollout": {"forward_batch_size": 8},
    "ppo": {"epochs": 2},
    "optim": {"policy_lr": 1e-2, "critic_lr": 1e-3},
}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
TIMING = ("time/", "throughput/")
SPAN = re.compile(r'<span style="background: rgba\((\d+), (\d+), (\d+), ([\d.]+)\)" title="([^"]+)">(.*?)</span>',
                  re.S)


def tiny(tmp_path, name="run", **sections) -> dict:
    return tiny_config(RUN, {"run": {"output_dir": str(tmp_path / name)}}, sections)


def chat_tokenizer():
    from red_ppo.synthetic import build_tokenizer
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def trainer_for(data, **kwargs):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=data), tokenizer=chat_tokenizer(), **kwargs)


def fake_wandb(monkeypatch) -> list:
    """A ``wandb`` module in sys.modules that records its calls."""
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe it with find_spec
    module.init = lambda **kwargs: calls.append(("init", kwargs))
    module.log = lambda row, step: calls.append(("log", row, step))
    module.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def record_reward_scores(trainer) -> list:
    """Wrap the trainer's reward path: every call's (rollout, scores, token rewards)."""
    calls, original = [], trainer.reward_scores

    def recording(rollout, prompts):
        scores, token_rewards = original(rollout, prompts)
        calls.append((rollout, scores, token_rewards))
        return scores, token_rewards

    trainer.reward_scores = recording
    return calls


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def page_tokens(page: str) -> list[list[tuple]]:
    """Per sample of a reward page: (r, g, b, alpha, exact reward, token text) of each response token."""
    samples = re.findall(r'<div class="response">(.*?)</div>', page, re.S)
    return [[(int(r), int(g), int(b), float(a), float(value), text) for r, g, b, a, value, text in SPAN.findall(s)]
            for s in samples]


def test_every_checkpoint_has_a_hugging_face_folder_that_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tiny(tmp_path, run={"eval_every": 0, "eval_prompts": 0, "keep_checkpoints": 2})
    trainer = trainer_for(data)
    trainer.train()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002-hf", "step-000002.pt", "step-000003-hf",
                                                        "step-000003.pt"]  # step 1 pruned, no temporary left
    policy = AutoModelForCausalLM.from_pretrained(folder / "step-000003-hf")
    for name, tensor in trainer.policy.state_dict().items():
        assert torch.equal(policy.state_dict()[name], tensor), name
    earlier = AutoModelForCausalLM.from_pretrained(folder / "step-000002-hf").state_dict()
    state = ckpt.load_checkpoint(folder / "step-000002.pt")["policy"]
    assert all(torch.equal(earlier[name], tensor) for name, tensor in state.items())
    assert not all(torch.equal(earlier[name], tensor) for name, tensor in trainer.policy.state_dict().items())

    tokenizer = AutoTokenizer.from_pretrained(folder / "step-000003-hf")
    assert tokenizer.chat_template == TEMPLATE
    messages = [{"role": "user", "content": "sea calm"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        trainer.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.get_vocab() == trainer.tokenizer.get_vocab()
    assert (tokenizer.eos_token, tokenizer.pad_token) == (trainer.tokenizer.eos_token, trainer.tokenizer.pad_token)


class FakePretrained:
    """Something with save_pretrained: one file holding a tag."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def save_pretrained(self, folder) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.txt").write_text(self.tag)


def test_hugging_face_folders_are_replaced_whole_and_pruned_with_the_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_checkpoint(folder, step, {"step": step}, keep=2, pretrained=(FakePretrained(f"v{step}"),))
    (folder / ".step-000007-hf.tmp-123").mkdir()  # left by a crash while saving
    (folder / "step-000009-hf").mkdir()  # a folder whose .pt was never written
    ckpt.save_checkpoint(folder, 2, {"step": 2}, keep=2, pretrained=(FakePretrained("again"),))
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001-hf", "step-000001.pt", "step-000002-hf",
                                                        "step-000002.pt"]
    assert (folder / "step-000002-hf" / "weights.txt").read_text() == "again"
    ckpt.save_checkpoint(folder, 3, {"step": 3}, keep=2, pretrained=(FakePretrained("v3"),))
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002-hf", "step-000002.pt", "step-000003-hf",
                                                        "step-000003.pt"]


def test_samples_page_and_win_rate_on_a_tiny_run(tmp_path):
    trainer = trainer_for(tiny(tmp_path, run={"sample_pages": 3}))
    history = trainer.train()
    out = tmp_path / "run" / "samples"
    assert sorted(p.name for p in out.iterdir()) == [f"step-00000{s}.{x}" for s in range(4) for x in ("html", "jsonl")]

    # Step 0: the policy is still the reference and is sampled with the same seed, so every response ties.
    first = read_jsonl(out / "step-000000.jsonl")
    assert history[0]["eval/win_rate"] == 0.5
    assert all(r["response"] == r["baseline_response"] and r["score"] == r["baseline_score"] and r["win"] == 0.5
               for r in first)
    last = read_jsonl(out / "step-000003.jsonl")
    assert [r["prompt"] for r in last] == [p.text for p in trainer.eval_prompts]
    assert [(r["baseline_response"], r["baseline_score"]) for r in last] == [(r["response"], r["score"]) for r in first]
    wins = [1.0 if r["score"] > r["baseline_score"] else 0.5 if r["score"] == r["baseline_score"] else 0.0
            for r in last]
    assert [r["win"] for r in last] == wins
    assert history[-1]["eval/win_rate"] == sum(wins) / len(wins) and set(wins) != {0.5}  # the policy moved
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["eval/win_rate"] == history[-1]["eval/win_rate"]

    # Evaluating again at step 3 writes the same files, and shows what the reward path gave.
    page, lines = (out / "step-000003.html").read_text(), (out / "step-000003.jsonl").read_text()
    calls = record_reward_scores(trainer)
    assert trainer.evaluate() == {k: v for k, v in history[-1].items() if k.startswith("eval/")}
    assert (out / "step-000003.html").read_text() == page and (out / "step-000003.jsonl").read_text() == lines
    responses, scores, rewards = [], [], []
    for rollout, part_scores, token_rewards in calls:
        responses += rollout.response_lists()
        scores += part_scores.tolist()
        response_rewards = red_rewards(token_rewards, rollout.prompt_width, rollout.response_mask)
        rewards += [row[:len(r)].tolist() for row, r in zip(response_rewards, rollout.response_lists())]
    assert [r["score"] for r in last] == scores
    assert [r["response"] for r in last] == [trainer.tokenizer.decode(r, skip_special_tokens=True) for r in responses]

    shown = page_tokens(page)
    assert len(shown) == 3
    scale = max(abs(v) for tokens in shown for *_, v, _ in tokens)
    assert f"<span>+{scale:.4g}</span>" in page and f"<span>{-scale:.4g}</span>" in page  # the legend's scale
    for tokens, expected, ids in zip(shown, rewards, responses):
        assert [value for *_, value, _ in tokens] == expected  # exactly, in float32
        assert html.unescape("".join(text for *_, text in tokens)) == \
            trainer.tokenizer.decode(ids, skip_special_tokens=False)
        for r, g, b, alpha, value, _ in tokens:
            assert (r, g, b) == ((22, 163, 74) if value > 0 else (220, 38, 38))
            assert alpha == pytest.approx(abs(value) / scale, abs=1e-3)


def test_the_reward_page_escapes_text_and_needs_nothing_else():
    tokens = ['<script>alert("x")</script>', " & ", "'", "\n"]
    page = reward_page(5, [{"prompt": "<b>bold</b> & co", "tokens": tokens, "rewards": [-2.0, 0.0, 0.5, 1.0],
                            "score": 1.5}])
    assert "<script" not in page and "<b>" not in page and "http" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    shown = page_tokens(page)[0]
    assert [text for *_, text in shown] == ["&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", " &amp; ", "&#x27;",
                                           "\n"]
    assert [value for *_, value, _ in shown] == [-2.0, 0.0, 0.5, 1.0]
    assert [alpha for *_, alpha, _, _ in shown] == [1.0, 0.0, 0.25, 0.5]


def test_token_texts_read_as_the_decoded_response():
    from align_tokenizers import policy_tokenizer

    tokenizer = policy_tokenizer()
    text = "The quick brown fox: every prefix has a score!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) > 5 and "".join(texts) == text


def test_a_judge_gives_its_own_win_rate_and_is_checked(tmp_path):
    from red_ppo.trainer import PPOTrainer

    seen = []

    def judge(prompts, responses, baseline_responses):
        seen.append((prompts, responses, baseline_responses))
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
                for a, b in zip(responses, baseline_responses)]

    trainer = trainer_for(tiny(tmp_path, run={"total_steps": 1, "eval_every": 0}), judge=judge)
    row = trainer.train()[-1]
    prompts, responses, baselines = seen[-1]
    assert all(isinstance(p, Prompt) for p in prompts) and prompts == trainer.eval_prompts
    lines = read_jsonl(tmp_path / "run" / "samples" / "step-000001.jsonl")
    assert responses == [r["response"] for r in lines] and baselines == [r["baseline_response"] for r in lines]
    verdicts = judge(prompts, responses, baselines)
    assert [r["judge"] for r in lines] == verdicts
    assert row["eval/judge_win_rate"] == sum(verdicts) / len(verdicts)

    for wrong in ([1.0] * 7, [1.5] * 8, [float("nan")] * 8, [True] * 8, "wins", None):
        trainer.judge = lambda prompts, responses, baseline_responses, wrong=wrong: wrong
        with pytest.raises(ValueError, match=r"judge: expected a list of 8 numbers in \[0, 1\]"):
            trainer.evaluate()
    with pytest.raises(TypeError, match="judge: expected a callable"):
        PPOTrainer(load_config(base=tiny(tmp_path)), judge="gpt-4")


def test_evaluation_leaves_the_training_rng_untouched(tmp_path):
    trainer = trainer_for(tiny(tmp_path))
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    trainer.evaluate()  # samples the reference's responses first, then the policy's
    assert trainer.baseline is not None
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_report_to_wandb_and_tensorboard(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    data = tiny(tmp_path, run={"report_to": ["tensorboard", "wandb"], "wandb_project": "chat-ppo", "save_every": 0})
    trainer = trainer_for(data)
    trainer.train()
    out = tmp_path / "run"
    assert calls[0] == ("init", {"project": "chat-ppo", "name": "run", "config": to_dict(trainer.cfg),
                                 "dir": str(out)})
    assert calls[-1] == ("finish",)
    logged = calls[1:-1]
    rows = read_metrics(out / "metrics.jsonl")
    assert [step for _, _, step in logged] == [row["step"] for row in rows] == [0, 1, 2, 3]
    for (_, values, _), row in zip(logged, rows):
        assert set(values) == set(row) - {"step"} and "eval/win_rate" in values
        assert all(values[k] == row[k] for k in values if row[k] is not None)
    assert any((out / "tb").iterdir())

    calls.clear()
    only = tiny(tmp_path, "only", run={"report_to": ["wandb"], "total_steps": 1, "save_every": 0})
    trainer_for(only).train()
    assert calls[0][1]["project"] == "red-ppo" and calls[0][1]["name"] == "only"
    assert not (tmp_path / "only" / "tb").exists()


def test_a_missing_wandb_is_a_configuration_error_before_any_model_loads(tmp_path, monkeypatch):
    import red_ppo.trainer

    def loads(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(red_ppo.trainer, "check_resources", loads)
    monkeypatch.setattr(red_ppo.trainer, "build_model", loads)
    with pytest.raises(ConfigError, match=r"run\.report_to: expected wandb to be installed .*pip install wandb"):
        red_ppo.trainer.PPOTrainer(load_config(base=tiny(tmp_path, run={"report_to": ["wandb"]})))


@pytest.mark.parametrize("value", [["tensorboard", "mlflow"], ["wandb", "wandb"], "wandb", ["none", "wandb"], [3]])
def test_report_to_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"run\.report_to: expected a list"):
        load_config(base=tiny(tmp_path, run={"report_to": value}))


def test_report_to_and_sample_pages_values(tmp_path):
    assert load_config(base=tiny(tmp_path)).run.report_to == ["tensorboard"]
    for value in ([], ["none"], ["wandb", "tensorboard"]):
        assert load_config(base=tiny(tmp_path, run={"report_to": value})).run.report_to == value
    with pytest.raises(ConfigError, match=r"run\.sample_pages: expected an integer >= 0, got -1"):
        load_config(base=tiny(tmp_path, run={"sample_pages": -1}))


def test_no_tracker_and_no_page(tmp_path):
    trainer_for(tiny(tmp_path, run={"report_to": ["none"], "sample_pages": 0, "total_steps": 1})).train()
    out = tmp_path / "run"
    assert not (out / "tb").exists()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.jsonl", "step-000001.jsonl"]


def test_resume_is_exact_with_every_output_on(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    settings = {"reward": {"mode": "red", "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 100},
                "run": {"total_steps": 4, "save_every": 1, "eval_every": 1, "sample_pages": 2,
                        "report_to": ["tensorboard", "wandb"]}}

    def judge(prompts, responses, baseline_responses):
        return [float(a < b) for a, b in zip(responses, baseline_responses)]

    trainer_for(tiny(tmp_path, "whole", **settings), judge=judge).train()
    parts = tiny(tmp_path, "parts", **settings)
    trainer_for(parts, judge=judge).train(stop_after=2)
    assert ckpt.load_checkpoint(tmp_path / "parts" / "checkpoints" / "step-000002.pt")["baseline"] is not None
    (tmp_path / "parts" / "samples" / "step-000009.jsonl").write_text("as if written after the checkpoint\n")
    calls.clear()
    resumed = trainer_for(parts, judge=judge)
    resumed.train(resume=True)
    assert [step for _, _, step in calls[1:-1]] == [3, 4]

    def deterministic(run):
        return [{k: v for k, v in row.items() if not k.startswith(TIMING)}
                for row in read_metrics(tmp_path / run / "metrics.jsonl")]

    whole = deterministic("whole")
    assert whole == deterministic("parts")  # rewards, losses, win rates, judge, bit for bit
    assert [row["step"] for row in whole] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(row["eval/judge_win_rate"]) for row in whole)
    for run in ("whole", "parts"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == \
            ["step-000003-hf", "step-000003.pt", "step-000004-hf", "step-000004.pt"]
    written = sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "parts" / "samples").iterdir())
    for name in written:
        assert (tmp_path / "whole" / "samples" / name).read_bytes() == \
            (tmp_path / "parts" / "samples" / name).read_bytes(), name
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "whole" / "checkpoints" / "step-000004-hf" / name).read_bytes() == \
            (tmp_path / "parts" / "checkpoints" / "step-000004-hf" / name).read_bytes()
