"""`red_kernels.hf` against plain transformers, on small randomly initialised models.

* One-pass prefix scores equal scoring every prefix on its own (one forward per prefix,
  no padding), with left, right and both-sided padding.
* `get_reward` equals TRL's computation written with plain transformers (the score head on
  the last hidden state, gathered at TRL's sequence length), and the model's own pooled
  logits where the two conventions agree; with pad != EOS, pad == EOS, and untruncated
  responses that continue after a pad.
* `get_token_rewards` telescopes to the sequence reward minus the prompt's score.
* bfloat16 models agree with float32 within what bfloat16 itself costs transformers.
* Models for which one-pass prefix scores would be wrong are refused with a ValueError.

No downloads: every model is built from a config. Runs for every backend usable on CPU.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import cpu_backends  # noqa: E402
from trl.experimental.utils import get_reward as trl_get_reward  # noqa: E402
from red_kernels.hf import get_reward, get_token_rewards, score_prefixes  # noqa: E402

PAD, EOS, VOCAB, HIDDEN = 0, 1, 128, 64
BACKENDS = cpu_backends()
# A larger init than the default 0.02 makes attention sharp, so a wrong position or a
# leaked padding token moves the scores far beyond the float32 tolerance.
INIT = 0.2


def _config(arch: str, pad_token_id: int):
    common = {"vocab_size": VOCAB, "pad_token_id": pad_token_id, "bos_token_id": EOS, "eos_token_id": EOS,
              "num_labels": 1, "initializer_range": INIT}
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128,
                                        max_position_embeddings=64, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128,
                                        max_position_embeddings=64, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=64, **common)
    raise KeyError(arch)


ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


@functools.cache
def reward_model(arch: str, pad_token_id: int = PAD, head_bias: bool = False):
    """A tiny reward model in eval mode; ``head_bias`` swaps in a head with a bias."""
    torch.manual_seed(sum(map(ord, arch)) + 7 * pad_token_id + head_bias)
    model = transformers.AutoModelForSequenceClassification.from_config(_config(arch, pad_token_id))
    if head_bias:
        model.score = torch.nn.Linear(HIDDEN, 1, bias=True)
        torch.nn.init.normal_(model.score.weight, std=INIT)
    return model.eval()


# ---------------------------------------------------------------------------------------
# (1) one-pass prefix scores versus one forward per prefix

# Per row: (left pads, prompt length, response length, right pads), all rows T = 12.
LAYOUTS = {
    "left": [(4, 3, 5, 0), (7, 2, 3, 0), (6, 5, 1, 0)],
    "right": [(0, 3, 5, 4), (0, 2, 3, 7), (0, 5, 1, 6)],
    "both": [(1, 3, 5, 3), (4, 2, 3, 3), (0, 5, 1, 6)],
}


def padded_batch(layout: str, seed: int):
    rows = LAYOUTS[layout]
    T = sum(rows[0])
    generator = torch.Generator().manual_seed(seed)
    # Real tokens avoid the pad id, so the model's own pooling finds the last token.
    input_ids = torch.randint(2, VOCAB, (len(rows), T), generator=generator)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    starts = []
    for b, (left, prompt, response, right) in enumerate(rows):
        assert left + prompt + response + right == T
        mask[b, left:left + prompt + response] = 1
        input_ids[b, mask[b] == 0] = PAD
        starts.append(left + prompt)
    return input_ids, mask, torch.tensor(starts)


def naive_prefix_scores(model, input_ids, mask):
    """The plain way: each prefix of each row scored by its own unpadded forward, placed at its padded position."""
    scores = torch.zeros(input_ids.shape, dtype=torch.float64)
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            positions = mask[b].nonzero().flatten()
            tokens = input_ids[b, positions]
            for t in range(1, len(tokens) + 1):
                scores[b, positions[t - 1]] = model(input_ids=tokens[None, :t]).logits[0, 0].double()
    return scores


def expected_token_rewards(scores, mask, starts, baseline):
    B, T = scores.shape
    expected = torch.zeros_like(scores)
    for b in range(B):
        for t in range(int(starts[b]), T):
            if mask[b, t]:
                prev_counts = t >= 1 and mask[b, t - 1] and (t - 1 >= starts[b] or baseline == "prompt")
                expected[b, t] = scores[b, t] - (scores[b, t - 1] if prev_counts else 0.0)
    return expected


def assert_f32_close(actual, expected, what):
    """float32 tolerance: batched, padded attention sums in another order than the unpadded one."""
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=2e-5 * scale, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS + ["llama-headbias"])
def test_prefix_scores_match_one_forward_per_prefix(arch, layout, backend):
    model = reward_model("llama", head_bias=True) if arch == "llama-headbias" else reward_model(arch)
    input_ids, mask, starts = padded_batch(layout, seed=ARCHS.index(arch.split("-")[0]))
    baseline = "zero" if layout == "both" else "prompt"
    with torch.no_grad():
        out = score_prefixes(model, input_ids, mask, starts, baseline=baseline, backend=backend)
    expected = naive_prefix_scores(model, input_ids, mask)

    assert out.scores.dtype == torch.float32 and out.scores.shape == input_ids.shape
    assert_f32_close(out.scores, expected, "scores")
    last = torch.tensor([int(mask[b].nonzero().max()) for b in range(len(mask))])
    torch.testing.assert_close(out.last_index, last)
    assert_f32_close(out.rewards, expected[torch.arange(len(last)), last], "rewards")
    assert_f32_close(out.token_rewards, expected_token_rewards(expected, mask, starts, baseline), "token_rewards")


def test_backbone_runs_once_keeping_only_the_last_hidden_state():
    model = reward_model("gpt2")
    backbone = getattr(model, model.base_model_prefix)
    calls = []
    handle = backbone.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs),
                                                with_kwargs=True)
    try:
        input_ids, mask, starts = padded_batch("left", seed=0)
        with torch.no_grad():
            score_prefixes(model, input_ids, mask, starts)
    finally:
        handle.remove()
    assert len(calls) == 1
    kwargs = calls[0]
    assert kwargs["output_hidden_states"] is False and kwargs["use_cache"] is False
    torch.testing.assert_close(kwargs["position_ids"][0], torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]))
    assert (kwargs["input_ids"][mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------
# (2) get_reward versus TRL's own helper, trl.experimental.utils.get_reward


CONTEXT = 4
# Prompts (left-padded to CONTEXT) and responses (tokens >= 2; "E" = EOS), before right padding.
ROWS = {
    "pad_ne_eos": [([5, 6], [9, 3, 7, "E"]), ([4, 8, 2, 9], [11, "E"]), ([3, 3, 5], []),
                   ([7, 6, 5, 4], [8, 9, 10, 11, 12, 13])],
    "pad_eq_eos": [([5, 6], [9, 3, 7, "E"]), ([4, 8, 2, 9], [11, "E"]), ([3, 3, 5], ["E"]),
                   ([7, 6, 5, 4], [8, 9, 10, 11, 12, 13])],
    # Not truncated after EOS: tokens follow the first pad; TRL still ends the sequence there.
    "pad_eq_eos_untruncated": [([5, 6], [9, "E", 7, 8, "E"]), ([4, 8, 2, 9], [11, 12, "E", "E", 6])],
}


def query_response_batch(case: str):
    pad = EOS if case.startswith("pad_eq_eos") else PAD
    T = CONTEXT + 6
    batch = torch.full((len(ROWS[case]), T), pad)
    for b, (prompt, response) in enumerate(ROWS[case]):
        batch[b, CONTEXT - len(prompt):CONTEXT] = torch.tensor(prompt)
        tokens = [EOS if token == "E" else token for token in response]
        batch[b, CONTEXT:CONTEXT + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return batch, pad


# Whole rows, T = 10 ("P" = pad, "E" = EOS): (pad is EOS, context length, rows). Each case puts
# TRL's helper where it reads padding: TRL's PPO keeps full_value[:, context_length - 1 : -1],
# the position before the response, which is a pad for right-padded prompts and for prompts
# ending in EOS when pad == EOS.
TRL_CASES = {
    "left_padded_prompts": (False, 4, [["P", "P", 5, 6, 9, 3, 7, "E", "P", "P"],
                                       [4, 8, 2, 9, 11, "E", "P", "P", "P", "P"],
                                       ["P", 7, 6, 5, 8, 9, 10, 11, 12, 13]]),
    "right_padded_prompts": (False, 4, [[5, 6, "P", "P", 9, 3, 7, "E", "P", "P"],
                                        [4, 8, 2, "P", 11, "E", "P", "P", "P", "P"],
                                        [7, 6, 5, 4, 8, 9, 10, 11, 12, 13]]),
    "pad_eq_eos_prompt_ends_in_eos": (True, 4, [[5, 6, 7, "E", 9, 3, 7, "E", "E", "E"],
                                                ["E", 8, 2, "E", 11, 12, "E", "E", "E", "E"],
                                                [7, 6, 5, 4, 8, "E", "E", "E", "E", "E"]]),
    "all_padding_response": (False, 4, [["P", 3, 3, 5, "P", "P", "P", "P", "P", "P"],
                                        [3, 5, "P", "P", "P", "P", "P", "P", "P", "P"],
                                        [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]),
    # context_length 0 and a pad first: the sequence length is -1, which TRL's index reads as T - 1.
    "context_0_first_token_pad": (False, 0, [["P", 5, 6, 7, 8, "P", "P", "P", "P", "P"],
                                             [5, 6, 7, "P", "P", "P", "P", "P", "P", "P"],
                                             ["P", "P", "P", "P", "P", "P", "P", "P", "P", "P"]]),
    "tokens_after_first_pad": (True, 3, [[5, 6, 7, 9, "E", 7, 8, "E", 4, "E"],
                                         [4, 8, 2, 11, 12, "E", "E", 6, 7, 8]]),
}


def trl_case(case: str):
    pad_is_eos, context, rows = TRL_CASES[case]
    pad = EOS if pad_is_eos else PAD
    batch = torch.tensor([[pad if t == "P" else EOS if t == "E" else t for t in row] for row in rows])
    return batch, pad, context


def head_error_bound(model, query_responses, pad, dtype):
    """What the head's own rounding allows at each position: float32 accumulation (64 ulp of
    sum_h |h w|, as in tests/cases.py) plus, for a bfloat16 model, one bfloat16 ulp, since TRL
    rounds its float32 sum to bfloat16 as we do, and the two sums may straddle a rounding step."""
    real = query_responses != pad
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=query_responses.masked_fill(~real, 0), attention_mask=real,
                      position_ids=real.cumsum(1) - real.long(), use_cache=False).last_hidden_state
    weight = model.score.weight.reshape(-1)
    scale = hidden.double().abs() @ weight.double().abs()
    exact = hidden.double() @ weight.double()
    bound = 64 * torch.finfo(torch.float32).eps * scale
    if dtype == torch.bfloat16:
        bound = bound + 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    return bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(TRL_CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_get_reward_returns_what_trl_returns_at_every_position(arch, case, dtype, backend):
    query_responses, pad, context = trl_case(case)
    model = reward_model(arch, pad_token_id=pad)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        reward_logits, final_rewards, sequence_lengths = get_reward(model, query_responses, pad, context,
                                                                    backend=backend)
        ref_logits, ref_final, ref_lengths = trl_get_reward(model, query_responses, pad, context)
        bound = head_error_bound(model, query_responses, pad, dtype)

    assert reward_logits.shape == ref_logits.shape and reward_logits.dtype == ref_logits.dtype == dtype
    assert final_rewards.shape == ref_final.shape and final_rewards.dtype == ref_final.dtype
    assert sequence_lengths.dtype == ref_lengths.dtype == torch.int64
    torch.testing.assert_close(sequence_lengths, ref_lengths, rtol=0, atol=0)
    # Every position, padding and past the sequence end included: TRL has the head there, so do we.
    error = (reward_logits[..., 0].double() - ref_logits[..., 0].double()).abs()
    bad = ~(error <= bound)  # NaN never passes
    assert not bad.any(), (f"reward_logits differ from TRL's at {bad.nonzero().tolist()}: "
                           f"{reward_logits[..., 0][bad].tolist()} vs {ref_logits[..., 0][bad].tolist()}")
    rows = torch.arange(len(ref_lengths))
    # final_rewards is reward_logits at TRL's index (sequence length -1 reads position T - 1).
    torch.testing.assert_close(final_rewards, reward_logits[rows, ref_lengths, 0], rtol=0, atol=0)
    assert ((final_rewards.double() - ref_final.double()).abs() <= bound[rows, ref_lengths]).all()


def test_trl_cases_read_padding_where_the_old_rule_put_zero():
    """The cases above are live: each has positions the op's own rule zeroes (padding, or past the
    sequence end) at which TRL's helper has a nonzero head value (at left padding Llama's hidden
    state is 0, so there both are 0), and the context-0 case has a sequence length of -1."""
    for case in TRL_CASES:
        query_responses, pad, context = trl_case(case)
        with torch.no_grad():
            ref_logits, _, ref_lengths = trl_get_reward(reward_model("llama", pad_token_id=pad), query_responses,
                                                        pad, context)
        positions = torch.arange(query_responses.shape[1])
        zeroed = (query_responses == pad) | (positions > ref_lengths[:, None])
        assert (ref_logits[..., 0][zeroed] != 0).any(), case
        if case in ("right_padded_prompts", "pad_eq_eos_prompt_ends_in_eos"):  # what TRL's PPO reads
            before_response = query_responses[:, context - 1] == pad
            assert before_response.any() and (ref_logits[before_response, context - 1, 0] != 0).all(), case
    assert (trl_case("context_0_first_token_pad")[0][:, 0] == PAD).any()
    with torch.no_grad():
        lengths = trl_get_reward(reward_model("llama"), *trl_case("context_0_first_token_pad"))[2]
    assert (lengths == -1).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["pad_ne_eos", "pad_eq_eos"])
@pytest.mark.parametrize("arch", ARCHS)
def test_get_reward_final_rewards_match_the_models_own_pooling(arch, case, backend):
    """Where TRL's sequence end is the last non-pad token (responses truncated after EOS),
    final_rewards is also the model's own pooled logit, computed without TRL."""
    query_responses, pad = query_response_batch(case)
    model = reward_model(arch, pad_token_id=pad)
    mask = (query_responses != pad).long()
    with torch.no_grad():
        _, final_rewards, _ = get_reward(model, query_responses, pad, CONTEXT, backend=backend)
        pooled = model(input_ids=query_responses, attention_mask=mask, position_ids=mask.cumsum(1) - mask).logits
    assert_f32_close(final_rewards, pooled[:, 0], "final_rewards versus the model's own pooled logits")


def test_get_reward_gives_gradients_like_trl():
    query_responses, pad = query_response_batch("pad_ne_eos")
    model = copy.deepcopy(reward_model("llama"))
    get_reward(model, query_responses, pad, CONTEXT)[1].sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    trl_get_reward(model, query_responses, pad, CONTEXT)[1].sum().backward()
    for mine, theirs in zip(ours, (p.grad for p in model.parameters())):
        assert_f32_close(mine, theirs, "gradient")


# ---------------------------------------------------------------------------------------
# (3) token rewards telescope


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
@pytest.mark.parametrize("case", ["pad_ne_eos", "pad_eq_eos"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_rewards_telescope_to_the_sequence_reward(arch, case, baseline, backend):
    query_responses, pad = query_response_batch(case)
    model = reward_model(arch, pad_token_id=pad)
    with torch.no_grad():
        token_rewards, rewards = get_token_rewards(model, query_responses, pad, CONTEXT, baseline=baseline,
                                                   backend=backend)
        ref_logits, ref_final, ref_lengths = trl_get_reward(model, query_responses, pad, CONTEXT)

    B, T = query_responses.shape
    assert token_rewards.shape == (B, T - CONTEXT) and token_rewards.dtype == torch.float32
    assert rewards.shape == (B,) and rewards.dtype == torch.float32
    assert_f32_close(rewards, ref_final, "rewards")
    prompt_score = ref_logits[:, CONTEXT - 1, 0] if baseline == "prompt" else torch.zeros(B)
    # An empty response (sequence length CONTEXT - 1) has no token to reward.
    telescoped = torch.where(ref_lengths >= CONTEXT, ref_final - prompt_score, 0.0)
    assert_f32_close(token_rewards.sum(dim=1), telescoped, "sum of token rewards")
    # Only real response tokens up to the sequence length are rewarded (with pad == EOS, not the EOS).
    past_end = torch.arange(CONTEXT, T) > ref_lengths[:, None]
    assert (token_rewards[past_end] == 0).all()
    if baseline == "prompt":  # the first response token is measured against the prompt's score
        first = ref_lengths >= CONTEXT
        assert_f32_close(token_rewards[first, 0], ref_logits[first, CONTEXT, 0] - ref_logits[first, CONTEXT - 1, 0],
                         "first token reward")


# ---------------------------------------------------------------------------------------
# (4) bfloat16 models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_model_agrees_with_float32(arch, backend):
    """Tolerance: the backbone runs in bfloat16 for us and for transformers alike, and our head
    accumulates in float32 where transformers rounds its output to bfloat16. So our distance
    to the float32 model is bounded by transformers' own bfloat16 distance plus one bfloat16
    rounding of the score; we allow twice that distance plus 2 ulp of the largest score
    (flash-attention bounds its kernels by a multiple of PyTorch's own error the same way)."""
    query_responses, pad = query_response_batch("pad_ne_eos")
    model32 = reward_model(arch)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.no_grad():
        out32 = score_prefixes(model32, query_responses, query_responses != pad, CONTEXT, backend=backend)
        out16 = score_prefixes(model16, query_responses, query_responses != pad, CONTEXT, backend=backend)
        ref32 = trl_get_reward(model32, query_responses, pad, CONTEXT)[0][..., 0].float()
        ref16 = trl_get_reward(model16, query_responses, pad, CONTEXT)[0][..., 0].float()
        logits16, final16, _ = get_reward(model16, query_responses, pad, CONTEXT, backend=backend)

    real = query_responses != pad
    assert out16.scores.dtype == torch.float32 and torch.isfinite(out16.scores).all()
    transformers_error = (ref16 - ref32)[real].abs().max().item()
    bound = 2 * transformers_error + 2 * 2.0 ** -8 * ref32[real].abs().max().item()
    our_error = (out16.scores - out32.scores)[real].abs().max().item()
    assert our_error <= bound, f"bfloat16 error {our_error:.3g} > bound {bound:.3g}"
    assert (out16.scores[~real] == 0).all()
    # get_reward keeps TRL's dtypes: a bfloat16 model gives bfloat16 logits and rewards.
    assert logits16.dtype == final16.dtype == torch.bfloat16
    torch.testing.assert_close(logits16[..., 0][real], out16.scores[real].to(torch.bfloat16), rtol=0, atol=0)


def test_autocast_gives_the_autocast_dtype_like_a_linear_head():
    query_responses, pad = query_response_batch("pad_ne_eos")
    model = reward_model("llama")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, final, _ = get_reward(model, query_responses, pad, CONTEXT)
        ref_logits, ref_final, _ = trl_get_reward(model, query_responses, pad, CONTEXT)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16 and final.dtype == ref_final.dtype


# ---------------------------------------------------------------------------------------
# Refusals and input errors


def _tiny(config_class, **kwargs):
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, pad_token_id=PAD, **kwargs)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


@functools.cache
def refused_models():
    bert = _tiny(transformers.BertConfig, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, num_labels=1)
    bart = _tiny(transformers.BartConfig, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=1)
    config = _config("llama", PAD)
    config.num_labels = 2
    two_labels = transformers.AutoModelForSequenceClassification.from_config(config)
    mlp_head = copy.deepcopy(reward_model("llama"))
    mlp_head.score = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    return {"bert-encoder": (bert, r"is_causal=False.*later tokens.*prefix scores would be wrong"),
            "bart-encoder-decoder": (bart, r"is_encoder_decoder=True.*prefix scores would be wrong"),
            "llama-num_labels_2": (two_labels, r"num_labels=2.*prefix scores would be wrong"),
            "llama-mlp-head": (mlp_head, r"expected a single-output linear head.*got Sequential")}


@pytest.mark.parametrize("name", ["bert-encoder", "bart-encoder-decoder", "llama-num_labels_2", "llama-mlp-head"])
def test_models_without_one_pass_prefix_scores_are_refused(name):
    model, message = refused_models()[name]
    input_ids, mask, starts = padded_batch("left", seed=0)
    with pytest.raises(ValueError, match=message):
        score_prefixes(model, input_ids, mask, starts)
    with pytest.raises(ValueError, match=message):
        get_reward(model, input_ids, PAD, 8)


def test_input_errors_name_the_argument():
    model = reward_model("llama")
    input_ids, mask, starts = padded_batch("left", seed=0)
    with pytest.raises(TypeError, match=r"input_ids: expected an integer dtype, got .*float32"):
        score_prefixes(model, input_ids.float(), mask, starts)
    with pytest.raises(ValueError, match=r"attention_mask: expected None or a tensor of shape \[3, 12\].*\[3, 11\]"):
        score_prefixes(model, input_ids, mask[:, 1:], starts)
    with pytest.raises(ValueError, match=r"response_start: expected an int in \[0, 12\], got 13"):
        score_prefixes(model, input_ids, mask, 13)
    with pytest.raises(TypeError, match=r"pad_token_id: expected an int .*got NoneType None"):
        get_reward(model, input_ids, None, 8)
    with pytest.raises(ValueError, match=r"context_length: expected an int in \[0, 12\].*got int 13"):
        get_reward(model, input_ids, PAD, 13)
