"""The trainer's configuration: one dataclass tree, loaded from YAML, overridable with
``--set key=value``, and validated before any model is loaded.

Every field carries its documentation in ``metadata["help"]``; ``red-ppo config`` prints
the whole tree with it. Errors raise `ConfigError` naming the key, what was expected
and what came.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

BACKENDS = ("auto", "eager", "cpu", "triton", "cuda")
# PyYAML reads YAML 1.1, where a float needs a dot: ``1e-5`` comes back as the string '1e-5'.
EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the expectation and the value."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default (copied when mutable) and its documentation."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    if is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSource:
    path: str | None = doc(None, "Local directory or hub id of pretrained weights (and tokenizer).")
    config: dict | None = doc(None, "Hugging Face config kwargs (with model_type) to build the model from "
                                    "its config alone, randomly initialised; used when path is null.")
    tokenizer: str | None = doc(None, "Tokenizer: a directory, a hub id, or 'synthetic' (the demo language); "
                                      "null means the one saved with path, else the policy's.")


@dataclass
class RunConfig:
    output_dir: str = doc("runs/ppo", "Run folder: metrics.jsonl, tb/, checkpoints/, final/, reward_curves.png.")
    seed: int = doc(0, "Seed of every random number generator (models built from configs, sampling, shuffling).")
    total_steps: int = doc(100, "PPO iterations; each is one rollout batch followed by the PPO epochs on it.")
    save_every: int = doc(50, "Write a checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: int = doc(2, "How many of the newest checkpoints to keep.")
    eval_every: int = doc(0, "Evaluate on the held-out prompts every this many steps, at the start and at the end "
                             "(0: only at the end).")
    eval_prompts: int = doc(64, "Number of held-out prompts for evaluation (0: no evaluation).")
    device: str = doc("cpu", "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")
    num_threads: int = doc(0, "torch.set_num_threads for this run (0: leave torch's default).")
    deterministic: bool = doc(True, "Use deterministic algorithms, so that --resume reproduces a run bit for bit.")
    overwrite: bool = doc(False, "Allow starting a new run in an output_dir that already holds one.")
    progress: bool = doc(True, "Show a live progress bar on the console.")


@dataclass
class ModelConfig:
    tokenizer: str | None = doc(None, "The policy's tokenizer (directory, hub id or 'synthetic'); null: policy.path.")
    policy: ModelSource = doc(ModelSource(), "The policy, an AutoModelForCausalLM.")
    reference: ModelSource | None = doc(None, "The frozen reference policy; null: a frozen copy of the initial policy.")
    reward_model: ModelSource = doc(ModelSource(), "The frozen reward model, an AutoModelForSequenceClassification "
                                                   "with num_labels=1.")
    critic_init: Literal["reward_model_zero_head", "reward_model", "policy"] = doc(
        "reward_model_zero_head",
        "The critic's start: 'reward_model_zero_head', the reward model's backbone with a value head of zeros "
        "(V = 0 everywhere at step 0); 'reward_model', backbone and head of the reward model (V_t = the RM's "
        "score of the prefix before token t, which makes sparse PPO's step-0 TD errors equal RED's token "
        "rewards: the two modes start equivalent); 'policy', the policy's backbone with a head of zeros.")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Dtype of all four models.")
    attn_implementation: str | None = doc("sdpa", "attn_implementation passed to transformers (null: its default).")


@dataclass
class DataConfig:
    source: Literal["file", "synthetic"] = doc("file", "'file': prompts from prompt_file; "
                                                       "'synthetic': the demo language.")
    prompt_file: str | None = doc(None, "A .jsonl file (one object per line, prompt under prompt_key) or a .txt "
                                        "file (one prompt per line).")
    prompt_key: str = doc("prompt", "The key that holds the prompt in each .jsonl line.")
    max_prompt_length: int = doc(128, "Prompts longer than this many tokens keep their last max_prompt_length tokens.")


@dataclass
class GenerationConfig:
    max_new_tokens: int = doc(64, "Most tokens sampled per response.")
    temperature: float = doc(1.0, "Sampling temperature; log-probs for PPO use logits / temperature too.")
    top_k: int = doc(0, "Keep only the k most likely tokens when sampling (0: off).")
    top_p: float = doc(1.0, "Nucleus sampling mass (1.0: off).")


@dataclass
class RolloutConfig:
    batch_size: int = doc(64, "Prompts (one response each) per PPO step.")
    forward_batch_size: int = doc(64, "Rows per no-grad forward pass when scoring a rollout.")


@dataclass
class RewardConfig:
    mode: Literal["sparse", "red"] = doc("red", "'sparse': the sequence score on the last response token; 'red': "
                                                "per-token rewards from the fused op, mixed with sparse by beta_c.")
    baseline: Literal["prompt", "zero"] = doc("prompt", "RED baseline of the first response token: the prompt's "
                                                        "score (paper Eq. 6) or zero (appendix A.2).")
    beta_c: float = doc(1.0, "RED mix: beta_c * red + (1 - beta_c) * sparse, in [0, 1].")
    kl_estimator: Literal["k1", "k3"] = doc("k1", "Per-token KL estimator: k1 = log p - log p_ref; "
                                                  "k3 = (r - 1) - log r with r = p_ref / p.")
    kl_coef: float = doc(0.05, "KL penalty coefficient (the initial one when adaptive_kl).")
    adaptive_kl: bool = doc(False, "Adapt kl_coef toward target_kl (Ziegler et al. 2019).")
    target_kl: float = doc(6.0, "Target sequence KL of the adaptive controller (nats per response).")
    kl_horizon: int = doc(10000, "Horizon of the adaptive controller, in samples.")
    clip: float | None = doc(None, "Clip the reward model's scores to [-clip, clip] before the KL penalty and "
                                   "missing_eos_penalty (null: off). Sparse: the sequence score; RED: every prefix "
                                   "score before redistribution, so the token rewards still sum to the clipped "
                                   "sequence score minus the clipped baseline.")
    whiten: bool = doc(False, "Whiten the final per-token rewards over the batch, keeping their mean (as TRL).")
    missing_eos_penalty: float | None = doc(None, "Subtract this from the reward of responses without EOS, on "
                                                  "their last token, after reward.clip (null: off).")
    backend: str = doc("auto", "redistribute backend: auto | eager | cpu | triton | cuda.")


@dataclass
class PPOConfig:
    epochs: int = doc(4, "PPO epochs over each rollout batch.")
    minibatch_size: int = doc(16, "Rows per optimiser step; must divide rollout.batch_size.")
    grad_accum_steps: int = doc(1, "Micro-batches per minibatch; must divide minibatch_size. Losses are "
                                   "normalised by the minibatch's token count, so this does not change the gradient.")
    gamma: float = doc(1.0, "Discount factor, in [0, 1].")
    lam: float = doc(0.95, "GAE lambda, in [0, 1].")
    clip_range: float = doc(0.2, "Policy ratio clip epsilon (> 0).")
    value_clip_range: float | None = doc(0.2, "Value clip around the rollout values (> 0; null: unclipped).")
    whiten_advantages: bool = doc(True, "Whiten advantages over the response tokens of the batch.")
    entropy_coef: float = doc(0.0, "Entropy bonus coefficient (>= 0).")
    max_grad_norm: float | None = doc(1.0, "Clip each model's gradient norm to this (null: off).")


@dataclass
class OptimConfig:
    policy_lr: float = doc(1e-5, "AdamW learning rate of the policy.")
    critic_lr: float = doc(1e-5, "AdamW learning rate of the critic.")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    warmup_steps: int = doc(0, "Linear warmup, in optimiser steps.")
    schedule: Literal["constant", "linear", "cosine"] = doc("constant", "Learning-rate schedule after warmup.")


@dataclass
class SyntheticConfig:
    seed: int = doc(1234, "Seed of the synthetic language, its pre-training and its reward model.")
    max_words: int = doc(12, "Longest response (in words) of the language's own samples.")
    verbose_after: int = doc(10, "The hidden scorer's length penalty: -0.5 for every word after this many.")
    proper_end: float = doc(2.0, "The hidden scorer's term for ending properly ('. <eos>'), on the <eos>.")
    no_eos: float = doc(-2.0, "The hidden scorer's term for a response without <eos>, on its last token.")
    policy_config: dict = doc({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "max_position_embeddings": 64, "tie_word_embeddings": True},
                              "Config kwargs of the tiny policy (and of the reward model, which starts from it).")
    sft_steps: int = doc(600, "Supervised pre-training steps of the policy.")
    sft_batch_size: int = doc(64, "Sequences per supervised step.")
    sft_lr: float = doc(3e-3, "Peak learning rate of supervised pre-training (cosine decay, 5% warmup).")
    rm_pairs: int = doc(4096, "Preference pairs for the reward model.")
    rm_prefix_pairs: float = doc(0.0, "Fraction of the pairs that compare two prefixes of one response (labelled "
                                      "by the truth of the prefixes, unfinished ones without the missing-EOS term).")
    rm_edit_pairs: float = doc(0.0, "Fraction of the pairs that compare a response with a one-token edit of it "
                                    "(a word replaced, inserted or deleted); the rest are two independent responses.")
    rm_epochs: int = doc(2, "Passes over the preference pairs.")
    rm_batch_size: int = doc(64, "Pairs per reward-model step.")
    rm_lr: float = doc(1e-3, "Peak learning rate of the reward model (cosine decay, 5% warmup).")
    label_temperature: float = doc(1.0, "Preference labels are drawn as P(a > b) = sigmoid((gt_a - gt_b) / T): "
                                        "Bradley-Terry label noise.")
    heldout_responses: int = doc(512, "Held-out responses for the reward model's accuracy and RED's credit fidelity.")


@dataclass
class DemoConfig:
    oracle_seeds: list = doc([0, 1, 2], "PPO seeds of the oracle condition (the hidden scorer's exact prefix "
                                        "scores through PPOTrainer's reward_fn), for each of its arms.")
    learned_seeds: list = doc([0, 1, 2, 3, 4], "PPO seeds of the learned-reward-model condition, for each arm.")
    oracle_arms: list = doc(["sparse", "red"], "Arms of the oracle condition (from: sparse, red, sparse-rm-critic).")
    learned_arms: list = doc(["sparse", "red", "sparse-rm-critic"],
                             "Arms of the learned condition. 'sparse-rm-critic' is sparse with "
                             "model.critic_init=reward_model, step-0 equivalent to RED; the others use "
                             "model.critic_init as configured.")
    oracle_noise: float = doc(0.0, "Std of independent Gaussian noise added to every oracle prefix score.")
    workers: int = doc(2, "PPO runs in parallel, one process of run.num_threads threads each.")
    bootstrap: int = doc(10000, "Bootstrap resamples of the seeds for the paired intervals.")


@dataclass
class StudyConfig:
    seeds: list = doc([0, 1, 2, 3, 4], "Paired sparse/RED seeds at every fidelity level.")
    noise_levels: list = doc([1.0, 3.0], "Std of the Gaussian noise on every oracle prefix score, one level each.")
    rm_pairs: list = doc([1024, 4096], "Learned reward models, one per training-set size (preference pairs).")
    quick_seeds: list = doc([0, 1, 2], "--quick: the seeds.")
    quick_noise_levels: list = doc([3.0], "--quick: the noise levels.")
    quick_rm_pairs: list = doc([4096], "--quick: the reward models.")
    quick_total_steps: int = doc(25, "--quick: PPO steps per run.")


@dataclass
class Config:
    run: RunConfig = doc(RunConfig(), "Run folder, length, checkpoints, device.")
    model: ModelConfig = doc(ModelConfig(), "The four models and the tokenizer.")
    data: DataConfig = doc(DataConfig(), "Prompts.")
    generation: GenerationConfig = doc(GenerationConfig(), "Sampling.")
    rollout: RolloutConfig = doc(RolloutConfig(), "Rollout batch.")
    reward: RewardConfig = doc(RewardConfig(), "Sparse or RED rewards, KL penalty, clipping, whitening.")
    ppo: PPOConfig = doc(PPOConfig(), "GAE and the PPO update.")
    optim: OptimConfig = doc(OptimConfig(), "Optimisers and schedules.")
    synthetic: SyntheticConfig = doc(SyntheticConfig(), "The demo's synthetic language (data.source=synthetic, "
                                                        "tokenizer 'synthetic', red-ppo demo).")
    demo: DemoConfig = doc(DemoConfig(), "red-ppo demo (and red-ppo study: workers, bootstrap).")
    study: StudyConfig = doc(StudyConfig(), "red-ppo study only.")


# ---------------------------------------------------------------- loading

def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {_describe_type(tp)}, got {_show(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {_show(value)}")
        return value
    if is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return list(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {_show(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in this file, not in the user's config


def _describe_type(tp: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(tp)]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for name in data:
        if name not in known:
            raise ConfigError(f"{prefix}{name}: unknown key; expected one of {known}")
    return cls(**{name: _coerce(hints[name], data[name], prefix + name) for name in known if name in data})


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"ppo.epochs=2"`` -> (["ppo", "epochs"], 2); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: expected a dotted key such as ppo.epochs, got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({error})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, check: bool = True) -> Config:
    """Read YAML (or start from ``base`` / the defaults), apply ``--set`` overrides, type-check and
    (with ``check``) validate."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: expected an existing YAML file, got {str(path)!r} (not found)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"--config: {path} is not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config: expected a mapping at the top of {path}, got {_show(loaded)}")
        data = _merge(data, loaded or {})
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data, "")
    if check:
        validate(cfg)
    return cfg


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_config_path(name: str = "demo") -> Path:
    return Path(__file__).with_name("configs") / f"{name}.yaml"


# ---------------------------------------------------------------- validation

def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """Reject impossible values; needs no file and loads nothing."""
    r, g, ro, rw, p, o = cfg.run, cfg.generation, cfg.rollout, cfg.reward, cfg.ppo, cfg.optim
    _require(r.seed >= 0, "run.seed", "an integer >= 0", r.seed)
    _require(r.total_steps >= 1, "run.total_steps", "an integer >= 1", r.total_steps)
    for name in ("save_every", "eval_every", "eval_prompts", "num_threads"):
        _require(getattr(r, name) >= 0, f"run.{name}", "an integer >= 0", getattr(r, name))
    _require(r.keep_checkpoints >= 1, "run.keep_checkpoints", "an integer >= 1", r.keep_checkpoints)
    _require(r.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", r.device) is not None, "run.device",
             "'cpu', 'cuda', 'cuda:N' or 'auto'", r.device)
    _require(g.max_new_tokens >= 1, "generation.max_new_tokens", "an integer >= 1", g.max_new_tokens)
    _require(g.temperature > 0, "generation.temperature", "a number > 0", g.temperature)
    _require(g.top_k >= 0, "generation.top_k", "an integer >= 0 (0: off)", g.top_k)
    _require(0 < g.top_p <= 1, "generation.top_p", "a number in (0, 1]", g.top_p)
    _require(ro.batch_size >= 1, "rollout.batch_size", "an integer >= 1", ro.batch_size)
    _require(ro.forward_batch_size >= 1, "rollout.forward_batch_size", "an integer >= 1", ro.forward_batch_size)
    _require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length", "an integer >= 1", cfg.data.max_prompt_length)
    _require(0 <= rw.beta_c <= 1, "reward.beta_c", "a number in [0, 1]", rw.beta_c)
    _require(rw.kl_coef >= 0, "reward.kl_coef", "a number >= 0", rw.kl_coef)
    _require(rw.target_kl > 0, "reward.target_kl", "a number > 0", rw.target_kl)
    _require(rw.kl_horizon >= 1, "reward.kl_horizon", "an integer >= 1", rw.kl_horizon)
    _require(rw.clip is None or rw.clip > 0, "reward.clip", "a number > 0 or null", rw.clip)
    _require(rw.missing_eos_penalty is None or rw.missing_eos_penalty >= 0, "reward.missing_eos_penalty",
             "a number >= 0 or null", rw.missing_eos_penalty)
    _require(rw.backend in BACKENDS, "reward.backend", f"one of {list(BACKENDS)}", rw.backend)
    _require(p.epochs >= 1, "ppo.epochs", "an integer >= 1", p.epochs)
    _require(p.minibatch_size >= 1, "ppo.minibatch_size", "an integer >= 1", p.minibatch_size)
    _require(ro.batch_size % p.minibatch_size == 0, "ppo.minibatch_size",
             f"a divisor of rollout.batch_size={ro.batch_size}", p.minibatch_size)
    _require(p.grad_accum_steps >= 1 and p.minibatch_size % p.grad_accum_steps == 0, "ppo.grad_accum_steps",
             f"an integer >= 1 dividing ppo.minibatch_size={p.minibatch_size}", p.grad_accum_steps)
    _require(0 <= p.gamma <= 1, "ppo.gamma", "a number in [0, 1]", p.gamma)
    _require(0 <= p.lam <= 1, "ppo.lam", "a number in [0, 1]", p.lam)
    _require(p.clip_range > 0, "ppo.clip_range", "a number > 0", p.clip_range)
    _require(p.value_clip_range is None or p.value_clip_range > 0, "ppo.value_clip_range", "a number > 0 or null",
             p.value_clip_range)
    _require(p.entropy_coef >= 0, "ppo.entropy_coef", "a number >= 0", p.entropy_coef)
    _require(p.max_grad_norm is None or p.max_grad_norm > 0, "ppo.max_grad_norm", "a number > 0 or null",
             p.max_grad_norm)
    _require(o.policy_lr > 0, "optim.policy_lr", "a number > 0", o.policy_lr)
    _require(o.critic_lr > 0, "optim.critic_lr", "a number > 0", o.critic_lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas))
    _require(o.eps > 0, "optim.eps", "a number > 0", o.eps)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    _validate_models(cfg)
    _validate_synthetic(cfg)


def _validate_models(cfg: Config) -> None:
    m = cfg.model
    for name in ("policy", "reference", "reward_model"):
        source = getattr(m, name)
        if source is None:
            continue
        key = f"model.{name}"
        _require((source.path is None) != (source.config is None), f"{key}.path/{key}.config",
                 "exactly one of path (pretrained) or config (build from config alone)",
                 {"path": source.path, "config": source.config})
        if source.config is not None:
            _require(isinstance(source.config.get("model_type"), str), f"{key}.config.model_type",
                     "a transformers model type such as 'llama'", source.config.get("model_type"))
    if m.tokenizer is None and m.policy.path is None:
        raise ConfigError("model.tokenizer: expected a tokenizer (directory, hub id or 'synthetic') because "
                          "model.policy is built from a config, got null")
    if cfg.data.source == "file":
        _require(cfg.data.prompt_file is not None, "data.prompt_file",
                 "a .jsonl or .txt file of prompts when data.source='file'", cfg.data.prompt_file)
    if cfg.data.prompt_file is not None:
        _require(Path(cfg.data.prompt_file).suffix in (".jsonl", ".txt"), "data.prompt_file",
                 "a path ending in .jsonl or .txt", cfg.data.prompt_file)
    if cfg.data.source == "synthetic":
        _require(m.tokenizer == "synthetic", "model.tokenizer",
                 "'synthetic' when data.source='synthetic'", m.tokenizer)


def _validate_synthetic(cfg: Config) -> None:
    s, d = cfg.synthetic, cfg.demo
    for name in ("max_words", "sft_batch_size", "rm_pairs", "rm_epochs", "rm_batch_size", "heldout_responses"):
        _require(getattr(s, name) >= 1, f"synthetic.{name}", "an integer >= 1", getattr(s, name))
    _require(s.sft_steps >= 0, "synthetic.sft_steps", "an integer >= 0", s.sft_steps)
    _require(s.seed >= 0, "synthetic.seed", "an integer >= 0", s.seed)
    for name in ("sft_lr", "rm_lr", "label_temperature"):
        _require(getattr(s, name) > 0, f"synthetic.{name}", "a number > 0", getattr(s, name))
    _require(isinstance(s.policy_config.get("model_type"), str), "synthetic.policy_config.model_type",
             "a transformers model type such as 'llama'", s.policy_config.get("model_type"))
    for name in ("rm_prefix_pairs", "rm_edit_pairs"):
        _require(0 <= getattr(s, name) <= 1, f"synthetic.{name}", "a fraction in [0, 1]", getattr(s, name))
    _require(s.rm_prefix_pairs + s.rm_edit_pairs <= 1, "synthetic.rm_edit_pairs",
             f"a fraction of at most 1 - rm_prefix_pairs = {1 - s.rm_prefix_pairs:g}", s.rm_edit_pairs)
    _require(s.verbose_after >= 0, "synthetic.verbose_after", "an integer >= 0", s.verbose_after)
    for name in ("oracle_seeds", "learned_seeds"):
        seeds = getattr(d, name)
        _require(all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
                 and len(set(seeds)) == len(seeds), f"demo.{name}", "a list of distinct integers >= 0", seeds)
    arms = ("sparse", "red", "sparse-rm-critic")
    for name in ("oracle_arms", "learned_arms"):
        value = getattr(d, name)
        _require(all(x in arms for x in value) and len(set(value)) == len(value), f"demo.{name}",
                 f"a list of distinct arms from {list(arms)}", value)
    runs = len(d.oracle_seeds) * len(d.oracle_arms) + len(d.learned_seeds) * len(d.learned_arms)
    _require(runs >= 1, "demo.learned_seeds", "at least one run in the oracle or the learned condition "
             "(seeds and arms both non-empty)", d.learned_seeds)
    _require(d.oracle_noise >= 0, "demo.oracle_noise", "a number >= 0", d.oracle_noise)
    _require(d.workers >= 1, "demo.workers", "an integer >= 1", d.workers)
    st = cfg.study
    for name in ("seeds", "quick_seeds"):
        seeds = getattr(st, name)
        _require(len(seeds) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
                 and len(set(seeds)) == len(seeds), f"study.{name}", "a non-empty list of distinct integers >= 0",
                 seeds)
    for name in ("noise_levels", "quick_noise_levels"):
        levels = getattr(st, name)
        _require(all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in levels),
                 f"study.{name}", "a list of numbers > 0", levels)
    for name in ("rm_pairs", "quick_rm_pairs"):
        sizes = getattr(st, name)
        _require(all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in sizes)
                 and len(set(sizes)) == len(sizes), f"study.{name}", "a list of distinct integers >= 2", sizes)
    _require(st.quick_total_steps >= 1, "study.quick_total_steps", "an integer >= 1", st.quick_total_steps)
    _require(d.bootstrap >= 100, "demo.bootstrap", "an integer >= 100", d.bootstrap)


def describe(cfg: Any = None, indent: int = 0) -> str:
    """The tree as commented YAML: every field with its value and its documentation."""
    cfg = cfg if cfg is not None else Config()
    lines = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        pad = "  " * indent
        lines.append(f"{pad}# {f.metadata.get('help', '')}")
        if is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(describe(value, indent + 1))
        else:
            dumped = yaml.safe_dump({f.name: to_dict_value(value)}, default_flow_style=True, width=1000).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return "\n".join(lines)


def to_dict_value(value: Any) -> Any:
    if is_dataclass(value):
        return to_dict(value)
    return list(value) if isinstance(value, tuple) else value
