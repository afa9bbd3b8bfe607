"""Hugging Face reward models through the fused op: one-pass prefix scores and `get_reward`.

A decoder-only ``AutoModelForSequenceClassification`` reward model attends causally, so
its score head applied at position t is the model's score of the prefix up to t. One
backbone forward therefore gives every prefix score, and `red_kernels.redistribute`
turns them into the sequence reward and the dense RED token rewards (docs/spec.md section 1).

* `score_prefixes`: the op's output for a reward model and a padded batch.
* `get_reward`: a drop-in for the ``get_reward(model, query_responses, pad_token_id,
  context_length)`` helper of TRL and open-instruct (same arguments, same three results,
  same shapes and dtypes), computed through the fused op.
* `get_token_rewards`: what a PPO loop wants, response-aligned token rewards and the
  sequence reward, under the same conventions as `get_reward`.

``transformers`` is not imported here: models are recognised by the attributes every
``PreTrainedModel`` has (``config``, ``base_model_prefix``), so this module imports
without it.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import NamedTuple

import torch
from torch import nn

from red_kernels.head import ScoreHead
from red_kernels._validate import _describe, _is_int, check_strided
from red_kernels.op import RedistributeOutput, redistribute

__all__ = ["TokenRewards", "get_reward", "get_token_rewards", "score_prefixes"]

# Where sequence-classification models keep their head, in the order they are looked for.
HEAD_NAMES = ("score", "classifier")

# Decoder-only families whose token attention is causal. Consulted when attention modules
# carry no ``is_causal`` flag (older transformers) or also hold a bidirectional vision tower.
KNOWN_CAUSAL_DECODERS = frozenset({
    "bloom", "cohere", "cohere2", "deepseek_v2", "deepseek_v3", "exaone", "falcon", "gemma", "gemma2",
    "gemma3_text", "glm", "glm4", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite",
    "granitemoe", "internlm2", "llama", "mistral", "mixtral", "mpt", "nemotron", "olmo", "olmo2", "olmoe",
    "opt", "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
    "stablelm", "starcoder2",
})

# Backbones already found causal: walking every module costs more than the fused op itself.
_CAUSAL_BACKBONES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_WHY_PREFIX = ("the score at position t must depend only on tokens 0..t for one forward pass to give "
               "every prefix score, so one-pass prefix scores would be wrong for it")


class TokenRewards(NamedTuple):
    """What `get_token_rewards` returns; both float32."""

    token_rewards: torch.Tensor  # [B, T - context_length]: aligned with query_responses[:, context_length:]
    rewards: torch.Tensor  # [B]: the sequence reward, as `get_reward`'s final_rewards (in float32)


# ---------------------------------------------------------------------------------------
# Recognising a reward model: its backbone, its head, and whether its attention is causal.


def _check_causal(model: nn.Module, backbone: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a decoder whose token attention is causal."""
    config = model.config
    name = type(model).__name__
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"reward_model: expected a decoder-only model with causal attention, got {name} "
            f"(config.is_encoder_decoder=True): its decoder reads the whole input through the encoder, "
            f"and {_WHY_PREFIX}. Score each prefix with its own forward instead.")
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False:
        raise ValueError(
            f"reward_model: expected a decoder with causal attention, got {name} configured for "
            f"bidirectional attention: the hidden state at position t sees later tokens, and {_WHY_PREFIX}.")
    flags = {(type(module).__name__, module.is_causal) for module in backbone.modules()
             if isinstance(getattr(module, "is_causal", None), bool)}
    bidirectional = sorted({kind for kind, causal in flags if not causal})
    known = model_type in KNOWN_CAUSAL_DECODERS or bool(getattr(config, "is_decoder", False))
    # A known decoder may also hold a bidirectional tower (vision); its token attention is causal.
    if bidirectional and not (known and any(causal for _, causal in flags)):
        raise ValueError(
            f"reward_model: expected a decoder with causal attention, got {name} (model_type "
            f"{model_type!r}) whose attention {bidirectional} has is_causal=False: an encoder's hidden state "
            f"at position t sees later tokens, and {_WHY_PREFIX}.")
    if flags or known:
        return
    raise ValueError(
        f"reward_model: expected a decoder with causal attention, got {name} (model_type {model_type!r}): "
        f"no attention module reports is_causal and the model type is not a known decoder, so causality "
        f"cannot be checked, and {_WHY_PREFIX}. Known decoders: {sorted(KNOWN_CAUSAL_DECODERS)}.")


def _find_head(model: nn.Module) -> tuple[str, nn.Module]:
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            break
    else:
        raise ValueError(
            f"reward_model: expected a sequence-classification model with a score head (one of the "
            f"attributes {HEAD_NAMES}), got {type(model).__name__} with none of them")
    if isinstance(head, ScoreHead):
        return attr, head
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"reward_model.{attr}: expected a single-output linear head nn.Linear(hidden_size, 1), got "
            f"{type(head).__name__}: the fused op computes w.h_t + b at every position, which is the model's "
            f"score only when the head is that one linear map, so one-pass prefix scores would be wrong for it")
    if head.out_features != 1:
        raise ValueError(
            f"reward_model.{attr}: expected a single-output linear head nn.Linear(hidden_size, 1), got "
            f"{head!r} (num_labels={head.out_features}): a head with {head.out_features} outputs gives no single "
            f"scalar score per prefix, so one-pass prefix scores would be wrong for it; use num_labels=1")
    return attr, head


def _find_parts(model) -> tuple[nn.Module, nn.Module]:
    """The backbone (``getattr(model, model.base_model_prefix)``) and the linear score head."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"reward_model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(backbone, nn.Module):
        raise ValueError(
            f"reward_model: expected the backbone at reward_model.{prefix} (its base_model_prefix), got "
            f"{type(model).__name__} with no such submodule")
    if backbone not in _CAUSAL_BACKBONES:
        _check_causal(model, backbone)
        _CAUSAL_BACKBONES[backbone] = True
    _, head = _find_head(model)
    return backbone, head


@functools.cache
def _accepts(backbone_class: type, name: str) -> bool:
    parameters = inspect.signature(backbone_class.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _last_hidden_state(backbone: nn.Module, input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One backbone forward keeping only the last hidden state (``[B, T, H]``).

    Padding gets token id 0 and is masked out; positions count real tokens only, so a
    left-padded row sees the positions it would see unpadded. No cache, no per-layer
    hidden states, no attention maps: nothing but the last layer's output is kept.
    """
    mask = real.long()
    kwargs = {"position_ids": mask.cumsum(1) - mask, "use_cache": False, "output_hidden_states": False,
              "output_attentions": False}
    kwargs = {key: value for key, value in kwargs.items() if _accepts(type(backbone), key)}
    outputs = backbone(input_ids=input_ids.masked_fill(~real, 0), attention_mask=mask, **kwargs)
    return outputs[0]  # last_hidden_state, for a ModelOutput and for a tuple alike


def _linear_output_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``head(hidden)`` would have had: the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ---------------------------------------------------------------------------------------
# Public API.


def score_prefixes(
    reward_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_start: int | torch.Tensor,
    *,
    baseline: str = "prompt",
    backend: str = "auto",
) -> RedistributeOutput:
    """Every prefix score of a padded batch in one forward, redistributed by the fused op.

    ``reward_model`` is a decoder-only sequence-classification model with a single-output
    linear head (``num_labels=1``): its backbone is ``getattr(model, model.base_model_prefix)``
    and its head ``model.score`` (or ``model.classifier``). The backbone runs once, with
    padding masked to token id 0, ``position_ids`` counted over real tokens only (so left,
    right and both-sided padding all give each row the positions it has unpadded),
    ``use_cache=False`` and only the last hidden state kept; then `redistribute` applies the
    head at every position.

    ``input_ids`` is ``[B, T]``; ``attention_mask`` ``[B, T]`` (nonzero = real token, None =
    all real); ``response_start`` the index of each row's first response token (an int or a
    ``[B]`` tensor). ``scores[b, t]`` equals what the model gives the prefix of row b ending
    at t scored on its own; the other outputs are as in docs/spec.md section 2.

    Raises ValueError for a model that is not a causal decoder or whose head is not
    ``nn.Linear(H, 1)``: for those the score at t is not the score of the prefix up to t.
    The model's mode is left alone: call ``model.eval()`` for deterministic scores.
    """
    backbone, head = _find_parts(reward_model)
    check_strided("input_ids", input_ids)
    check_strided("attention_mask", attention_mask)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D integer tensor [B, T], got {_describe(input_ids)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer dtype, got {_describe(input_ids)}")
    if input_ids.device != head.weight.device:
        raise ValueError(f"input_ids: expected a tensor on {head.weight.device} (the reward model's device), "
                         f"got {_describe(input_ids)}")
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected None or a tensor of shape {list(input_ids.shape)} "
                             f"(the shape of input_ids), got {_describe(attention_mask)}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask: expected a tensor on {input_ids.device} (the device of input_ids), "
                             f"got {_describe(attention_mask)}")
        real = attention_mask != 0
    hidden = _last_hidden_state(backbone, input_ids, real)
    return redistribute(hidden, head.weight, head.bias, attention_mask=real, response_start=response_start,
                        baseline=baseline, backend=backend)


def _check_query_responses(query_responses, pad_token_id, context_length) -> None:
    check_strided("query_responses", query_responses)
    if not isinstance(query_responses, torch.Tensor) or query_responses.dim() != 2:
        raise ValueError(f"query_responses: expected a 2-D integer tensor [B, T], got {_describe(query_responses)}")
    if query_responses.is_floating_point() or query_responses.is_complex() or query_responses.dtype == torch.bool:
        raise TypeError(f"query_responses: expected an integer dtype, got {_describe(query_responses)}")
    if not _is_int(pad_token_id):
        raise TypeError(f"pad_token_id: expected an int (the tokenizer's pad_token_id), got {_describe(pad_token_id)}")
    T = query_responses.shape[1]
    if not _is_int(context_length) or not 0 <= context_length <= T:
        raise ValueError(f"context_length: expected an int in [0, {T}] (T of query_responses), "
                         f"got {_describe(context_length)}")


def _sequence_lengths(query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> torch.Tensor:
    """TRL's convention: the index just before the first pad of the response (int64 [B]).

    A response without pad ends at ``T - 1``; an empty one at ``context_length - 1``, the
    last prompt token. Only the response part is searched, so prompt padding is allowed.
    """
    is_pad = query_responses[:, context_length:] == pad_token_id
    # A row without pad reads as if its first pad were just past the end.
    past_end = is_pad.new_ones((is_pad.shape[0], 1))
    first_pad = torch.cat([is_pad, past_end], dim=1).to(torch.int32).argmax(dim=1)  # argmax: first maximum
    return first_pad.to(torch.int64) - 1 + context_length


def _checked_parts(model, query_responses, pad_token_id, context_length) -> tuple[nn.Module, nn.Module]:
    _check_query_responses(query_responses, pad_token_id, context_length)
    backbone, head = _find_parts(model)
    if query_responses.device != head.weight.device:
        raise ValueError(f"query_responses: expected a tensor on {head.weight.device} (the model's device), "
                         f"got {_describe(query_responses)}")
    return backbone, head


def _redistribute_query_responses(model, query_responses, pad_token_id, context_length, baseline, backend):
    """The op's output on a TRL-style batch under the op's own rule (0 at padding).

    The backbone sees exactly TRL's inputs (every pad masked); the op is told a token is
    real when it is not a pad and lies at or before the sequence length, and always at the
    sequence length itself, so ``rewards`` and ``last_index`` are TRL's gather.
    """
    backbone, head = _checked_parts(model, query_responses, pad_token_id, context_length)
    not_pad = query_responses != pad_token_id
    hidden = _last_hidden_state(backbone, query_responses, not_pad)
    sequence_lengths = _sequence_lengths(query_responses, pad_token_id, context_length)
    positions = torch.arange(query_responses.shape[1], device=query_responses.device)
    end = sequence_lengths.unsqueeze(1)
    # TRL gathers at the sequence length even when it is a pad (an empty response after a
    # prompt that ends in pad), so that position is scored too.
    real = (not_pad & (positions <= end)) | (positions == end)
    return redistribute(hidden, head.weight, head.bias, attention_mask=real, response_start=context_length,
                        baseline=baseline, backend=backend)


def get_reward(
    model,
    query_responses: torch.Tensor,
    pad_token_id: int,
    context_length: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for TRL's ``trl.experimental.utils.get_reward`` (and open-instruct's), through the fused op.

    ``query_responses`` is ``[B, T]``: prompts (``context_length`` long) followed by
    responses (right-padded with ``pad_token_id``). As in TRL, every token equal to
    ``pad_token_id`` is masked out of attention (so when pad == EOS, the EOS is too), and a
    row's sequence length is the index just before the first pad of its response (``T - 1``
    when there is none, ``context_length - 1`` for an empty response).

    Returns what TRL's helper returns, ``(reward_logits, final_rewards, sequence_lengths)``:

    * ``reward_logits`` ``[B, T, 1]``: the head applied at every position, padding and
      positions past the sequence length included (TRL's PPO reads the value just before
      the response, a pad when prompts are right-padded), in the dtype the head's own output
      has (the model's dtype, or the autocast dtype).
    * ``final_rewards`` ``[B]``: ``reward_logits`` at the sequence length, indexed as TRL
      indexes it (a sequence length of -1, context length 0 with a pad first, reads position
      ``T - 1``).
    * ``sequence_lengths`` ``[B]`` int64.

    Only `score_prefixes`, `get_token_rewards` and the op itself put 0 at padding. The head's
    sum runs in float32 (TRL's runs in the model's dtype), so values agree to rounding.
    Differentiable in the model's parameters. ``backend`` picks the op's backend.
    """
    backbone, head = _checked_parts(model, query_responses, pad_token_id, context_length)
    hidden = _last_hidden_state(backbone, query_responses, query_responses != pad_token_id)
    # Every position is scored, as TRL's head scores every position.
    everywhere = torch.ones(query_responses.shape, dtype=torch.bool, device=query_responses.device)
    out = redistribute(hidden, head.weight, head.bias, attention_mask=everywhere, response_start=context_length,
                       backend=backend)
    reward_logits = out.scores.to(_linear_output_dtype(hidden, head.weight)).unsqueeze(-1)
    sequence_lengths = _sequence_lengths(query_responses, pad_token_id, context_length)
    rows = torch.arange(reward_logits.shape[0], device=reward_logits.device)
    return reward_logits, reward_logits[rows, sequence_lengths].squeeze(-1), sequence_lengths


def get_token_rewards(
    model,
    query_responses: torch.Tensor,
    pad_token_id: int,
    context_length: int,
    *,
    baseline: str = "prompt",
    backend: str = "auto",
) -> TokenRewards:
    """RED token rewards for a PPO loop, under the conventions of `get_reward`.

    Returns `TokenRewards`: ``token_rewards`` ``[B, T - context_length]`` float32, where
    ``token_rewards[:, i]`` is the reward of generating ``query_responses[:, context_length + i]``
    (aligned like TRL's ``responses`` and log-probs), and ``rewards`` ``[B]`` float32, the
    sequence reward (``get_reward``'s ``final_rewards``, unrounded).

    Token i of a response is rewarded ``s_i - s_{i-1}`` when it is a real token at or before
    the sequence length (so with pad == EOS the EOS is not rewarded, as TRL does not score
    it); later positions get 0. The first response token is measured against the score of
    the last prompt token (``baseline="prompt"``, RED's Eq. 6) or against 0
    (``baseline="zero"``). So each row sums to ``rewards - prompt score`` (``rewards`` under
    ``baseline="zero"``), for left-padded prompts whose last token is real; an empty response
    has no token to reward and sums to 0.
    """
    out = _redistribute_query_responses(model, query_responses, pad_token_id, context_length, baseline, backend)
    return TokenRewards(out.token_rewards[:, context_length:], out.rewards)
