"""Rollouts: left-padded prompts, sampling with ``generate``, truncation after EOS, and the
log-probs of a batch under a model in one forward pass (whole, or through lm_head in chunks of
response positions), with a trained model's forward under autocast.

Layout of a rollout row: ``[left padding | prompt | response | right padding]``. Every
prompt block has the same width ``P``, so the response always starts at column ``P``
(``response_start = P`` for the fused op) and response token ``t`` sits at ``P + t``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


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


def check_prefix_scores(name: str, scores, mask: torch.Tensor, rows: str) -> None:
    """A scorer's output must be a floating-point ``[B, T]`` tensor of prefix scores, the shape of ``mask``
    (``rows`` names whose rows they are, for the message: "the rollout's")."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(mask.shape) \
            or not scores.is_floating_point():
        got = f"{scores.dtype} tensor of shape {list(scores.shape)}" if isinstance(scores, torch.Tensor) \
            else type(scores).__name__
        raise ValueError(f"{name}: expected a floating-point tensor of prefix scores of shape "
                         f"{list(mask.shape)} ({rows} [B, T]), got {got}")


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


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward of a trained model with float32 weights in ``dtype`` (mixed precision); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def generate_rollout(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen, eos_id: int,
                     pad_id: int, dtype: torch.dtype = torch.float32) -> Rollout:
    """Sample one response per prompt with ``generate`` (global torch RNG, the forward under `autocast` in
    ``dtype``) and build the rollout."""
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
        with autocast(prompt_ids.device, dtype):
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


def _token_logprobs(head, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    entropy: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N] of ``tokens`` [N] from hidden states [N, H] (lm_head, float32, temperature) and the
    entropies [N]: with their graph (``entropy="grad"``), detached (``"value"``) or none (None)."""
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if entropy is None:
        return logprobs, None
    logp = logp if entropy == "grad" else logp.detach()
    return logprobs, -(logp.exp() * logp).sum(-1)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      temperature: float, chunk: int = 0,
                      entropy: str | None = "grad") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies [B, R] of the response tokens ``input_ids[:, prompt_width:]``.

    ``chunk = 0``: from the model's whole logits (`response_logits`). ``chunk > 0``: the decoder's hidden
    states of the positions that predict response tokens go through lm_head ``chunk`` tokens at a time,
    each chunk's lm_head and float32 log-softmax checkpointed when gradients are on, so that only
    [B, R] tensors outlive a chunk. ``entropy``: "grad" (with its graph), "value" (detached) or None.
    """
    tokens = input_ids[:, prompt_width:]
    if chunk == 0:
        logits = response_logits(model, input_ids, attention_mask, prompt_width, temperature)
        entropies = None if entropy is None else entropy_from_logits(logits if entropy == "grad" else logits.detach())
        return gather_logprobs(logits, tokens), entropies
    for name in ("final_logit_softcapping", "logit_scale"):  # applied after lm_head by the model's own forward
        if getattr(model.config, name, None) is not None:
            raise ValueError(f"rollout.logprob_chunk: expected a model whose logits are lm_head(hidden states), got "
                             f"a {type(model).__name__} with config.{name}={getattr(model.config, name)!r}; "
                             f"set rollout.logprob_chunk: 0")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask), use_cache=False)[0]
    hidden = hidden[:, prompt_width - 1: -1].reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1)
    head = model.get_output_embeddings()
    logprobs, entropies = [], []
    for start in range(0, flat_tokens.shape[0], chunk):
        part = (head, hidden[start:start + chunk], flat_tokens[start:start + chunk], temperature, entropy)
        if torch.is_grad_enabled():
            logprob, part_entropy = checkpoint(_token_logprobs, *part, use_reentrant=False)
        else:
            logprob, part_entropy = _token_logprobs(*part)
        logprobs.append(logprob)
        entropies.append(part_entropy)
    return torch.cat(logprobs).view_as(tokens), None if entropy is None else torch.cat(entropies).view_as(tokens)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, temperature: float, chunk: int, logprob_chunk: int = 0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-probs [B, R] of the sampled response tokens under ``model`` (0 on padding), ``chunk`` rows per
    forward pass (under `autocast` in ``dtype``), ``logprob_chunk`` tokens per lm_head (`response_logprobs`)."""
    parts = []
    for start in range(0, rollout.input_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        with autocast(rollout.input_ids.device, dtype):
            parts.append(response_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                           rollout.prompt_width, temperature, logprob_chunk, entropy=None)[0])
    return torch.cat(parts) * rollout.response_mask

