"""Prompts: read from a file (or the synthetic language), rendered and tokenised once, split into
training and held-out prompts, and served in shuffled epochs by a sampler whose position is saved
in checkpoints.

A ``.jsonl`` line holds a conversation under ``data.messages_key`` (a list of ``{role, content}`` turns,
the last one the user's), rendered with the policy tokenizer's chat template and its generation
prompt, or a plain string under ``data.prompt_key``, tokenised as it is with the tokenizer's special
tokens. A ``.txt`` file holds one plain prompt per line. Prompts longer than ``data.max_prompt_length``
tokens are dropped, never cut.
"""

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


@dataclass(frozen=True)
class _Line:
    number: int
    text: str | None               # a plain prompt
    messages: list[dict] | None    # or a conversation, checked but not yet rendered


def _describe(value) -> str:
    return f"{type(value).__name__} {json.dumps(value)[:80]}"


def _check_conversation(messages, number: int, where: str, key: str) -> None:
    """A non-empty list of turns, each a dict with string ``role`` and ``content``, the last the user's."""
    def fail(expected: str, got: str):
        raise ConfigError(f"data.messages_key: expected {expected} under {key!r}, got {got} (line {number} of {where})")

    if not isinstance(messages, list):
        fail("a list of {role, content} turns", _describe(messages))
    if not messages:
        fail("a conversation of at least one turn", "an empty list")
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(name), str) for name in ("role", "content")):
            fail("every turn to be a {role, content} dict of strings", f"turn {index}: {_describe(turn)}")
    if messages[-1]["role"] != "user":
        fail("a conversation whose last turn is the user's", f"a last turn of role {messages[-1]['role']!r}")


def read_prompt_lines(cfg: TrainerConfig) -> tuple[list[_Line], str]:
    """The prompts of ``data.source`` (plain strings or checked conversations), and where they came from."""
    if cfg.data.source == "synthetic":
        from red_ppo.synthetic import SyntheticTask
        return [_Line(number, text, None) for number, text in enumerate(SyntheticTask().prompts, 1)], \
            "the synthetic language"
    path = Path(cfg.data.prompt_file)
    prompt_key, messages_key = cfg.data.prompt_key, cfg.data.messages_key
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            lines.append(_Line(number, line, None))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"data.prompt_file: line {number} of {path} is not JSON ({error})") from None
        if isinstance(record, dict) and prompt_key in record and messages_key in record:
            raise ConfigError(f"data.messages_key: expected line {number} of {path} to hold either a conversation "
                              f"under {messages_key!r} or a string under {prompt_key!r} (data.prompt_key), got both")
        if isinstance(record, dict) and messages_key in record:
            _check_conversation(record[messages_key], number, str(path), messages_key)
            lines.append(_Line(number, None, record[messages_key]))
        elif isinstance(record, dict) and isinstance(record.get(prompt_key), str):
            lines.append(_Line(number, record[prompt_key], None))
        else:
            raise ConfigError(f"data.prompt_key: expected every line of {path} to hold a string under "
                              f"{prompt_key!r}, got line {number}, with no string under {prompt_key!r} and no "
                              f"conversation under {messages_key!r} (data.messages_key): {line[:80]!r}")
    if not lines:
        raise ConfigError(f"data.prompt_file: expected at least one prompt, got an empty file {str(path)!r}")
    return lines, str(path)


def render_chat(tokenizer, messages: list[dict], number: int, where: str, key: str) -> str:
    """The conversation as the policy reads it: its chat template with the generation prompt."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise ConfigError(f"data.messages_key: expected a conversation the policy's chat template accepts under "
                          f"{key!r}, got one it refuses: {error} (line {number} of {where})") from None


def load_prompts(cfg: TrainerConfig, tokenizer) -> tuple[list[Prompt], dict]:
    """Prompts kept, and counts for the log: {"data/prompts": kept, "data/dropped_too_long": n}.

    Plain prompts are tokenised with the tokenizer's special tokens (its BOS, if it adds one); a
    conversation's rendered text already holds whatever the template puts there, so it is tokenised
    without them. Prompts longer than ``data.max_prompt_length`` tokens are dropped, never cut.
    """
    lines, where = read_prompt_lines(cfg)
    first_chat = next((line for line in lines if line.messages is not None), None)
    if first_chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.messages_key: expected a policy tokenizer with a chat template to render the "
                          f"conversation under {cfg.data.messages_key!r} (line {first_chat.number} of {where}), got "
                          f"model.tokenizer {cfg.model.tokenizer or cfg.model.policy.path!r} without one")
    texts = [line.text if line.messages is None
             else render_chat(tokenizer, line.messages, line.number, where, cfg.data.messages_key) for line in lines]
    ids: list[list[int] | None] = [None] * len(lines)
    for special in (True, False):
        rows = [i for i, line in enumerate(lines) if (line.messages is None) == special]
        if rows:
            tokens = tokenizer([texts[i] for i in rows], add_special_tokens=special)["input_ids"]
            for i, row in zip(rows, tokens):
                ids[i] = list(row)
    for line, row in zip(lines, ids):
        if not row:
            raise ConfigError(f"data.prompt_file: expected every prompt to have at least one token, got an empty "
                              f"prompt (line {line.number} of {where})")
    limit = cfg.data.max_prompt_length
    prompts = [Prompt(row, text, line.messages) for line, text, row in zip(lines, texts, ids) if len(row) <= limit]
    if not prompts:
        lengths = [len(row) for row in ids]
        raise ConfigError(f"data.max_prompt_length: expected at least one prompt of at most {limit} tokens, got "
                          f"every prompt of {where} longer ({min(lengths)} to {max(lengths)} tokens); longer "
                          f"prompts are dropped, never cut")
    return prompts, {"data/prompts": len(prompts), "data/dropped_too_long": len(lines) - len(prompts)}


def split_prompts(prompts: list[Prompt], eval_count: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
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

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def next_batch(self, size: int) -> list[Prompt]:
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
