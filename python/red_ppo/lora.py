"""LoRA with peft (``model.lora``): adapters on the policy, and on the critic's backbone if asked; the
reference is the policy with its adapters switched off, so no second copy of the policy exists.

peft is an optional extra (``pip install 'red-kernels[lora]'``); `require_peft` says so as a
configuration error before any model loads.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from red_ppo.config import ConfigError, LoraConfig


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"model.lora: expected peft to be installed for LoRA (pip install 'red-kernels[lora]'), "
                          f"got {error}") from None


def _peft_config(lora: LoraConfig, task_type: str | None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type)


def add_adapters(policy: nn.Module, critic: nn.Module, lora: LoraConfig) -> nn.Module:
    """The policy wrapped in a peft model with fresh adapters (their B matrices are zeros, so the policy
    starts equal to its base); adapters on ``critic.backbone`` too with ``lora.critic``. Only the adapters
    (and the critic's value head) keep ``requires_grad``."""
    from peft import get_peft_model

    if lora.critic:
        critic.backbone = get_peft_model(critic.backbone, _peft_config(lora, None))
    return get_peft_model(policy, _peft_config(lora, "CAUSAL_LM"))


class AdapterFreeReference(nn.Module):
    """The frozen reference as a view of the policy: its forward, and the decoder and output layer that
    chunked log-probs call, are the policy's run with its adapters switched off (peft's
    ``disable_adapter``), which is exactly the base model."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        # Not a submodule: moving, freezing or offloading the reference must leave the policy alone.
        object.__setattr__(self, "policy", policy)

    def forward(self, *args, **kwargs):
        return WithAdaptersOff(self.policy, self.policy)(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's samples (evaluation's win rate compares with the starting policy's responses)."""
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)

    @property
    def config(self):
        """The model's config (chunked log-probs read it), the policy's."""
        return self.policy.config

    @property
    def generation_config(self):
        return self.policy.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.policy.generation_config = value

    def get_decoder(self) -> "WithAdaptersOff":
        return WithAdaptersOff(self.policy, self.policy.get_decoder())

    def get_output_embeddings(self) -> "WithAdaptersOff":
        return WithAdaptersOff(self.policy, self.policy.get_output_embeddings())


class WithAdaptersOff:
    """``module`` (a part of ``policy``) called with ``policy``'s adapters switched off."""

    def __init__(self, policy: nn.Module, module: nn.Module) -> None:
        self.policy, self.module = policy, module

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.module(*args, **kwargs)


def save_adapters_and_merged(policy: nn.Module, adapter_folder: Path, merged_folder: Path) -> None:
    """The adapters (``adapter_config.json`` and their weights, for ``PeftModel.from_pretrained`` on the
    base) and the merged weights (a plain model for ``AutoModelForCausalLM.from_pretrained``); merged on
    a copy, so the policy keeps its adapters."""
    policy.save_pretrained(adapter_folder)
    merged = copy.deepcopy(policy).merge_and_unload()
    # generate() leaves its own settings in the base model's generation_config; the policy's holds the model's.
    merged.generation_config = policy.generation_config
    merged.save_pretrained(merged_folder)
