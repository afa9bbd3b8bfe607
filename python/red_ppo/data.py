"""Prompts: read from a file (or the synthetic language), tokenised once, split into training
and held-out prompts, and served in shuffled epochs by a sampler whose position is saved
in checkpoints."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from red_ppo.config import ConfigError, TrainerConfig


@dataclass(frozen=True)
class Prompt:
    ids: list[int]                 # the policy's token ids of the prompt, exactly what the policy is fed
    text: str                      # the prompt as text: the rendered chat (template applied) or the plain string
    messages: list[dict] | None    # the conversation of a `messages` line ({role, content} dicts); None for a `prompt` line


def read_prompt_texts(cfg: TrainerConfig) -> list[str]:
    if cfg.data.source == "synthetic":
        from red_ppo.synthetic import SyntheticTask
        return SyntheticTask().prompts
    path = Path(cfg.data.prompt_file)
    if path.suffix == ".txt":
        texts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"data.prompt_file: line {number} of {path} is not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(cfg.data.prompt_key), str):
                raise ConfigError(f"data.prompt_key: expected every line of {path} to hold a string under "
                                  f"{cfg.data.prompt_key!r}, got line {number}: {line[:80]!r}")
            texts.append(record[cfg.data.prompt_key])
    if not texts:
        raise ConfigError(f"data.prompt_file: expected at least one prompt, got an empty file {str(path)!r}")
    return texts


def tokenize_prompts(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per prompt (with the tokenizer's special tokens), keeping the last ``max_length``."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = [row[-max_length:] for row in ids]
    if any(len(row) == 0 for row in out):
        raise ConfigError("data.prompt_file: expected every prompt to have at least one token, got an empty prompt")
    return out


def split_prompts(prompts: list[list[int]], eval_count: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out prompts for evaluation. With fewer than twice ``eval_count`` distinct prompts
    (the synthetic language has 40), evaluation draws from the same prompts instead."""
    if eval_count == 0:
        return prompts, []
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    if len(prompts) >= 2 * eval_count:
        return [prompts[i] for i in order[eval_count:]], [prompts[i] for i in order[:eval_count]]
    return prompts, [prompts[order[i % len(prompts)]] for i in range(eval_count)]


class PromptSampler:
    """Shuffled passes over the prompts; ``state_dict`` holds the generator and the position."""

    def __init__(self, prompts: list[list[int]], seed: int) -> None:
        self.prompts = prompts
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def next_batch(self, size: int) -> list[list[int]]:
        batch = []
        while len(batch) < size:
            if self.position >= len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self.position = 0
            batch.append(self.prompts[self.order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = list(state["order"]), state["position"]
