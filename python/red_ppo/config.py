"""The trainer's configuration: one dataclass tree, loaded from YAML, overridable with
``--set key=value``, and validated before any model is loaded.

`TrainerConfig` holds the trainer's sections; `Config`, what a YAML file holds, adds the sections of
`red-ppo demo` and `red-ppo study` (`SyntheticConfig`, `DemoConfig`, `StudyConfig`, defined beside them).
Every field carries its documentation in ``metadata["help"]``; ``red-ppo config`` prints the whole tree
with it. Errors raise `ConfigError` naming the key, what was expected and what came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from red_kernels.reward_mix import check_reward_mix
from red_ppo.demo_config import DemoConfig
from red_ppo.study_config import StudyConfig
from red_ppo.synthetic import SyntheticConfig
from red_ppo.typed_yaml import ConfigError, describe, doc, load, parse_override, require, to_dict

__all__ = ["Config", "ConfigError", "TrainerConfig", "default_config_path", "describe", "load_config",
           "parse_override", "to_dict", "validate", "validate_trainer"]

BACKENDS = ("auto", "eager", "cpu", "triton", "cuda")
REPORT_TO = ("tensorboard", "wandb")


@dataclass
class ModelSource:
    path: str | None = doc(None, "Local directory or hub id of pretrained weights (and tokenizer).")
    config: dict | None = doc(None, "Hugging Face config kwargs (with model_type) to build the model from "
                                    "its config alone, randomly initialised; used when path is null.")
    tokenizer: str | None = doc(None, "Tokenizer: a directory, a hub id, or 'synthetic' (the demo language); "
                                      "null means the one saved with path, else the policy's.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = doc(
        None, "This model's dtype (null: model.dtype). Policy: its forward under autocast in this dtype over float32 "
              "weights (float16 is refused: it needs loss scaling); reference and reward model: their weights' dtype.")


@dataclass
class RunConfig:
    output_dir: str = doc("runs/ppo", "Run folder: metrics.jsonl, tb/, checkpoints/, samples/, final/, "
                                      "reward_curves.png.")
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
    report_to: list = doc(["tensorboard"], "Where the metrics go besides metrics.jsonl: a list of 'tensorboard' "
                                           "(tb/) and 'wandb' (Weights & Biases, when installed); [none]: neither.")
    wandb_project: str | None = doc(None, "The W&B project of report_to: [wandb] (null: 'red-ppo').")
    sample_pages: int = doc(4, "At each evaluation, show this many samples' response tokens shaded by their RED "
                               "reward in samples/step-NNNNNN.html (0: no page).")


@dataclass
class LoraConfig:
    r: int = doc(8, "Rank of each adapter (>= 1).")
    alpha: float = doc(16.0, "Adapter scale numerator: an adapter's output is multiplied by alpha / r (> 0).")
    dropout: float = doc(0.0, "Dropout on the adapters' input, in [0, 1). peft applies it in training mode only, "
                              "and red_ppo runs its models in eval mode (no dropout: the PPO ratio starts at 1), "
                              "so it has no effect here (it is written to adapter_config.json).")
    target_modules: list[str] | str = doc("all-linear", "The modules given adapters: a list of names (module name "
                                                        "suffixes such as q_proj, v_proj) or 'all-linear' (every "
                                                        "linear layer but the output layer).")
    critic: bool = doc(False, "Adapters on the critic's backbone too (its value head stays fully trained); false: "
                              "the critic is trained in full.")


@dataclass
class ModelConfig:
    tokenizer: str | None = doc(None, "The policy's tokenizer (directory, hub id or 'synthetic'); null: policy.path.")
    policy: ModelSource = doc(ModelSource(), "The policy, an AutoModelForCausalLM.")
    reference: ModelSource | None = doc(None, "The frozen reference policy; null: a frozen copy of the initial policy.")
    reward_model: ModelSource = doc(ModelSource(), "The frozen reward model, an AutoModelForSequenceClassification "
                                                   "with num_labels=1. Its tokenizer may differ from the policy's: "
                                                   "each response is then rendered as text in its chat template and "
                                                   "its prefix scores are aligned to the policy's tokens.")
    critic_init: Literal["reward_model_zero_head", "reward_model", "policy"] = doc(
        "reward_model_zero_head",
        "The critic's start: 'reward_model_zero_head', the reward model's backbone with a value head of zeros "
        "(V = 0 everywhere at step 0); 'reward_model', backbone and head of the reward model (V_t = the RM's "
        "score of the prefix before token t, which makes sparse PPO's step-0 TD errors equal RED's token "
        "rewards: the two modes start equivalent); 'policy', the policy's backbone with a head of zeros (the only "
        "start when the reward model has its own tokenizer: the critic reads the policy's tokens).")
    dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "float32", "Default dtype of the four models. For the trained ones (policy, critic) bfloat16 means mixed "
                   "precision: float32 weights and AdamW states, the forward under torch.autocast in bfloat16.")
    critic_dtype: Literal["float32", "bfloat16", "float16"] | None = doc(
        None, "The critic's autocast dtype over its float32 weights (null: the policy's; float16 is refused).")
    gradient_checkpointing: bool = doc(False, "Activation checkpointing of the policy's and the critic's layers in "
                                              "the PPO update (recomputed in the backward pass; same gradients).")
    offload_frozen: bool = doc(False, "Keep the reference and the reward model on the CPU, moving them to run.device "
                                      "only for the scoring phase of each step and for evaluation.")
    attn_implementation: str | None = doc("sdpa", "attn_implementation passed to transformers (null: its default).")
    lora: LoraConfig | None = doc(None, "LoRA adapters (needs peft: pip install 'red-kernels[lora]'): only adapters "
                                        "are trained, the reference is the policy with its adapters switched off "
                                        "(model.reference must be null), and final/ holds the adapters and the "
                                        "merged weights. Null: full fine-tuning.")


@dataclass
class DataConfig:
    source: Literal["file", "synthetic"] = doc("file", "'file': prompts from prompt_file; "
                                                       "'synthetic': the demo language.")
    prompt_file: str | None = doc(None, "A .jsonl file (one object per line: a conversation under messages_key or "
                                        "a plain prompt under prompt_key) or a .txt file (one plain prompt per line).")
    prompt_key: str = doc("prompt", "The key that holds a plain prompt (a string) in a .jsonl line; it is tokenised "
                                    "with the tokenizer's special tokens.")
    messages_key: str = doc("messages", "The key that holds a conversation in a .jsonl line: a list of {role, "
                                        "content} turns, the last the user's, rendered with the policy tokenizer's "
                                        "chat template and its generation prompt (no special tokens added on top). "
                                        "A line holding both keys is an error.")
    max_prompt_length: int = doc(128, "Prompts longer than this many tokens (after the chat template) are dropped, "
                                      "never cut; the count is logged as data/dropped_too_long.")


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
    logprob_chunk: int = doc(0, "Response log-probs from the response positions' hidden states, this many tokens "
                                "at a time through lm_head and a float32 log-softmax, so the [B, R, V] float32 "
                                "logits never exist whole (0: the whole model's logits at once).")


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
class TrainerConfig:
    """The trainer's sections: all that `PPOTrainer` reads."""

    run: RunConfig = doc(RunConfig(), "Run folder, length, checkpoints, device.")
    model: ModelConfig = doc(ModelConfig(), "The four models and the tokenizer.")
    data: DataConfig = doc(DataConfig(), "Prompts.")
    generation: GenerationConfig = doc(GenerationConfig(), "Sampling.")
    rollout: RolloutConfig = doc(RolloutConfig(), "Rollout batch.")
    reward: RewardConfig = doc(RewardConfig(), "Sparse or RED rewards, KL penalty, clipping, whitening.")
    ppo: PPOConfig = doc(PPOConfig(), "GAE and the PPO update.")
    optim: OptimConfig = doc(OptimConfig(), "Optimisers and schedules.")


@dataclass
class Config(TrainerConfig):
    """What a YAML file holds: the trainer's sections, then those of ``red-ppo demo`` and ``red-ppo study``."""

    synthetic: SyntheticConfig = doc(SyntheticConfig(), "The demo's synthetic language (data.source=synthetic, "
                                                        "tokenizer 'synthetic', red-ppo demo).")
    demo: DemoConfig = doc(DemoConfig(), "red-ppo demo (and red-ppo study: workers).")
    study: StudyConfig = doc(StudyConfig(), "red-ppo study only.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, check: bool = True) -> Config:
    """Read YAML (or start from ``base`` / the defaults), apply ``--set`` overrides, type-check and
    (with ``check``) validate."""
    cfg = load(Config, path, overrides, base)
    if check:
        validate(cfg)
    return cfg


def default_config_path(name: str = "demo") -> Path:
    return Path(__file__).with_name("configs") / f"{name}.yaml"


# ---------------------------------------------------------------- validation

def validate(cfg: Config) -> None:
    """Reject impossible values in every section; needs no file and loads nothing."""
    validate_trainer(cfg)
    cfg.synthetic.validate()
    cfg.demo.validate()
    cfg.study.validate()


def validate_trainer(cfg: TrainerConfig) -> None:
    """Reject impossible values in the trainer's sections; needs no file and loads nothing."""
    r, g, ro, rw, p, o = cfg.run, cfg.generation, cfg.rollout, cfg.reward, cfg.ppo, cfg.optim
    require(r.seed >= 0, "run.seed", "an integer >= 0", r.seed)
    require(r.total_steps >= 1, "run.total_steps", "an integer >= 1", r.total_steps)
    for name in ("save_every", "eval_every", "eval_prompts", "num_threads", "sample_pages"):
        require(getattr(r, name) >= 0, f"run.{name}", "an integer >= 0", getattr(r, name))
    require(r.report_to in ([], ["none"]) or (all(name in REPORT_TO for name in r.report_to)
                                               and len(set(r.report_to)) == len(r.report_to)),
            "run.report_to", f"a list of distinct names from {list(REPORT_TO)}, or [none]", r.report_to)
    require(r.keep_checkpoints >= 1, "run.keep_checkpoints", "an integer >= 1", r.keep_checkpoints)
    require(r.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", r.device) is not None, "run.device",
            "'cpu', 'cuda', 'cuda:N' or 'auto'", r.device)
    require(g.max_new_tokens >= 1, "generation.max_new_tokens", "an integer >= 1", g.max_new_tokens)
    require(g.temperature > 0, "generation.temperature", "a number > 0", g.temperature)
    require(g.top_k >= 0, "generation.top_k", "an integer >= 0 (0: off)", g.top_k)
    require(0 < g.top_p <= 1, "generation.top_p", "a number in (0, 1]", g.top_p)
    require(ro.batch_size >= 1, "rollout.batch_size", "an integer >= 1", ro.batch_size)
    require(ro.forward_batch_size >= 1, "rollout.forward_batch_size", "an integer >= 1", ro.forward_batch_size)
    require(ro.logprob_chunk >= 0, "rollout.logprob_chunk", "an integer >= 0 (0: whole)", ro.logprob_chunk)
    require(cfg.data.messages_key != cfg.data.prompt_key, "data.messages_key",
            f"a key other than data.prompt_key={cfg.data.prompt_key!r}", cfg.data.messages_key)
    require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length", "an integer >= 1", cfg.data.max_prompt_length)
    try:
        check_reward_mix({"mode": rw.mode, "baseline": rw.baseline, "beta_c": rw.beta_c}, "reward.")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    require(rw.kl_coef >= 0, "reward.kl_coef", "a number >= 0", rw.kl_coef)
    require(rw.target_kl > 0, "reward.target_kl", "a number > 0", rw.target_kl)
    require(rw.kl_horizon >= 1, "reward.kl_horizon", "an integer >= 1", rw.kl_horizon)
    require(rw.clip is None or rw.clip > 0, "reward.clip", "a number > 0 or null", rw.clip)
    require(rw.missing_eos_penalty is None or rw.missing_eos_penalty >= 0, "reward.missing_eos_penalty",
            "a number >= 0 or null", rw.missing_eos_penalty)
    require(rw.backend in BACKENDS, "reward.backend", f"one of {list(BACKENDS)}", rw.backend)
    require(p.epochs >= 1, "ppo.epochs", "an integer >= 1", p.epochs)
    require(p.minibatch_size >= 1, "ppo.minibatch_size", "an integer >= 1", p.minibatch_size)
    require(ro.batch_size % p.minibatch_size == 0, "ppo.minibatch_size",
            f"a divisor of rollout.batch_size={ro.batch_size}", p.minibatch_size)
    require(p.grad_accum_steps >= 1 and p.minibatch_size % p.grad_accum_steps == 0, "ppo.grad_accum_steps",
            f"an integer >= 1 dividing ppo.minibatch_size={p.minibatch_size}", p.grad_accum_steps)
    require(0 <= p.gamma <= 1, "ppo.gamma", "a number in [0, 1]", p.gamma)
    require(0 <= p.lam <= 1, "ppo.lam", "a number in [0, 1]", p.lam)
    require(p.clip_range > 0, "ppo.clip_range", "a number > 0", p.clip_range)
    require(p.value_clip_range is None or p.value_clip_range > 0, "ppo.value_clip_range", "a number > 0 or null",
            p.value_clip_range)
    require(p.entropy_coef >= 0, "ppo.entropy_coef", "a number >= 0", p.entropy_coef)
    require(p.max_grad_norm is None or p.max_grad_norm > 0, "ppo.max_grad_norm", "a number > 0 or null",
            p.max_grad_norm)
    require(o.policy_lr > 0, "optim.policy_lr", "a number > 0", o.policy_lr)
    require(o.critic_lr > 0, "optim.critic_lr", "a number > 0", o.critic_lr)
    require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    require(all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas))
    require(o.eps > 0, "optim.eps", "a number > 0", o.eps)
    require(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    _validate_models(cfg)


def _validate_models(cfg: TrainerConfig) -> None:
    m = cfg.model
    trained = {"model.policy.dtype" if m.policy.dtype else "model.dtype": m.policy.dtype or m.dtype,
               "model.critic_dtype": m.critic_dtype}
    for key, dtype in trained.items():
        require(dtype != "float16", key, "float32 or bfloat16 for a trained model (float16 mixed precision needs "
                                         "loss scaling, which red_ppo does not do; use bfloat16)", dtype)
    for name in ("policy", "reference", "reward_model"):
        source = getattr(m, name)
        if source is None:
            continue
        key = f"model.{name}"
        require((source.path is None) != (source.config is None), f"{key}.path/{key}.config",
                "exactly one of path (pretrained) or config (build from config alone)",
                {"path": source.path, "config": source.config})
        if source.config is not None:
            require(isinstance(source.config.get("model_type"), str), f"{key}.config.model_type",
                    "a transformers model type such as 'llama'", source.config.get("model_type"))
    if m.lora is not None:
        _validate_lora(m)
    if m.tokenizer is None and m.policy.path is None:
        raise ConfigError("model.tokenizer: expected a tokenizer (directory, hub id or 'synthetic') because "
                          "model.policy is built from a config, got null")
    if cfg.data.source == "file":
        require(cfg.data.prompt_file is not None, "data.prompt_file",
                "a .jsonl or .txt file of prompts when data.source='file'", cfg.data.prompt_file)
    if cfg.data.prompt_file is not None:
        require(Path(cfg.data.prompt_file).suffix in (".jsonl", ".txt"), "data.prompt_file",
                "a path ending in .jsonl or .txt", cfg.data.prompt_file)
    if cfg.data.source == "synthetic":
        require(m.tokenizer == "synthetic", "model.tokenizer",
                "'synthetic' when data.source='synthetic'", m.tokenizer)


def _validate_lora(m: ModelConfig) -> None:
    lora = m.lora
    require(lora.r >= 1, "model.lora.r", "an integer >= 1", lora.r)
    require(lora.alpha > 0, "model.lora.alpha", "a number > 0", lora.alpha)
    require(0 <= lora.dropout < 1, "model.lora.dropout", "a number in [0, 1)", lora.dropout)
    targets = lora.target_modules
    require(targets == "all-linear" or (isinstance(targets, list) and len(targets) > 0 and all(targets)),
            "model.lora.target_modules", "a non-empty list of module names or 'all-linear'", targets)
    require(m.reference is None, "model.reference",
            "null with model.lora (the reference is the policy with its adapters switched off)",
            to_dict(m.reference) if m.reference is not None else None)
