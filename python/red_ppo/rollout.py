"""Rollouts: left-padded prompts, sampling with ``generate``, truncation after EOS, and the
log-probs of a batch under a model in one forward pass.

Layout of a rollout row: ``[left padding | prompt | response | right padding]``. Every
prompt block has the same width ``P``, so the response always starts at column ``P``
(``response_start = P`` for the fused op) and response token ``t`` sits at ``P + t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R]: prompts and responses
    attention_mask: torch.Tensor  # [B, P + R] long: 1 on real prompt and response tokens
    prompt_width: int  # P: the response starts at this column
    response_mask: torch.Tensor  # [B, R] float: 1 on response tokens (up to and including the first EOS)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).long()

    def response_lists(self) -> list[list[int]]:
        return [row[: int(n)].tolist() for row, n in zip(self.responses, self.lengths)]

    def prompt_lists(self) -> list[list[int]]:
        prompts = self.input_ids[:, : self.prompt_width]
        keep = self.attention_mask[:, : self.prompt_width].bool()
        return [row[k].tolist() for row, k in zip(prompts, keep)]

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(self.input_ids[index], self.attention_mask[index], self.prompt_width, self.response_mask[index])


def reward_model_mask(rollout: Rollout, pad_id: int) -> torch.Tensor:
    """The attention mask [B, P + R] under which the reward model scores a rollout: response tokens
    after the last one that is not the pad id are left out, so the sequence score is read where a
    Hugging Face ``*ForSequenceClassification`` model reads it (the last non-pad token). With a
    distinct pad id that is the EOS itself (a pad the policy sampled inside a response stays in);
    with pad == EOS it is the token before the EOS, as the reward model was trained to score it."""
    real = rollout.response_mask.bool()
    columns = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real & (rollout.responses != pad_id), columns, -1).max(dim=1, keepdim=True).values
    scored = real & (columns <= last)
    return torch.cat([rollout.attention_mask[:, : rollout.prompt_width], scored.long()], dim=1)


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]), padded on the left."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("sequences: expected every prompt to have at least one token, got an empty prompt")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad the rest. -> (responses, mask float)."""
    is_eos = responses == eos_id
    # Tokens strictly after the first EOS: the running count of EOS before them is >= 1.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    return responses.masked_fill(~mask, pad_id), mask.float()


def build_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                  eos_id: int, pad_id: int) -> Rollout:
    responses, response_mask = truncate_after_eos(responses, eos_id, pad_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return Rollout(input_ids, attention_mask, prompt_ids.shape[1], response_mask)


@torch.no_grad()
def generate_rollout(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen, eos_id: int,
                     pad_id: int) -> Rollout:
    """Sample one response per prompt with ``generate`` (global torch RNG) and build the rollout."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                              top_k=gen.top_k, top_p=gen.top_p, pad_token_id=pad_id, eos_token_id=eos_id,
                              use_cache=True)
    # generate() fills every field left unset above from the model's own generation_config (a
    # checkpoint's generation_config.json: repetition_penalty, min_new_tokens, suppress_tokens, ...),
    # which would sample from another distribution than the one PPO's log-probs describe.
    model_defaults = policy.generation_config
    policy.generation_config = GenerationConfig()
    try:
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        policy.generation_config = model_defaults
    responses = out[:, prompt_ids.shape[1]:]
    return build_rollout(prompt_ids, prompt_mask, responses, eos_id, pad_id)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` does for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                    temperature: float) -> torch.Tensor:
    """Logits [B, R, V] (float32, divided by the temperature) that predict each response token."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False)
    logits = out.logits[:, prompt_width - 1: -1].float()
    return logits / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, temperature: float, chunk: int) -> torch.Tensor:
    """Log-probs [B, R] of the sampled response tokens under ``model`` (0 on padding)."""
    parts = []
    for start in range(0, rollout.input_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = response_logits(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                 rollout.prompt_width, temperature)
        parts.append(gather_logprobs(logits, rollout.responses[rows]))
    return torch.cat(parts) * rollout.response_mask

