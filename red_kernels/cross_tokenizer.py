"""A reward model with its own tokenizer and chat template scores a policy's response: render, locate, align.

The steps that red_ppo and `red_kernels.integrations.verl` share (neither verl nor transformers is imported):

1. `policy_response`: the response's text from the policy's sampled ids and each token's span in it, the EOS
   text deleted (as verl's reward loop deletes it before rendering);
2. `render_response` (or the caller's own rendering, e.g. verl's) and `locate_response`: the text the reward
   model reads and where the response starts in it;
3. `reward_model_text`: that text as the reward model's tokens and their character spans;
4. the caller scores those tokens (every prefix score: `red_kernels.hf.score_prefixes`, vLLM ``token_classify``);
5. `align_scores`: the prefix scores moved onto the policy's tokens (`redistribute_across_tokenizers`);
6. `reward_row`: the row a PPO trainer adds: ``sparse`` (the whole text's score on the last response token) or
   ``red`` (the aligned token rewards mixed with that sparse row by ``beta_c``, `red_kernels.reward_mix`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from red_kernels.align import (CrossTokenizerRewards, policy_token_spans, redistribute_across_tokenizers,
                               reward_model_token_spans)
from red_kernels.reward_mix import check_reward_mix, mix_rewards

__all__ = ["RewardModelText", "align_scores", "locate_response", "policy_response", "render_response",
           "reward_model_text", "reward_row"]

_MARKER = "\u27e6red-kernels:response\u27e7"


class RewardModelText(NamedTuple):
    """One response as the reward model reads it, with what aligning its scores needs."""

    rm_text: str              # the text the reward model scores
    response_start: int       # where the response starts in rm_text
    response_text: str        # the response as the policy's tokens decode (EOS text deleted)
    policy_spans: torch.Tensor  # [n_policy, 2] each policy token's characters in response_text
    rm_ids: list              # the reward model's token ids of rm_text (add_special_tokens=True, as a server)
    rm_spans: torch.Tensor    # [n_rm, 2] each reward-model token's characters in rm_text


def policy_response(policy_tokenizer, response_ids: Sequence[int]):
    """``(response_text, policy_spans)`` of the policy's response tokens, the EOS token's text deleted as verl
    deletes it before rendering (`red_kernels.align.policy_token_spans`)."""
    eos = policy_tokenizer.eos_token
    return policy_token_spans(policy_tokenizer, response_ids, remove=[eos] if eos else [])


def _strip_bos(text: str, tokenizer) -> str:
    # as verl's compute_score_disrm: the tokenizer (or the server) adds the BOS again
    bos = tokenizer.bos_token
    return text[len(bos):] if bos is not None and text.startswith(bos) else text


def locate_response(rm_tokenizer, chat: list, response_text: str, rm_text: str, *, sample) -> int:
    """Where ``response_text`` starts in ``rm_text``: the chat rendered with a marker as the assistant's
    content must be ``rm_text`` with the response replaced by the marker; otherwise the template changed the
    response (stripped it, cut a thinking block, ...) and ValueError names the sample."""
    marked = rm_tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": _MARKER}],
                                              add_generation_prompt=False, tokenize=False)
    parts = _strip_bos(marked, rm_tokenizer).split(_MARKER)
    if len(parts) != 2 or parts[0] + response_text + parts[1] != rm_text:
        raise ValueError(f"sample {sample}: the reward model's chat template does not reproduce the response "
                         f"text verbatim, so its tokens cannot be matched to the policy's: response "
                         f"{response_text[:80]!r}")
    return len(parts[0])


def render_response(rm_tokenizer, chat: list, prompt_text: str, response_text: str, *, sample) -> tuple[str, int]:
    """``(rm_text, response_start)``: the text the reward model reads and where the response starts in it.

    A reward-model tokenizer with a chat template renders ``chat`` with the response as the assistant's turn,
    without a generation prompt and without a leading BOS (its tokenizer adds one), as verl's
    ``compute_score_disrm`` renders it; the response is located with `locate_response`. Without a chat
    template the text is ``prompt_text + response_text``.
    """
    if not getattr(rm_tokenizer, "chat_template", None):
        return prompt_text + response_text, len(prompt_text)
    rendered = rm_tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": response_text}],
                                                add_generation_prompt=False, tokenize=False)
    rm_text = _strip_bos(rendered, rm_tokenizer)
    return rm_text, locate_response(rm_tokenizer, chat, response_text, rm_text, sample=sample)


def reward_model_text(rm_tokenizer, rm_text: str, response_start: int, response_text: str, policy_spans, *,
                      sample) -> RewardModelText:
    """The reward model's tokens of ``rm_text`` and their spans (`reward_model_token_spans`), with the rest."""
    rm_ids, rm_spans = reward_model_token_spans(rm_tokenizer, rm_text, sample=sample)
    return RewardModelText(rm_text, response_start, response_text, policy_spans, rm_ids, rm_spans)


def align_scores(text: RewardModelText, scores, *, baseline: str, sample) -> CrossTokenizerRewards:
    """The reward model's prefix scores ``[n_rm]`` over ``text.rm_text`` (one per token of ``text.rm_ids``)
    moved onto the policy's tokens with `redistribute_across_tokenizers`."""
    n = scores.numel() if isinstance(scores, torch.Tensor) else len(scores)
    if n != len(text.rm_ids):
        raise ValueError(f"sample {sample}: the reward model scored {n} tokens but its tokenizer "
                         f"makes {len(text.rm_ids)} of the text (a different tokenizer or truncation on the server)")
    return redistribute_across_tokenizers(scores, text.rm_spans, text.rm_text, text.response_text, text.policy_spans,
                                          response_start=text.response_start, baseline=baseline, sample=sample)


def reward_row(aligned: CrossTokenizerRewards, mode: str, beta_c: float = 1.0) -> torch.Tensor:
    """One reward per policy response token (float32): ``sparse``, the whole text's score on the last token;
    ``red``, ``beta_c * aligned.token_rewards + (1 - beta_c) * sparse``. An empty response gives an empty row."""
    check_reward_mix({"mode": mode, "beta_c": beta_c})
    sparse = torch.zeros(aligned.token_rewards.numel(), dtype=torch.float32)
    if sparse.numel():
        sparse[-1] = aligned.score
    if mode == "sparse":
        return sparse
    return mix_rewards(aligned.token_rewards, sparse, float(beta_c))
