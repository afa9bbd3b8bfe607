"""End to end on the tiny synthetic setup, built from configs alone: a 3-step run, exact
resume, a NaN stop, the CLI, and rollout log-probs that match what ``generate`` sampled from."""

import json
import math

import pytest
import torch
import yaml

from conftest import TINY_MODEL, tiny_config
from red_ppo import checkpoint as ckpt
from red_ppo.cli import main
from red_ppo.config import ConfigError, load_config
from red_ppo.metrics import read_metrics

pytest.importorskip("transformers")

# Three steps with a save and an eval at step 2; two epochs of two accumulated minibatches of 4.
THREE_STEPS = {
    "run": {"total_steps": 3, "save_every": 2, "eval_every": 2, "eval_prompts": 8, "num_threads": 1, "progress": False},
    "generation": {"max_new_tokens": 6},
    "rollout": {"forward_batch_size": 8},
    "ppo": {"epochs": 2, "grad_accum_steps": 2},
    "optim": {"policy_lr": 1e-3, "critic_lr": 1e-3, "warmup_steps": 2, "schedule": "linear"},
}


def tiny(tmp_path, name="run", **sections) -> dict:
    return tiny_config(THREE_STEPS, {"run": {"output_dir": str(tmp_path / name)}}, sections)


def trainer_for(data):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=data))


TIMING = ("time/", "throughput/")


def deterministic(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


@pytest.mark.parametrize("mode", ["sparse", "red"])
def test_three_steps_from_configs_alone(tmp_path, mode):
    data = tiny(tmp_path, reward={"mode": mode})
    history = trainer_for(data).train()
    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the starting policy's evaluation
    assert rows[1:] == json.loads(json.dumps(history[1:]))
    for row in rows[1:]:
        for key in ("loss/policy", "loss/value", "reward/score", "kl/sequence", "policy/entropy", "policy/clipfrac",
                    "response/length", "throughput/tokens_per_s", "gt/score"):
            assert math.isfinite(row[key]), key
    assert "eval/gt/score" in rows[2] and "eval/score" in rows[3]
    assert [p.name for _, p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002.pt", "step-000003.pt"]
    assert (out / "final" / "policy" / "config.json").is_file() and (out / "final" / "critic.pt").is_file()
    assert (out / "reward_curves.png").stat().st_size > 0
    assert any((out / "tb").iterdir())
    assert yaml.safe_load((out / "config.yaml").read_text())["reward"]["mode"] == mode
    state = ckpt.load_checkpoint(out / "checkpoints" / "step-000003.pt")
    assert {"policy", "critic", "optimizers", "schedulers", "kl_controller", "sampler", "shuffle", "rng"} <= set(state)


def test_resume_is_exact(tmp_path):
    settings = {"reward": {"mode": "red", "kl_estimator": "k3", "adaptive_kl": True, "target_kl": 0.5,
                           "kl_horizon": 100, "whiten": True},
                "run": {"total_steps": 4, "save_every": 0, "eval_every": 0, "eval_prompts": 0}}
    whole = tiny(tmp_path, "whole", **settings)
    trainer_for(whole).train()

    parts = tiny(tmp_path, "parts", **settings)
    trainer_for(parts).train(stop_after=2)
    assert [r["step"] for r in read_metrics(tmp_path / "parts" / "metrics.jsonl")] == [1, 2]
    resumed = trainer_for(parts)
    resumed.train(resume=True)

    a = deterministic(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    b = deterministic(read_metrics(tmp_path / "parts" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b  # every reward, KL, loss and statistic, bit for bit
    final = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000004.pt")
    for name, tensor in resumed.policy.state_dict().items():
        assert torch.equal(tensor, final["policy"][name]), name
    assert resumed.kl_controller.value == final["kl_controller"]["value"]


def test_a_checkpoint_of_an_older_version_resumes_while_the_new_keys_keep_their_defaults(tmp_path):
    settings = {"run": {"total_steps": 3, "save_every": 0, "eval_every": 1, "eval_prompts": 4}}
    whole = tiny(tmp_path, "whole", **settings)
    trainer_for(whole).train()
    parts = tiny(tmp_path, "parts", **settings)
    trainer_for(parts).train(stop_after=1)
    path = tmp_path / "parts" / "checkpoints" / "step-000001.pt"
    state = ckpt.load_checkpoint(path)
    # as an older red_ppo wrote it: without keys added since (at their defaults now) and without the win rate's
    # baseline responses (sampled again from the reference with evaluation's seed: the same ones)
    for section, key in (("data", "messages_key"), ("model", "gradient_checkpointing"), ("model", "lora"),
                         ("rollout", "logprob_chunk")):
        del state["config"][section][key]
    del state["baseline"]
    ckpt.atomic_save(state, path)
    trainer_for(parts).train(resume=True)
    assert deterministic(read_metrics(tmp_path / "whole" / "metrics.jsonl")) == \
        deterministic(read_metrics(tmp_path / "parts" / "metrics.jsonl"))
    # a key the checkpoint does not know, set to something other than its default, is a change
    changed = tiny(tmp_path, "parts", **settings, rollout={"logprob_chunk": 4})
    state = ckpt.load_checkpoint(tmp_path / "parts" / "checkpoints" / "step-000003.pt")
    del state["config"]["rollout"]["logprob_chunk"]
    ckpt.atomic_save(state, tmp_path / "parts" / "checkpoints" / "step-000003.pt")
    with pytest.raises(ConfigError, match=r"rollout\.logprob_chunk: checkpoint None, now 4"):
        trainer_for(changed).train(resume=True)


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    data = tiny(tmp_path, run={"total_steps": 3, "save_every": 1, "eval_every": 0, "eval_prompts": 0})
    trainer_for(data).train()
    (tmp_path / "run" / "checkpoints" / "step-000003.pt").unlink()  # as if killed after logging step 3
    trainer_for(data).train(resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from red_ppo.trainer import NonFiniteLossError

    data = tiny(tmp_path, run={"total_steps": 3, "save_every": 1, "eval_every": 0, "eval_prompts": 0})
    trainer = trainer_for(data)
    original = trainer.score_rollout

    def poisoned(rollout, prompts):
        scores, token_rewards, values = original(rollout, prompts)
        if trainer.step == 1:
            scores = scores * float("nan")
            token_rewards = token_rewards * float("nan")
        return scores, token_rewards, values

    trainer.score_rollout = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 2: the policy loss is nan.*step-000001\.pt"):
        trainer.train()
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000001.pt"]
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000001.pt")
    assert all(torch.isfinite(t).all() for t in state["policy"].values())


def test_resume_errors(tmp_path):
    data = tiny(tmp_path, run={"total_steps": 2, "eval_every": 0, "eval_prompts": 0})
    with pytest.raises(ConfigError, match="--resume: expected a checkpoint"):
        trainer_for(data).train(resume=True)
    trainer_for(data).train(stop_after=1)
    with pytest.raises(ConfigError, match="run.output_dir: expected a folder without a previous run"):
        trainer_for(data).train()
    changed = tiny(tmp_path, run={"total_steps": 2, "eval_every": 0, "eval_prompts": 0}, ppo={"gamma": 0.9})
    with pytest.raises(ConfigError, match=r"--resume: .*ppo\.gamma: checkpoint 1\.0, now 0\.9"):
        trainer_for(changed).train(resume=True)
    # The tiny runs use a linear schedule, which depends on the length: it cannot change.
    longer = tiny(tmp_path, run={"total_steps": 3, "eval_every": 0, "eval_prompts": 0})
    with pytest.raises(ConfigError, match=r"run\.total_steps: checkpoint 2, now 3"):
        trainer_for(longer).train(resume=True)


def test_a_constant_schedule_run_can_be_extended(tmp_path):
    data = tiny(tmp_path, run={"total_steps": 2, "eval_every": 0, "eval_prompts": 0}, optim={"schedule": "constant"})
    trainer_for(data).train()
    data["run"]["total_steps"] = 3
    history = trainer_for(data).train(resume=True)
    assert [row["step"] for row in history] == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_rollout_logprobs_match_the_sampling_distribution(tmp_path):
    from red_ppo.rollout import generate_rollout, left_pad, rollout_logprobs

    trainer = trainer_for(tiny(tmp_path, generation={"temperature": 0.7, "max_new_tokens": 5}))
    prompts = trainer.sampler.next_batch(6)
    ids, mask = left_pad([p.ids for p in prompts], trainer.pad_id)
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=True, max_new_tokens=5, temperature=0.7, top_k=0, top_p=1.0,
                              pad_token_id=trainer.pad_id, eos_token_id=trainer.eos_id, output_logits=True,
                              return_dict_in_generate=True)
    torch.manual_seed(3)
    out = trainer.policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    torch.manual_seed(3)
    rollout = generate_rollout(trainer.policy, ids, mask, trainer.cfg.generation, trainer.eos_id, trainer.pad_id)
    sampled = out.sequences[:, ids.shape[1]:]
    assert rollout.responses.shape == sampled.shape and len(out.logits) == sampled.shape[1]
    real = rollout.response_mask.bool()
    assert torch.equal(rollout.responses[real], sampled[real])  # the same tokens, cut after EOS
    logits = torch.stack(out.logits, 1).float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    ours = rollout_logprobs(trainer.policy, rollout, 0.7, chunk=4)
    torch.testing.assert_close(ours, expected * rollout.response_mask, atol=1e-4, rtol=1e-4)


def test_sampling_ignores_the_models_generation_defaults(tmp_path):
    """A checkpoint's generation_config.json (repetition_penalty, suppress_tokens, ...) must not change
    what is sampled: PPO's log-probs describe the policy's own distribution, at generation.temperature."""
    from red_ppo.rollout import generate_rollout, left_pad

    trainer = trainer_for(tiny(tmp_path))
    ids, mask = left_pad([p.ids for p in trainer.sampler.next_batch(8)], trainer.pad_id)

    def sample():
        torch.manual_seed(3)
        return generate_rollout(trainer.policy, ids, mask, trainer.cfg.generation, trainer.eos_id, trainer.pad_id)

    plain = sample()
    defaults = trainer.policy.generation_config
    defaults.suppress_tokens = [t for t in range(len(trainer.tokenizer)) if t != 5]  # would sample only token 5
    defaults.repetition_penalty = 3.0
    assert torch.equal(sample().input_ids, plain.input_ids)
    assert trainer.policy.generation_config is defaults and defaults.repetition_penalty == 3.0  # left in place


def test_cli_train_plot_and_errors(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, run={"total_steps": 2})))
    assert main(["train", "--config", str(path), "--set", "reward.mode=sparse"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "RUN_DIR: expected run folders holding metrics.jsonl" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--set", "ppo.gamma=2"]) == 2
    assert "ppo.gamma: expected a number in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["config"]) == 0
    assert "# GAE lambda, in [0, 1]." in capsys.readouterr().out


def test_pretrained_paths_and_a_prompt_file(tmp_path):
    """Local model folders (tokenizer saved with the policy) and prompts from a .jsonl file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from red_ppo.synthetic import build_tokenizer

    tokenizer = build_tokenizer()
    kwargs = dict(TINY_MODEL)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["sea :", "sky calm :", "food :", "city :"]))
    data = tiny(tmp_path, run={"total_steps": 2, "eval_prompts": 2},
                data={"source": "file", "prompt_file": str(prompts), "prompt_key": "text"},
                model={"tokenizer": None, "policy": {"path": str(tmp_path / "policy")},
                       "reference": {"path": str(tmp_path / "policy")}, "reward_model": {"path": str(tmp_path / "rm")}})
    trainer = trainer_for(data)
    assert trainer.sample_metrics is None
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["loss/value"]) and "gt/score" not in rows[-1]


@pytest.mark.parametrize("settings", [
    {"model": {"critic_init": "policy"}, "ppo": {"entropy_coef": 0.01, "value_clip_range": None}},
    {"generation": {"top_k": 5, "top_p": 0.9, "temperature": 1.3}, "optim": {"schedule": "cosine"},
     "reward": {"mode": "red", "baseline": "zero", "beta_c": 0.5, "clip": 0.5, "missing_eos_penalty": 1.0}},
    {"reward": {"mode": "sparse", "kl_estimator": "k3", "whiten": True}, "ppo": {"whiten_advantages": False,
                                                                               "max_grad_norm": None}},
], ids=["critic-from-policy", "red-mixed-zero-baseline", "sparse-k3-whitened"])
def test_trainer_variants_run(tmp_path, settings):
    data = tiny(tmp_path, **settings)
    data["run"].update({"total_steps": 2, "eval_every": 0})
    history = trainer_for(data).train()
    assert all(math.isfinite(row["loss/policy"]) and math.isfinite(row["loss/value"]) for row in history)
