"""LoRA (``model.lora``): the reference is the policy with its adapters switched off and equals the base
model bit for bit before and after training; only adapters (and the critic's value head) train; the saved
adapters and merged weights reload with peft and transformers; resume stays exact; and the configuration
errors (bad values, a reference beside LoRA, peft missing) come before any model loads."""

import importlib.util
import sys

import pytest
import torch

import red_ppo.trainer
from conftest import tiny_config
from red_ppo import checkpoint as ckpt
from red_ppo.config import ConfigError, load_config
from red_ppo.metrics import read_metrics
from red_ppo.models import build_model
from red_ppo.rollout import generate_rollout, left_pad, rollout_logprobs
from red_ppo.trainer import PPOTrainer, seed_everything

pytest.importorskip("transformers")
# The configuration errors, the missing-peft one included, are checked without peft.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")

SHORT = {
    "run": {"total_steps": 2, "save_every": 0, "eval_every": 0, "eval_prompts": 8, "num_threads": 1,
            "progress": False},
    "generation": {"max_new_tokens": 6},
    "rollout": {"forward_batch_size": 8},
    "ppo": {"epochs": 2},
    "optim": {"policy_lr": 1e-2, "critic_lr": 1e-2},
}


def lora_run(tmp_path, name="run", critic=False, targets="all-linear", **sections) -> dict:
    lora = {"model": {"lora": {"r": 4, "alpha": 8.0, "target_modules": targets, "critic": critic}}}
    return tiny_config(SHORT, lora, {"run": {"output_dir": str(tmp_path / name)}}, sections)


def base_policy(trainer):
    """The policy as the trainer built it before adding adapters: the same seed, the same config."""
    seed_everything(trainer.cfg.run.seed)
    return build_model(trainer.cfg.model.policy, trainer.tokenizer, "causal_lm", trainer.cfg).eval()


def eval_rollout(trainer):
    ids, mask = left_pad([p.ids for p in trainer.eval_prompts], trainer.pad_id)
    return generate_rollout(trainer.policy, ids, mask, trainer.cfg.generation, trainer.eos_id, trainer.pad_id)


@needs_peft
def test_the_reference_is_the_base_model_before_and_after_training(tmp_path):
    # lm_head adapted too ('all-linear' leaves the output layer out), for the output layer's check below
    trainer = PPOTrainer(load_config(base=lora_run(tmp_path, targets=["q_proj", "v_proj", "down_proj", "lm_head"])))
    assert list(trainer.reference.parameters()) == []  # a view of the policy, no second copy
    base = base_policy(trainer)
    rollout = eval_rollout(trainer)
    temperature = trainer.cfg.generation.temperature
    expected = rollout_logprobs(base, rollout, temperature, 8)
    assert torch.equal(rollout_logprobs(trainer.reference, rollout, temperature, 8), expected)
    assert torch.equal(rollout_logprobs(trainer.policy, rollout, temperature, 8), expected)  # B = 0 at the start

    history = trainer.train()
    assert history[0]["kl/sequence"] == 0.0  # step 1 scored the reference on the starting policy's rollout
    assert not torch.equal(rollout_logprobs(trainer.policy, rollout, temperature, 8), expected)
    assert torch.equal(rollout_logprobs(trainer.reference, rollout, temperature, 8), expected)
    assert history[-1]["kl/sequence"] != 0.0
    # The entry points of log-probs computed through lm_head in chunks: decoder and output layer.
    inputs = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask}
    with torch.no_grad():
        hidden = base.get_decoder()(**inputs)[0]
        assert torch.equal(trainer.reference.get_decoder()(**inputs)[0], hidden)
        assert not torch.equal(trainer.policy.get_decoder()(**inputs)[0], hidden)
        head = base.get_output_embeddings()(hidden)
        assert torch.equal(trainer.reference.get_output_embeddings()(hidden), head)
        assert not torch.equal(trainer.policy.get_output_embeddings()(hidden), head)


@needs_peft
@pytest.mark.parametrize("critic", [False, True], ids=["policy-only", "policy-and-critic"])
def test_only_adapters_and_the_value_head_train(tmp_path, critic):
    trainer = PPOTrainer(load_config(base=lora_run(tmp_path, critic=critic)))
    before = {name: {k: t.clone() for k, t in model.state_dict().items()}
              for name, model in (("policy", trainer.policy), ("critic", trainer.critic))}
    trainer.train_step()
    for name, model in (("policy", trainer.policy), ("critic", trainer.critic)):
        adapted = name == "policy" or critic
        trained = {k for k, q in model.named_parameters() if q.requires_grad}
        in_optimizer = {id(q) for group in trainer.optimizers[name].param_groups for q in group["params"]}
        assert in_optimizer == {id(q) for q in model.parameters() if q.requires_grad}
        for key, tensor in model.state_dict().items():
            is_adapter = "lora_" in key
            if adapted:
                expected_trained = is_adapter or key.startswith("head.")
                assert (key in trained) == expected_trained, key
                assert torch.equal(tensor, before[name][key]) != expected_trained, key
            else:
                assert not is_adapter and key in trained, key
        if adapted:
            assert any("lora_" in k for k in trained)


@needs_peft
def test_saved_adapters_and_merged_weights_reload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = PPOTrainer(load_config(base=lora_run(tmp_path)))
    base = base_policy(trainer)
    rollout = eval_rollout(trainer)
    trainer.train()
    final = tmp_path / "run" / "final"
    assert (final / "policy_adapter" / "adapter_config.json").is_file()
    assert (final / "policy_adapter" / "adapter_model.safetensors").is_file()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits

    trained = logits(trainer.policy)
    assert not torch.equal(trained, logits(base))
    reloaded = PeftModel.from_pretrained(base, final / "policy_adapter").eval()
    assert torch.equal(logits(reloaded), trained)

    merged = AutoModelForCausalLM.from_pretrained(final / "policy").eval()
    assert not any("lora_" in k for k in merged.state_dict())
    # W + B A scale in one matrix rounds differently from the two products summed: float32's error, no more.
    torch.testing.assert_close(logits(merged), trained)
    # generate() rewrites the base model's generation_config; the merged model keeps the policy's.
    assert merged.generation_config.eos_token_id == trainer.eos_id


@needs_peft
def test_resume_is_exact_with_lora(tmp_path):
    settings = {"run": {"total_steps": 4, "eval_prompts": 0}, "reward": {"mode": "red", "kl_estimator": "k3"}}
    whole = lora_run(tmp_path, "whole", critic=True, **settings)
    PPOTrainer(load_config(base=whole)).train()

    parts = lora_run(tmp_path, "parts", critic=True, **settings)
    PPOTrainer(load_config(base=parts)).train(stop_after=2)
    resumed = PPOTrainer(load_config(base=parts))
    resumed.train(resume=True)

    timing = ("time/", "throughput/")
    a, b = ([{k: v for k, v in row.items() if not k.startswith(timing)} for row in read_metrics(tmp_path / run /
                                                                                                "metrics.jsonl")]
            for run in ("whole", "parts"))
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b
    final = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000004.pt")
    for name, model in (("policy", resumed.policy), ("critic", resumed.critic)):
        state = model.state_dict()
        assert any("lora_" in k for k in state)
        for key, tensor in state.items():
            assert torch.equal(tensor, final[name][key]), key


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")
    monkeypatch.setattr(red_ppo.trainer, "build_model", refuse)


def test_lora_without_peft_is_a_config_error(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError, match=r"model\.lora: expected peft to be installed for LoRA "
                                          r"\(pip install 'red-kernels\[lora\]'\), got"):
        PPOTrainer(load_config(base=lora_run(tmp_path)))


def test_a_reference_beside_lora_is_a_config_error(tmp_path):
    data = lora_run(tmp_path, model={"reference": {"config": {"model_type": "llama"}}})
    with pytest.raises(ConfigError, match=r"model\.reference: expected null with model\.lora \(the reference is the "
                                          r"policy with its adapters switched off\), got \{'path': None"):
        load_config(base=data)


@pytest.mark.parametrize("override, message", [
    ("model.lora.r=0", "model.lora.r: expected an integer >= 1, got 0"),
    ("model.lora.alpha=0", "model.lora.alpha: expected a number > 0, got 0.0"),
    ("model.lora.dropout=1", "model.lora.dropout: expected a number in [0, 1), got 1.0"),
    ("model.lora.dropout=-0.1", "model.lora.dropout: expected a number in [0, 1), got -0.1"),
    ("model.lora.target_modules=[]", "model.lora.target_modules: expected a non-empty list of module names or "
                                     "'all-linear', got []"),
    ("model.lora.target_modules=q_proj", "model.lora.target_modules: expected a non-empty list of module names or "
                                         "'all-linear', got 'q_proj'"),
    ("model.lora.target_modules=['q_proj', '']", "model.lora.target_modules: expected a non-empty list of module "
                                                 "names or 'all-linear', got ['q_proj', '']"),
    ("model.lora.target_modules=3", "model.lora.target_modules: expected a list (each a string) or a string, "
                                    "got int 3"),
    ("model.lora.target_modules=[q_proj, 3]", "model.lora.target_modules: expected a list (each a string) or a "
                                              "string, got list ['q_proj', 3]"),
    ("model.lora.critic=1", "model.lora.critic: expected true or false, got int 1"),
], ids=["r", "alpha", "dropout-1", "dropout-negative", "no-targets", "one-name", "empty-name", "targets-int",
        "targets-mixed", "critic-int"])
def test_impossible_lora_values(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base=tiny_config(), overrides=[override])
    assert str(error.value) == message


def test_lora_keys_load():
    cfg = load_config(base=tiny_config(), overrides=["model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (4, 16.0, ["q_proj", "v_proj"])
    assert load_config(base=tiny_config()).model.lora is None
    assert load_config(base=tiny_config(), overrides=["model.lora={}"]).model.lora.target_modules == "all-linear"


@needs_peft
def test_the_reference_runs_under_the_policys_autocast_with_bf16_checkpointing_and_chunks(tmp_path):
    # The LoRA reference is the policy's own float32 weights with the adapters off: under bf16 autocast it must
    # be run in bf16 as the policy is, or the first step's KL (policy == reference, B = 0) is bf16 rounding.
    data = lora_run(tmp_path, model={"dtype": "bfloat16", "gradient_checkpointing": True},
                    rollout={"logprob_chunk": 5})
    history = PPOTrainer(load_config(base=data)).train()
    assert history[0]["kl/sequence"] == 0.0
    assert history[-1]["kl/sequence"] != 0.0
