"""RED across tokenizers: a reward model's prefix scores over its own text, one reward per policy token.

A served or remote reward model reads text that its own tokenizer and chat template made from the policy's
response, so its tokens are not the policy's. Both tokenizations cover the same characters of the response;
`redistribute_across_tokenizers` moves the reward model's prefix-score differences onto the policy's tokens
through character spans (docs/spec.md section 6). The helpers below give the spans: `reward_model_token_spans`
from a fast tokenizer's offsets, `policy_token_spans` by decoding the policy's own token ids.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import itertools
import operator
import reprlib
from typing import NamedTuple, Sequence

import torch

__all__ = ["CrossTokenizerRewards", "policy_token_spans", "redistribute_across_tokenizers",
           "reward_model_token_spans"]


class CrossTokenizerRewards(NamedTuple):
    """What `redistribute_across_tokenizers` returns for one sample."""

    token_rewards: torch.Tensor  # [n_policy] float32, one reward per policy response token
    score: float                 # the reward model's score of the whole text (its last token's prefix score)
    baseline_score: float        # what the first policy token is measured against (0 for baseline="zero")


def _count_at_or_below(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(sorted_values, queries, right=True) in plain Python: torch's runs intra-op parallel
    even at a few hundred elements, which costs milliseconds on a busy machine with several threads."""
    keys = sorted_values.tolist()
    return torch.tensor([bisect.bisect_right(keys, q) for q in queries.tolist()], dtype=torch.int64)


def _name(sample) -> str:
    return "" if sample is None else f"sample {sample}: "


def _response_start(value, sample) -> int:
    """``response_start`` as an int: an int, a numpy integer or a 0-d integer tensor / array (not a bool)."""
    dtype = getattr(value, "dtype", None)
    is_bool = isinstance(value, bool) or dtype == torch.bool or str(dtype) == "bool"
    is_scalar = not isinstance(value, torch.Tensor) or value.dim() == 0
    if not is_bool and is_scalar:
        try:
            return operator.index(value)
        except TypeError:
            pass
    if dtype is None:
        what = f"{type(value).__name__} {reprlib.repr(value)}"
    else:
        what = f"{type(value).__name__} of dtype {dtype}, shape {list(getattr(value, 'shape', ()))}"
    raise TypeError(f"{_name(sample)}response_start: expected an int (a Python or numpy integer, or a 0-d integer "
                    f"tensor), got {what}")


def _spans(x, what: str, sample, limit: int, limit_name: str) -> torch.Tensor:
    try:
        spans = torch.as_tensor(x if len(x) else torch.zeros((0, 2), dtype=torch.int64))
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{_name(sample)}{what}: expected [n, 2] integer (start, end) character spans, "
                        f"got {type(x).__name__} ({error})") from None
    if spans.dim() != 2 or spans.shape[1] != 2 or spans.is_floating_point() or spans.dtype == torch.bool:
        raise ValueError(f"{_name(sample)}{what}: expected [n, 2] integer (start, end) character spans, "
                         f"got shape {list(spans.shape)}, dtype {spans.dtype}")
    spans = spans.to(torch.int64)
    if spans.numel() and (bool((spans[:, 0] < 0).any()) or bool((spans[:, 0] > spans[:, 1]).any())
                          or int(spans[:, 1].max()) > limit):
        bad = int(((spans[:, 0] < 0) | (spans[:, 0] > spans[:, 1]) | (spans[:, 1] > limit)).nonzero()[0])
        raise ValueError(f"{_name(sample)}{what}: expected 0 <= start <= end <= {limit} ({limit_name}), "
                         f"got ({int(spans[bad, 0])}, {int(spans[bad, 1])}) at token {bad}")
    return spans


def redistribute_across_tokenizers(
    rm_scores,
    rm_spans,
    rm_text: str,
    response_text: str,
    policy_spans,
    *,
    response_start: int | None = None,
    baseline: str = "prompt",
    sample=None,
) -> CrossTokenizerRewards:
    """One RED reward per policy response token from the reward model's prefix scores over its own text.

    ``rm_scores`` ``[n_rm]`` (or ``[n_rm, 1]``, vLLM's ``token_classify`` shape): the reward model's score of
    the prefix ending at each of its tokens over ``rm_text``. ``rm_spans`` ``[n_rm, 2]``: each RM token's
    (start, end) characters in ``rm_text`` (a fast tokenizer's ``return_offsets_mapping``; special tokens the
    tokenizer adds have (0, 0)). ``response_text``: the response as the policy's tokens decode;
    ``policy_spans`` ``[n_policy, 2]``: each policy token's characters in ``response_text``
    (`policy_token_spans`). The response sits in ``rm_text`` at ``response_start`` (an int, a numpy integer or
    a 0-d integer tensor; default: its last occurrence); where ``rm_text`` does not hold ``response_text`` there (a template that rewrites content),
    ValueError names ``sample``.

    Rules (docs/spec.md section 6). An RM token *ends* at its span's end, or where the tokens before it end if
    that is later (a zero-width special token ends where its predecessor does). The *boundary* of a
    character position e is the last RM token that ends at or before e, and S(boundary) its prefix score
    (0 when no RM token ends there). Policy token i ending at character e_i of the response gets
    ``S(b(response_start + e_i)) - S(previous boundary)``:

    * the first previous boundary is ``b(response_start)``, the RM token just before the response
      (``baseline="prompt"``), or 0 (``baseline="zero"``);
    * the last policy token's boundary is the last RM token, so text the template adds after the response
      (end-of-turn tokens) credits the last response token and each row sums to ``score - baseline_score``
      (telescoping; in float32 up to rounding of the differences);
    * a policy token that ends inside an RM token gets 0 from it: that RM token's increment lands on the
      policy token in which it ends;
    * an RM token that starts before the response and ends inside it (a merge across the template's
      boundary) credits the policy token in which it ends.

    With one tokenizer and no template (``rm_text`` = prompt + response, the RM's tokens the prompt's then
    the policy's) this is `redistribute`'s ``token_rewards`` over the response, bit for bit, wherever token
    boundaries are character boundaries. A token that ends inside a multi-byte character has no character
    end of its own; `policy_token_spans` ends it where its decoded text stops being a prefix of the whole,
    so the character's credit goes to the token that completes it (sums unchanged).

    Arithmetic is float32 like the op: scores are rounded to float32, differences taken in float32.
    Returns `CrossTokenizerRewards` (token_rewards ``[n_policy]`` float32 on the CPU). An empty response
    (``n_policy == 0``) gives an empty row.
    """
    if baseline not in ("prompt", "zero"):
        raise ValueError(f"{_name(sample)}baseline: expected 'prompt' or 'zero', got {baseline!r}")
    if not isinstance(rm_text, str) or not isinstance(response_text, str):
        raise TypeError(f"{_name(sample)}rm_text, response_text: expected str, "
                        f"got {type(rm_text).__name__}, {type(response_text).__name__}")
    try:
        scores = torch.as_tensor(rm_scores, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{_name(sample)}rm_scores: expected [n_rm] or [n_rm, 1] numbers, "
                        f"got {type(rm_scores).__name__} ({error})") from None
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{_name(sample)}rm_scores: expected [n_rm] or [n_rm, 1] with n_rm >= 1 "
                         f"(one label per RM token), got shape {list(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"{_name(sample)}rm_scores: expected finite scores, got {float(scores[bad])} at RM token {bad}")
    rm = _spans(rm_spans, "rm_spans", sample, len(rm_text), "len(rm_text)")
    if rm.shape[0] != scores.numel():
        raise ValueError(f"{_name(sample)}rm_scores and rm_spans: expected one score per RM token, "
                         f"got {scores.numel()} scores and {rm.shape[0]} spans")
    pol = _spans(policy_spans, "policy_spans", sample, len(response_text), "len(response_text)")
    n_pol = pol.shape[0]

    if response_start is None:
        if not response_text and n_pol:
            raise ValueError(f"{_name(sample)}response_start: an empty response_text cannot be located in "
                             f"rm_text; pass response_start")
        response_start = rm_text.rfind(response_text)
        if response_start < 0:
            raise ValueError(f"{_name(sample)}the response text is not in the reward model's rendered text "
                             f"(its chat template changed it): response {response_text[:80]!r}")
    else:
        response_start = _response_start(response_start, sample)
        if (not 0 <= response_start <= len(rm_text)
                or rm_text[response_start: response_start + len(response_text)] != response_text):
            raise ValueError(f"{_name(sample)}the response text is not in the reward model's rendered text at "
                             f"response_start={response_start!r} (its chat template changed it): "
                             f"response {response_text[:80]!r}")

    prefix = torch.zeros(scores.numel() + 1, dtype=torch.float32)  # prefix[k] = S(RM token k - 1), prefix[0] = 0
    prefix[1:] = scores.to(torch.float32)
    rm_ends = torch.cummax(rm[:, 1], dim=0).values
    base_at = bisect.bisect_right(rm_ends.tolist(), response_start)
    baseline_score = prefix[base_at] if baseline == "prompt" else prefix.new_zeros(())
    score = float(prefix[-1])
    if n_pol == 0:
        return CrossTokenizerRewards(torch.zeros(0, dtype=torch.float32), score, float(baseline_score))
    policy_ends = torch.cummax(pol[:, 1], dim=0).values + response_start
    at = _count_at_or_below(rm_ends, policy_ends)
    at[-1] = scores.numel()
    reached = prefix[at]
    previous = torch.cat([baseline_score.reshape(1), reached[:-1]])
    return CrossTokenizerRewards(reached - previous, score, float(baseline_score))


def reward_model_token_spans(tokenizer, text: str, *, add_special_tokens: bool = True, sample=None):
    """The reward model's token ids of ``text`` and their character spans, as its server tokenizes them.

    vLLM's ``/pooling`` and ``/classify`` tokenize a text input with ``add_special_tokens=True`` (a BOS where
    the tokenizer adds one). Needs a fast tokenizer (``tokenizer.is_fast``): only those report offsets; a
    slow (pure-Python) tokenizer raises TypeError rather than guessing spans from decoded text, which such
    tokenizers do not reproduce exactly. Returns ``(ids: list[int], spans: [n, 2] int64 tensor)``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{_name(sample)}tokenizer: expected a fast (Rust `tokenizers`) tokenizer, which reports "
                        f"character offsets, got {type(tokenizer).__name__} (load it with use_fast=True or "
                        f"convert it with tokenizers)")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    spans = torch.tensor(encoded["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
    return list(encoded["input_ids"]), spans


# id(backend tokenizer) -> (that tokenizer, {token id: bytes}); the reference keeps the id from being reused
# (`tokenizers.Tokenizer` takes no weak references in some releases)
_TOKEN_BYTES: dict = {}


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict:
    """The byte-level BPE alphabet (GPT-2's): the printable Latin-1 bytes stand for themselves, every other byte
    for the next unused code point from 256 on. Maps a vocabulary character to its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_level_ends(tokenizer, ids: list[int], decoded: str):
    """Each token's end as `policy_token_spans` defines it, in one pass over the bytes, for a fast tokenizer
    whose decoder is byte-level; None where that shortcut does not reproduce ``decoded`` exactly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    owner, cache = _TOKEN_BYTES.setdefault(id(backend), (backend, {}))
    if owner is not backend:
        return None
    missing = sorted(set(ids) - cache.keys())
    if missing:
        table = _byte_of_char()
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        for i in missing:
            token = backend.id_to_token(i)
            if i in added:
                cache[i] = added[i].encode()
            elif token is None:
                return None
            else:
                cache[i] = b"".join(bytes([table[c]]) if c in table else c.encode() for c in token)
    # An incremental UTF-8 decoder emits, token by token, the characters the bytes so far settle: with no
    # bytes pending, that is exactly the prefix's own decoding. With bytes pending, the prefix's decoding ends
    # in replacement characters, which may match the whole text (undecodable bytes there too): decode those.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, total, parts, pending = [], 0, [], []
    for k, i in enumerate(ids):
        part = utf8.decode(cache[i])
        parts.append(part)
        total += len(part)
        ends.append(total)
        if utf8.getstate()[0]:
            pending.append(k)
    parts.append(utf8.decode(b"", final=True))
    if "".join(parts) != decoded:
        return None
    if pending:
        joined = b"".join(cache[i] for i in ids)
        offsets = list(itertools.accumulate(len(cache[i]) for i in ids))
        for k in pending:
            ends[k] = _agreeing(joined[: offsets[k]].decode("utf-8", errors="replace"), decoded)
    return torch.tensor(ends, dtype=torch.int64)


def _agreeing(prefix: str, text: str) -> int:
    """How many leading characters ``prefix`` shares with ``text``."""
    if text.startswith(prefix):
        return len(prefix)
    reach, limit = 0, min(len(prefix), len(text))
    while reach < limit and prefix[reach] == text[reach]:
        reach += 1
    return reach


def _removed(text: str, ends: torch.Tensor, remove: list[str]):
    """``text`` with each string of ``remove`` deleted (as str.replace, one after the other) and character
    positions ``ends`` moved with it; a position inside a deleted occurrence moves to where it started.
    Also returns whether any position fell strictly inside an occurrence: there a prefix ``text[:end]`` keeps
    a piece of the string that the whole text loses, so its deletions are not the whole text's."""
    split = False
    for r in remove:
        starts, at = [], text.find(r)
        while at >= 0:
            starts.append(at)
            at = text.find(r, at + len(r))
        if not starts:
            continue
        occ = torch.tensor(starts, dtype=torch.int64)
        before = _count_at_or_below(occ, ends)  # occurrences starting at or before each end
        inside = (before > 0) & (ends < occ[(before - 1).clamp(min=0)] + len(r))
        split = split or bool((inside & (ends > occ[(before - 1).clamp(min=0)])).any())
        shift = before * len(r)
        ends = torch.where(inside, occ[(before - 1).clamp(min=0)] - (before - 1) * len(r), ends - shift)
        text = text.replace(r, "")
    return text, ends, split


def policy_token_spans(tokenizer, token_ids: Sequence[int], *, remove: Sequence[str] = ()):
    """The text the policy's tokens decode to and each token's character span in it.

    ``text = tokenizer.decode(token_ids)`` with every string in ``remove`` deleted afterwards (verl deletes the
    EOS token's text: ``remove=[tokenizer.eos_token]``). Token i ends where the decoding of its prefix
    ``token_ids[:i + 1]`` (same deletions) stops agreeing with ``text`` (the whole prefix's length when it
    is a prefix of ``text``); ends never decrease, and token i starts where token i - 1 ends. The spans
    therefore describe the tokens the policy produced, not a re-tokenization of the text, and a token that
    stops inside a multi-byte character ends before that character. Works with any tokenizer that has
    ``decode`` and ``batch_decode``. For a fast tokenizer with a byte-level decoder (GPT-2, Llama 3, Qwen) the
    ends come from one pass over the tokens' bytes, checked to reproduce ``tokenizer.decode`` exactly, unless a
    token ends inside a string of ``remove`` (e.g. "</s>" written as several tokens); any other case decodes
    every prefix (O(n^2) characters: tens of ms at 512 tokens). Returns ``(text, spans: [n, 2] int64 tensor)``.
    """
    ids = [int(t) for t in token_ids]
    remove = [r for r in remove if r]
    decoded = tokenizer.decode(ids)
    spans = torch.zeros((len(ids), 2), dtype=torch.int64)
    if not ids:
        return _removed(decoded, spans[:, 1], remove)[0], spans
    raw_ends = _byte_level_ends(tokenizer, ids, decoded)
    text, ends_t, split = _removed(decoded, spans[:, 1] if raw_ends is None else raw_ends, remove)
    if raw_ends is None or split:  # no shortcut, or a token ends inside a deleted string: decode the prefixes
        ends_t = torch.tensor(_decoded_prefix_ends(tokenizer, ids, text, remove), dtype=torch.int64)
    ends_t = torch.cummax(ends_t, dim=0).values
    ends_t[-1] = len(text)
    spans[:, 1] = ends_t
    spans[1:, 0] = ends_t[:-1]
    return text, spans


def _decoded_prefix_ends(tokenizer, ids: list[int], text: str, remove: list[str]) -> list[int]:
    """The definition itself: decode every prefix (O(n^2) characters), keep what agrees with ``text``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    prefixes = [ids[: i + 1] for i in range(len(ids))]
    if backend is not None and backend.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids):
        decoded = backend.decode_batch(prefixes, skip_special_tokens=False)  # the same text, without Python per call
    else:
        decoded = tokenizer.batch_decode(prefixes)
    ends = []
    for d in decoded:
        for r in remove:
            d = d.replace(r, "")
        ends.append(_agreeing(d, text))  # less than len(d): an unfinished character, spaces cleaned up
    return ends
