"""Every configuration error: unknown keys, wrong types, impossible values, missing files and a
critic that cannot start from a reward model with its own tokenizer, each rejected before any model is
loaded with a message that names the key, what was expected and what came."""

import json

import pytest
import yaml

import red_ppo.models
from conftest import TINY_MODEL, tiny_config
from red_ppo.config import Config, ConfigError, default_config_path, describe, load_config, parse_override



def test_a_valid_config_loads_and_every_field_is_documented():
    cfg = load_config(base=tiny_config())
    assert isinstance(cfg, Config) and cfg.reward.mode == "red" and cfg.ppo.lam == 0.95
    text = describe(cfg)
    assert text.count("# ") >= 80 and "# \n" not in text  # every field carries its help
    demo = load_config(default_config_path())
    assert demo.demo.oracle_seeds == [0, 1, 2] and demo.demo.learned_seeds == [0, 1, 2, 3, 4]
    assert demo.demo.learned_arms == ["sparse", "red", "sparse-rm-critic"]


def test_overrides_are_yaml_typed():
    cfg = load_config(base=tiny_config(), overrides=["ppo.epochs=2", "reward.clip=null", "optim.betas=[0.8, 0.9]",
                                              "reward.mode=sparse", "run.deterministic=false"])
    assert cfg.ppo.epochs == 2 and cfg.reward.clip is None and cfg.optim.betas == (0.8, 0.9)
    assert cfg.reward.mode == "sparse" and cfg.run.deterministic is False
    assert parse_override("model.policy.path=a=b") == (["model", "policy", "path"], "a=b")
    # PyYAML (YAML 1.1) reads 1e-5 as a string; a float field takes it as the number it means.
    cfg = load_config(base=tiny_config(), overrides=["optim.policy_lr=1e-5", "reward.clip=2E+1", "run.device=cuda:1"])
    assert cfg.optim.policy_lr == 1e-5 and cfg.reward.clip == 20.0 and cfg.run.device == "cuda:1"


IMPOSSIBLE = [
    ("run.total_steps=0", "run.total_steps: expected an integer >= 1, got 0"),
    ("run.seed=-1", "run.seed: expected an integer >= 0, got -1"),
    ("run.save_every=-2", "run.save_every: expected an integer >= 0, got -2"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints: expected an integer >= 1, got 0"),
    ("run.device=tpu", "run.device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got 'tpu'"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens: expected an integer >= 1, got 0"),
    ("generation.temperature=0", "generation.temperature: expected a number > 0, got 0.0"),
    ("generation.top_k=-1", "generation.top_k: expected an integer >= 0 (0: off), got -1"),
    ("generation.top_p=1.5", "generation.top_p: expected a number in (0, 1], got 1.5"),
    ("rollout.batch_size=0", "rollout.batch_size: expected an integer >= 1, got 0"),
    ("rollout.forward_batch_size=0", "rollout.forward_batch_size: expected an integer >= 1, got 0"),
    ("data.max_prompt_length=0", "data.max_prompt_length: expected an integer >= 1, got 0"),
    ("reward.beta_c=1.5", "reward.beta_c: expected a number in [0, 1], got 1.5"),
    ("reward.kl_coef=-0.1", "reward.kl_coef: expected a number >= 0, got -0.1"),
    ("reward.target_kl=0", "reward.target_kl: expected a number > 0, got 0.0"),
    ("reward.kl_horizon=0", "reward.kl_horizon: expected an integer >= 1, got 0"),
    ("reward.clip=0", "reward.clip: expected a number > 0 or null, got 0.0"),
    ("reward.backend=gpu", "reward.backend: expected one of ['auto', 'eager', 'cpu', 'triton', 'cuda'], got 'gpu'"),
    ("ppo.epochs=0", "ppo.epochs: expected an integer >= 1, got 0"),
    ("ppo.minibatch_size=0", "ppo.minibatch_size: expected an integer >= 1, got 0"),
    ("ppo.minibatch_size=3", "ppo.minibatch_size: expected a divisor of rollout.batch_size=8, got 3"),
    ("ppo.grad_accum_steps=3", "ppo.grad_accum_steps: expected an integer >= 1 dividing ppo.minibatch_size=4, got 3"),
    ("ppo.gamma=1.1", "ppo.gamma: expected a number in [0, 1], got 1.1"),
    ("ppo.lam=-0.5", "ppo.lam: expected a number in [0, 1], got -0.5"),
    ("ppo.clip_range=0", "ppo.clip_range: expected a number > 0, got 0.0"),
    ("ppo.value_clip_range=-1", "ppo.value_clip_range: expected a number > 0 or null, got -1.0"),
    ("ppo.entropy_coef=-1", "ppo.entropy_coef: expected a number >= 0, got -1.0"),
    ("ppo.max_grad_norm=0", "ppo.max_grad_norm: expected a number > 0 or null, got 0.0"),
    ("optim.policy_lr=0", "optim.policy_lr: expected a number > 0, got 0.0"),
    ("optim.critic_lr=-1", "optim.critic_lr: expected a number > 0, got -1.0"),
    ("optim.weight_decay=-1", "optim.weight_decay: expected a number >= 0, got -1.0"),
    ("optim.betas=[1.0, 0.9]", "optim.betas: expected two numbers in [0, 1), got [1.0, 0.9]"),
    ("optim.eps=0", "optim.eps: expected a number > 0, got 0.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: expected an integer >= 0, got -1"),
    ("synthetic.sft_steps=-1", "synthetic.sft_steps: expected an integer >= 0, got -1"),
    ("synthetic.rm_pairs=0", "synthetic.rm_pairs: expected an integer >= 1, got 0"),
    ("synthetic.rm_lr=0", "synthetic.rm_lr: expected a number > 0, got 0.0"),
    ("synthetic.policy_config={}", "synthetic.policy_config.model_type: expected a transformers model type"),
    ("demo.oracle_seeds=[1, 1]", "demo.oracle_seeds: expected a list of distinct integers >= 0, got [1, 1]"),
    ("demo.learned_arms=[sparse, dense]", "demo.learned_arms: expected a list of distinct arms from ['sparse', "
                                          "'red', 'sparse-rm-critic', 'sparse-lam1', 'sparse-noclip'], got "
                                          "['sparse', 'dense']"),
    ("demo.oracle_arms=[red, red]", "demo.oracle_arms: expected a list of distinct arms"),
    ("demo.oracle_noise=-1", "demo.oracle_noise: expected a number >= 0, got -1.0"),
    ("demo.workers=0", "demo.workers: expected an integer >= 1, got 0"),
    ("synthetic.rm_prefix_pairs=1.5", "synthetic.rm_prefix_pairs: expected a fraction in [0, 1], got 1.5"),
    ("synthetic.rm_edit_pairs=-0.1", "synthetic.rm_edit_pairs: expected a fraction in [0, 1], got -0.1"),
    ("model.policy.path=somewhere", "model.policy.path/model.policy.config: expected exactly one of path"),
    ("model.reward_model.config=null", "model.reward_model.path/model.reward_model.config: expected exactly one"),
    ("model.policy.config={hidden_size: 8}", "model.policy.config.model_type: expected a transformers model type "
                                             "such as 'llama', got None"),
    ("data.source=file", "data.prompt_file: expected a .jsonl or .txt file of prompts when data.source='file', "
                         "got None"),
    ("data.prompt_file=prompts.csv", "data.prompt_file: expected a path ending in .jsonl or .txt, got 'prompts.csv'"),
    ("model.tokenizer=gpt2", "model.tokenizer: expected 'synthetic' when data.source='synthetic', got 'gpt2'"),
    # Accepted before, then crashed in torch.device / poisoned every reward with NaN:
    ("run.device=cuda:abc", "run.device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got 'cuda:abc'"),
    ("reward.missing_eos_penalty=-1", "reward.missing_eos_penalty: expected a number >= 0 or null, got -1.0"),
    ("reward.missing_eos_penalty=.nan", "reward.missing_eos_penalty: expected a number >= 0 or null, got nan"),
]


@pytest.mark.parametrize("override,message", IMPOSSIBLE, ids=[o.split("=")[0] + "-" + str(i)
                                                             for i, (o, _) in enumerate(IMPOSSIBLE)])
def test_impossible_values(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base=tiny_config(), overrides=[override])
    assert message in str(error.value)


def test_policy_from_config_needs_a_tokenizer():
    data = tiny_config()
    data["model"]["tokenizer"] = None
    data["data"] = {"source": "file", "prompt_file": "p.txt"}
    with pytest.raises(ConfigError, match=r"model.tokenizer: expected a tokenizer .* got null"):
        load_config(base=data)


WRONG_TYPES = [
    ("ppo.epochs=two", "ppo.epochs: expected an integer, got str 'two'"),
    ("ppo.epochs=2.5", "ppo.epochs: expected an integer, got float 2.5"),
    ("run.total_steps=true", "run.total_steps: expected an integer, got bool True"),
    ("ppo.gamma=high", "ppo.gamma: expected a number, got str 'high'"),
    ("run.progress=1", "run.progress: expected true or false, got int 1"),
    ("reward.mode=dense", "reward.mode: expected one of ['sparse', 'red'], got str 'dense'"),
    ("reward.baseline=mean", "reward.baseline: expected one of ['prompt', 'zero'], got str 'mean'"),
    ("reward.kl_estimator=k2", "reward.kl_estimator: expected one of ['k1', 'k3'], got str 'k2'"),
    ("optim.schedule=step", "optim.schedule: expected one of ['constant', 'linear', 'cosine'], got str 'step'"),
    ("model.critic_init=scratch", "model.critic_init: expected one of ['reward_model_zero_head', 'reward_model', 'policy'], got str 'scratch'"),
    ("optim.betas=0.9", "optim.betas: expected a list of 2 numbers, got float 0.9"),
    ("reward.clip=big", "reward.clip: expected a number, got str 'big'"),
    ("model.policy=7", "model.policy: expected a mapping, got int 7"),
    ("demo.learned_seeds=3", "demo.learned_seeds: expected a list, got int 3"),
    ("run=3", "run: expected a mapping, got int 3"),
]


@pytest.mark.parametrize("override,message", WRONG_TYPES, ids=[o.split("=")[0] for o, _ in WRONG_TYPES])
def test_wrong_types(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base=tiny_config(), overrides=[override])
    assert message in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("ppo.epoch=2", "ppo.epoch: unknown key; expected one of ['epochs', 'minibatch_size'"),
    ("trainer.lr=1", "trainer: unknown key; expected one of ['run', 'model'"),
    ("model.policy.weights=x", "model.policy.weights: unknown key; expected one of ['path', 'config', 'tokenizer', 'dtype']"),
])
def test_unknown_keys(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base=tiny_config(), overrides=[override])
    assert message in str(error.value)


def test_bad_overrides_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="--set: expected key=value, got 'ppo.epochs'"):
        load_config(base=tiny_config(), overrides=["ppo.epochs"])
    with pytest.raises(ConfigError, match="--set: expected a dotted key such as ppo.epochs, got 'ppo.'"):
        load_config(base=tiny_config(), overrides=["ppo.=3"])
    with pytest.raises(ConfigError, match="--set ppo.minibatch_size.x: ppo.minibatch_size is not a section"):
        load_config(base=tiny_config(), overrides=["ppo.minibatch_size.x=3"])
    with pytest.raises(ConfigError, match=r"ppo.epochs: expected an integer, got dict \{'x': 3\}"):
        load_config(base=tiny_config(), overrides=["ppo.epochs.x=3"])
    with pytest.raises(ConfigError, match=r"--set ppo.epochs: the value '\[1' is not valid YAML"):
        load_config(base=tiny_config(), overrides=["ppo.epochs=[1"])
    with pytest.raises(ConfigError,
                       match=r"--config: expected an existing YAML file, got '.*missing.yaml' \(not found\)"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="--config: .*bad.yaml is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="--config: expected a mapping at the top of .*list.yaml, got list"):
        load_config(listed)


# ---------------------------------------------------------------- files and tokenizers


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail loudly if a check happens only after a model is built."""
    import red_ppo.trainer  # imported first, so that it binds the real function, restored afterwards

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")
    monkeypatch.setattr(red_ppo.models, "build_model", refuse)
    monkeypatch.setattr(red_ppo.trainer, "build_model", refuse)


def trainer(data):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=data))


def saved_model_dir(path, tokenizer, vocab_size=None, **extra):
    from transformers import AutoConfig
    kwargs = dict(TINY_MODEL, **extra)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=vocab_size or len(tokenizer), **kwargs)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_missing_files(tmp_path, no_model_loading):
    with pytest.raises(ConfigError,
                       match=r"data.prompt_file: expected an existing file, got '.*none.txt' \(not found\)"):
        trainer(tiny_config(data={"source": "file", "prompt_file": str(tmp_path / "none.txt")}))
    with pytest.raises(ConfigError, match=r"model.policy.path: expected an existing local directory or a hub id, "
                                          r"got '\./no/such/policy' \(not found\)"):
        trainer(tiny_config(model={"policy": {"path": "./no/such/policy"}}))
    with pytest.raises(ConfigError, match=r"model.reward_model.path: expected an existing local directory or a hub "
                                          r"id, got '/no/such/rm' \(not found\)"):
        trainer(tiny_config(model={"reward_model": {"path": "/no/such/rm"}}))
    with pytest.raises(ConfigError, match=r"model.reward_model.tokenizer: expected an existing local directory or a "
                                          r"hub id, got '\./missing-tokenizer'"):
        trainer(tiny_config(model={"reward_model": {"config": TINY_MODEL, "tokenizer": "./missing-tokenizer"}}))


def test_bad_prompt_files(tmp_path, no_model_loading):
    def with_file(name, text):
        path = tmp_path / name
        path.write_text(text)
        return tiny_config(data={"source": "file", "prompt_file": str(path)})
    # The tokenizer and models check out; the prompts are read before any model is built.
    with pytest.raises(ConfigError, match="data.prompt_file: line 2 of .*p.jsonl is not JSON"):
        trainer(with_file("p.jsonl", '{"prompt": "sea :"}\nnot json\n'))
    with pytest.raises(ConfigError, match="data.prompt_key: expected every line of .*q.jsonl to hold a string under "
                                          "'prompt', got line 1"):
        trainer(with_file("q.jsonl", '{"text": "sea :"}\n'))
    with pytest.raises(ConfigError, match="data.prompt_file: expected at least one prompt, got an empty file"):
        trainer(with_file("empty.txt", "\n\n"))


def test_reward_model_with_its_own_tokenizer_needs_the_critic_from_the_policy(tmp_path, no_model_loading):
    from red_ppo.synthetic import build_tokenizer

    other = build_tokenizer()
    other.add_tokens(["zebra"])
    rm_dir = saved_model_dir(tmp_path / "rm", other)
    for init in ("reward_model_zero_head", "reward_model"):
        with pytest.raises(ConfigError) as error:
            trainer(tiny_config(model={"reward_model": {"path": rm_dir}, "critic_init": init}))
        message = str(error.value)
        assert message.startswith("model.critic_init: expected 'policy' because the reward model has its own "
                                  f"tokenizer (from {rm_dir!r}, not the policy's from 'synthetic': 69 tokens "
                                  f"instead of 68), got {init!r}")
        assert "set model.critic_init=policy" in message
    # with the critic from the policy every check passes: the first model is built
    with pytest.raises(AssertionError, match="a model was loaded before"):
        trainer(tiny_config(model={"reward_model": {"path": rm_dir}, "critic_init": "policy"}))
    # the reward model's vocabulary is checked against its own tokenizer (69 tokens), not the policy's (68)
    small = saved_model_dir(tmp_path / "rm-small", other, vocab_size=68)
    with pytest.raises(ConfigError, match=r"model.reward_model: expected a vocab_size of at least 69 \(the "
                                          r"tokenizer's\), got 68"):
        trainer(tiny_config(model={"reward_model": {"path": small}, "critic_init": "policy"}))

    # the same tokens under other ids make another tokenizer too
    swapped = build_tokenizer()
    vocab = swapped.get_vocab()
    spec = json.loads(swapped.backend_tokenizer.to_str())
    spec["model"]["vocab"]["wave"], spec["model"]["vocab"]["boat"] = vocab["boat"], vocab["wave"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>",
                                      eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    rm_dir = saved_model_dir(tmp_path / "rm2", swapped)
    with pytest.raises(ConfigError, match=r"token 'boat' has id \d+ instead of \d+"):
        trainer(tiny_config(model={"reward_model": {"path": rm_dir}}))


def test_model_vocab_smaller_than_the_tokenizer(tmp_path, no_model_loading):
    small = dict(TINY_MODEL, vocab_size=10)
    with pytest.raises(ConfigError, match="model.reward_model: expected a vocab_size of at least 68 "
                                          r"\(the tokenizer's\), got 10"):
        trainer(tiny_config(model={"reward_model": {"config": small}}))


def test_reward_model_with_two_labels(tmp_path, no_model_loading):
    from red_ppo.synthetic import build_tokenizer
    rm_dir = saved_model_dir(tmp_path / "rm", build_tokenizer(), architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ConfigError, match="model.reward_model: expected a sequence-classification reward model "
                                          "with num_labels=1 .*, got num_labels=2"):
        trainer(tiny_config(model={"reward_model": {"path": rm_dir}}))
    with pytest.raises(ConfigError, match="got num_labels=3"):
        trainer(tiny_config(model={"reward_model": {"config": dict(TINY_MODEL, num_labels=3)}}))


def test_device_without_gpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="run.device: expected a usable device, got 'cuda' but no CUDA GPU"):
        trainer(tiny_config(run={"device": "cuda"}))


def test_demo_config_round_trips(tmp_path):
    cfg = load_config(default_config_path())
    path = tmp_path / "again.yaml"
    from red_ppo.config import to_dict
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_pair_fractions_must_not_exceed_one():
    with pytest.raises(ConfigError, match=r"synthetic.rm_edit_pairs: expected a fraction of at most 1 - "
                                          r"rm_prefix_pairs = 0.4, got 0.8"):
        load_config(base=tiny_config(), overrides=["synthetic.rm_prefix_pairs=0.6", "synthetic.rm_edit_pairs=0.8"])
