"""Tokenizers and the four models: policy, frozen reference, critic, frozen reward model.

`check_resources` runs before any model is loaded: files exist, tokenizers load, and a reward model
with its own tokenizer (one that differs from the policy's) can be aligned to the policy's tokens.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from red_kernels import ScoreHead
from red_ppo.config import ConfigError, ModelSource, TrainerConfig
from red_ppo.rollout import autocast, position_ids

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_or_hub(key: str, path: str) -> None:
    """A path that names a local file or folder must exist; anything else must read as a hub id."""
    if Path(path).expanduser().exists():
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or not HUB_ID.match(path)
    if looks_local:
        raise ConfigError(f"{key}: expected an existing local directory or a hub id, got {path!r} (not found)")


def load_tokenizer(source: str, key: str):
    if source == "synthetic":
        from red_ppo.synthetic import build_tokenizer
        return build_tokenizer()
    _local_or_hub(key, source)
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: expected a loadable tokenizer, got {source!r} ({error})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{key}: expected a tokenizer with an EOS token, got {source!r} without one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_difference(a, b) -> str | None:
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        if len(va) != len(vb):
            return f"{len(vb)} tokens instead of {len(va)}"
        token = next(t for t in sorted(va) if va[t] != vb.get(t))
        return f"token {token!r} has id {vb.get(token)} instead of {va[token]}"
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(b, name)} instead of {getattr(a, name)}"
    return None


def _check_model_config(source: ModelSource, key: str, vocab: int) -> None:
    """The model's config (not its weights): vocabulary size, and one label for a reward model."""
    if source.config is not None:
        size, labels, architectures = source.config.get("vocab_size"), source.config.get("num_labels", 1), []
    else:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(source.path)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{key}.path: expected a model directory or hub id with a config.json, "
                              f"got {source.path!r} ({error})") from None
        size, labels = getattr(config, "vocab_size", None), config.num_labels
        architectures = getattr(config, "architectures", None) or []
    if size is not None and size < vocab:
        raise ConfigError(f"{key}: expected a vocab_size of at least {vocab} (the tokenizer's), got {size}")
    trained_head = any(a.endswith("ForSequenceClassification") for a in architectures) or source.config is not None
    if key == "model.reward_model" and trained_head and labels != 1:
        raise ConfigError(f"{key}: expected a sequence-classification reward model with num_labels=1 (one score), "
                          f"got num_labels={labels}")


class Tokenizers(NamedTuple):
    policy: Any
    reward_model: Any | None  # the reward model's own tokenizer where it differs from the policy's, else None


def check_resources(cfg: TrainerConfig) -> Tokenizers:
    """Everything that needs files but no model: returns the policy's tokenizer and the reward model's own."""
    m = cfg.model
    if cfg.data.source == "file":
        if not Path(cfg.data.prompt_file).is_file():
            raise ConfigError(f"data.prompt_file: expected an existing file, got {cfg.data.prompt_file!r} (not found)")
    for name in ("policy", "reference", "reward_model"):
        source = getattr(m, name)
        if source is not None and source.path is not None:
            _local_or_hub(f"model.{name}.path", source.path)
    tokenizer = load_tokenizer(m.tokenizer or m.policy.path, "model.tokenizer")
    rm_tokenizer = reward_model_tokenizer(cfg, tokenizer)
    for name in ("policy", "reference", "reward_model"):
        source = getattr(m, name)
        if source is not None:
            own = rm_tokenizer if name == "reward_model" and rm_tokenizer is not None else tokenizer
            _check_model_config(source, f"model.{name}", len(own))
    return Tokenizers(tokenizer, rm_tokenizer)


def reward_model_tokenizer(cfg: TrainerConfig, tokenizer):
    """The reward model's own tokenizer (``model.reward_model.tokenizer``, else one saved in its path) where it
    differs from the policy's ``tokenizer``; None where the reward model reads the policy's token ids.

    A different tokenizer must be fast (its character offsets align its tokens to the policy's), and the critic,
    which reads the policy's tokens, must then start from the policy (``model.critic_init: policy``)."""
    m = cfg.model
    rm = m.reward_model
    source = rm.tokenizer or (rm.path if rm.path and _has_tokenizer(rm.path) else None)
    if source is None:
        return None
    rm_tokenizer = load_tokenizer(source, "model.reward_model.tokenizer")
    difference = _tokenizer_difference(tokenizer, rm_tokenizer)
    if difference is None:
        return None
    if not getattr(rm_tokenizer, "is_fast", False):
        raise ConfigError(f"model.reward_model.tokenizer: expected a fast (Rust `tokenizers`) tokenizer, which reports "
                          f"the character offsets that align its tokens to the policy's, got "
                          f"{type(rm_tokenizer).__name__} from {source!r}")
    if m.critic_init != "policy":
        raise ConfigError(
            f"model.critic_init: expected 'policy' because the reward model has its own tokenizer (from {source!r}, "
            f"not the policy's from {m.tokenizer or m.policy.path!r}: {difference}), got {m.critic_init!r}. The critic "
            f"reads the policy's token ids, which the reward model's backbone does not understand; set "
            f"model.critic_init=policy.")
    return rm_tokenizer


def _has_tokenizer(path: str) -> bool:
    folder = Path(path).expanduser()
    return folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def _config_kwargs(source: ModelSource, tokenizer, extra: dict) -> dict:
    kwargs = dict(source.config)
    kwargs.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        kwargs.setdefault(name, getattr(tokenizer, name))
    kwargs.update(extra)
    return kwargs


def model_dtypes(cfg: TrainerConfig) -> dict[str, torch.dtype]:
    """Each model's dtype: the autocast dtype of the trained ones (policy, critic; their weights stay
    float32), the weights' dtype of the frozen ones (reference, reward model)."""
    m = cfg.model
    policy = m.policy.dtype or m.dtype
    names = {"policy": policy, "critic": m.critic_dtype or policy,
             "reference": (m.reference.dtype if m.reference is not None else None) or m.dtype,
             "reward_model": m.reward_model.dtype or m.dtype}
    return {name: DTYPES[value] for name, value in names.items()}


def build_model(source: ModelSource, tokenizer, kind: str, cfg: TrainerConfig,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """An AutoModelForCausalLM (``kind="causal_lm"``) or a num_labels=1 sequence classifier, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    extra = {} if kind == "causal_lm" else {"num_labels": 1}
    attn = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    if source.path is not None:
        model = auto.from_pretrained(source.path, dtype=dtype, **extra, **attn)
    else:
        kwargs = _config_kwargs(source, tokenizer, extra)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        model = auto.from_config(config, dtype=dtype, **attn)
    if kind != "causal_lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of a transformers model's layers (non-reentrant); active under `checkpointing`."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def checkpointing(*models: nn.Module):
    """transformers checkpoints only in training mode: switch that flag on, for the block, for the modules whose
    ``gradient_checkpointing`` is set and nothing else (their attention, dropout and norms stay in eval mode)."""
    flagged = [module for model in models for module in model.modules()
               if getattr(module, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.training = True
    try:
        yield
    finally:
        for module in flagged:
            module.training = False


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class Critic(nn.Module):
    """A causal-LM backbone with a value head computed by the fused op (``ScoreHead``). The backbone runs
    under `autocast` in ``autocast_dtype`` (mixed precision over its own dtype), the head in the head's dtype."""

    def __init__(self, backbone: nn.Module, head: ScoreHead, backend: str = "auto") -> None:
        super().__init__()
        self.backbone, self.head, self.backend = backbone, head, backend
        self.autocast_dtype = torch.float32

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module, backend: str = "auto", zero_head: bool = False) -> "Critic":
        """The reward model's backbone, with its score head (``zero_head=False``) or a head of zeros."""
        rm = copy.deepcopy(reward_model)
        head = getattr(rm, "score", None) or getattr(rm, "classifier", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ConfigError(f"model.critic_init: expected a reward model with a linear nn.Linear(H, 1) score head "
                              f"to initialise the critic from, got {head!r}")
        if zero_head:  # with a bias, as from_policy, whether or not the reward model's head has one
            value_head = ScoreHead(head.in_features, device=head.weight.device, dtype=head.weight.dtype)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        else:
            value_head = ScoreHead.from_linear(head)
        return cls(getattr(rm, rm.base_model_prefix), value_head, backend)

    @classmethod
    def from_policy(cls, policy: nn.Module, backend: str = "auto") -> "Critic":
        """The policy's backbone with a value head of zeros (weight and bias): V = 0 everywhere at the start."""
        backbone = copy.deepcopy(getattr(policy, policy.base_model_prefix))
        head = ScoreHead(policy.config.hidden_size, device=policy.device, dtype=policy.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(backbone, head, backend)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                response_width: int) -> torch.Tensor:
        """Values ``[B, R]``: the head at the last token of each state (column P - 1 + t for token t)."""
        with autocast(input_ids.device, self.autocast_dtype):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids(attention_mask), use_cache=False)[0]
        hidden = hidden.to(self.head.weight.dtype)
        scores = self.head(hidden, attention_mask, prompt_width, backend=self.backend).scores
        return scores[:, prompt_width - 1: prompt_width - 1 + response_width]
