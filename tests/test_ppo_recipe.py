"""The one-GPU recipe, configs/one_gpu.yaml: the file as shipped names a real pair in bf16 with checkpointing, and
the same file with tiny random models, the two test tokenizers (tests/align_tokenizers.py: the reward model's its
own, with its own chat template) and a chat-messages JSONL runs end to end: two steps on the CPU, and three on CUDA
(marked gpu: `make test-gpu` runs it last, without tensorboard or matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from align_tokenizers import policy_tokenizer, rm_tokenizer
from conftest import TINY_MODEL, TINY_POLICY
from red_ppo.config import load_config, to_dict

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "one_gpu.yaml"
CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "A café serves crème brûlée: say it in English."}],
    [{"role": "user", "content": "Numbers like 3.14159 and 2718: which is larger?"}],
    [{"role": "user", "content": "Reward models read text; what do policies write?"}],
    [{"role": "user", "content": "Name a lazy animal."}],
]
# What the tiny run may change in the recipe: where the models, tokenizers, prompts and run folder are, the
# device and the run's length, and the sizes. Precision, checkpointing, rewards, PPO and optimiser stay the recipe's.
TINY_CHANGES = {"model.tokenizer", "model.policy.path", "model.policy.config", "model.reward_model.path",
                "model.reward_model.config", "model.reward_model.tokenizer", "data.prompt_file", "run.output_dir",
                "run.device", "run.total_steps", "run.eval_prompts", "run.num_threads", "run.progress",
                "rollout.batch_size", "rollout.forward_batch_size", "ppo.minibatch_size", "generation.max_new_tokens"}


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "config":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tiny_overrides(tmp_path: Path, device: str, steps: int) -> list[str]:
    """--set overrides that turn the recipe into a run of tiny random models on ``device``."""
    tokenizers = {}
    for name, tokenizer in (("policy", policy_tokenizer()), ("reward_model", rm_tokenizer())):
        tokenizers[name] = tmp_path / f"{name}_tokenizer"
        tokenizer.save_pretrained(tokenizers[name])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    values = {
        "model.tokenizer": str(tokenizers["policy"]), "model.policy.path": None, "model.policy.config": TINY_POLICY,
        "model.reward_model.path": None, "model.reward_model.config": TINY_MODEL,
        "model.reward_model.tokenizer": str(tokenizers["reward_model"]), "data.prompt_file": str(prompts),
        "run.output_dir": str(tmp_path / "run"), "run.device": device, "run.total_steps": steps,
        "run.eval_prompts": 2, "run.num_threads": 1, "run.progress": False, "rollout.batch_size": 4,
        "rollout.forward_batch_size": 2, "ppo.minibatch_size": 4, "generation.max_new_tokens": 6,
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON is YAML


def test_the_recipe_names_a_real_pair_in_bf16_with_checkpointing():
    cfg = load_config(RECIPE)
    m = cfg.model
    assert (m.policy.path, m.reward_model.path) == ("Qwen/Qwen2.5-0.5B-Instruct", "Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    assert m.tokenizer is None and m.reward_model.tokenizer is None  # each model's own, saved with it
    assert (m.dtype, m.gradient_checkpointing, m.critic_init, cfg.run.device) == ("bfloat16", True, "policy", "cuda")
    assert cfg.data.prompt_file.endswith(".jsonl") and cfg.reward.mode == "red"


def test_the_tiny_run_changes_only_paths_length_and_sizes(tmp_path):
    recipe = flat(to_dict(load_config(RECIPE)))
    tiny = flat(to_dict(load_config(RECIPE, tiny_overrides(tmp_path, "cpu", 2))))
    changed = {key for key in recipe.keys() | tiny.keys() if recipe.get(key) != tiny.get(key)}
    assert changed <= TINY_CHANGES, sorted(changed - TINY_CHANGES)


def check_models(trainer, device: str) -> None:
    """The reward model reads its own tokenizer's ids; the trained models keep float32 master weights, the frozen
    ones hold bf16 weights; all on ``device``."""
    assert trainer.reward_model.config.vocab_size == len(rm_tokenizer()) != len(policy_tokenizer())
    for model, dtype in ((trainer.policy, torch.float32), (trainer.critic, torch.float32),
                         (trainer.reference, torch.bfloat16), (trainer.reward_model, torch.bfloat16)):
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(dtype, device)}


def test_the_recipe_runs_end_to_end_on_tiny_models(tmp_path):
    from red_ppo.metrics import read_metrics
    from red_ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(RECIPE, tiny_overrides(tmp_path, "cpu", 2)))
    check_models(trainer, "cpu")
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]  # the recipe evaluates the starting policy too
    for key in ("loss/policy", "loss/value", "reward/score", "eval/score"):
        assert math.isfinite(rows[-1][key]), key
    assert (tmp_path / "run" / "final" / "policy").is_dir()


@pytest.mark.gpu
def test_the_recipe_runs_on_cuda(tmp_path):
    from red_ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(RECIPE, tiny_overrides(tmp_path, "cuda", 3)))
    check_models(trainer, "cuda")
    for _ in range(3):  # train_step, not train: no tensorboard, matplotlib or checkpoint needed on the GPU machine
        row = trainer.train_step()
        trainer.step += 1
        for key in ("loss/policy", "loss/value", "reward/score", "grad_norm/policy", "grad_norm/critic"):
            assert math.isfinite(row[key]), (trainer.step, key, row[key])
