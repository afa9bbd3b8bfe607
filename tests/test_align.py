"""RED across tokenizers (red_kernels.align): hand-made alignments, a literal float64 reading of the rule,
two trained tokenizers, and equality with `redistribute` when the tokenizer is one and there is no template."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from red_kernels import redistribute, redistribute_across_tokenizers
from red_kernels.align import policy_token_spans, reward_model_token_spans

from align_tokenizers import CORPUS, policy_tokenizer, rm_tokenizer


def rule(scores, rm_spans, response_start, policy_spans, baseline):
    """docs/spec.md section 6 read literally, one token at a time, in float64 over float32-rounded scores."""
    s = [float(torch.tensor(x, dtype=torch.float32)) for x in scores]
    ends, run = [], 0
    for _, end in rm_spans:
        run = max(run, end)
        ends.append(run)

    def score_at(position):  # prefix score of the last RM token ending at or before `position`
        last = -1
        for j, end in enumerate(ends):
            if end <= position:
                last = j
        return s[last] if last >= 0 else 0.0

    previous = score_at(response_start) if baseline == "prompt" else 0.0
    out, reach = [], 0
    for i, (_, end) in enumerate(policy_spans):
        reach = max(reach, end)
        current = s[-1] if i == len(policy_spans) - 1 else score_at(response_start + reach)
        out.append(current - previous)
        previous = current
    return out


def check_against_rule(scores, rm_spans, rm_text, response_text, policy_spans, baseline, **kw):
    out = redistribute_across_tokenizers(scores, rm_spans, rm_text, response_text, policy_spans,
                                         baseline=baseline, **kw)
    start = kw.get("response_start", rm_text.rfind(response_text))
    expected = rule(scores, rm_spans, start, policy_spans, baseline)
    assert out.token_rewards.dtype == torch.float32
    # each reward is one float32 difference of two float32 scores, so the float64 rule rounds to it exactly
    assert torch.equal(out.token_rewards, torch.tensor(expected, dtype=torch.float64).to(torch.float32))
    return out


def assert_row_sum(out):
    total = float(out.token_rewards.double().sum())
    bound = 4 * torch.finfo(torch.float32).eps * (len(out.token_rewards) + 1) * max(1.0, abs(out.score),
                                                                                   abs(out.baseline_score))
    assert abs(total - (out.score - out.baseline_score)) <= bound


def fresh_scores(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 2 + 0.5).tolist()


# --- hand-made alignments ----------------------------------------------------------------------------------
# rm_text "P:abcd<e>": RM tokens "P:" (0,2), "ab" (2,4), "cd" (4,6), "<e>" (6,9); the response "abcd" at 2.
TEXT, RESPONSE = "P:abcd<e>", "abcd"
RM_SPANS = [(0, 2), (2, 4), (4, 6), (6, 9)]
S = [0.25, -1.5, 2.0, 3.75]


@pytest.mark.parametrize("baseline", ["prompt", "zero"])
def test_one_policy_token_spanning_two_rm_tokens_gets_both_increments_and_the_template_tail(baseline):
    out = check_against_rule(S, RM_SPANS, TEXT, RESPONSE, [(0, 4)], baseline)
    base = 0.25 if baseline == "prompt" else 0.0
    assert out.token_rewards.tolist() == [3.75 - base]
    assert (out.score, out.baseline_score) == (3.75, base)


def test_rm_token_spanning_two_policy_tokens_credits_the_one_it_ends_in():
    # RM tokens "P:" and "abcd" (one token over the whole response); policy "ab", "cd" then the template's "<e>"
    out = check_against_rule([0.5, 2.0, 1.25], [(0, 2), (2, 6), (6, 9)], TEXT, RESPONSE, [(0, 2), (2, 4)],
                             "prompt")
    assert out.token_rewards.tolist() == [0.0, 1.25 - 0.5]  # "ab" ends inside "abcd": 0


def test_policy_tokens_one_per_rm_token_get_the_plain_differences():
    out = check_against_rule(S, RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)], "prompt")
    assert out.token_rewards.tolist() == [-1.5 - 0.25, 3.75 - (-1.5)]  # the last also takes "<e>"


def test_policy_token_ending_inside_an_rm_token_gets_zero_and_the_increment_lands_where_it_ends():
    # policy "a", "bc", "d": "a" ends inside "ab", "bc" ends inside "cd" (but completes "ab"), "d" completes "cd"
    out = check_against_rule(S, RM_SPANS, TEXT, RESPONSE, [(0, 1), (1, 3), (3, 4)], "prompt")
    assert out.token_rewards.tolist() == [0.0, -1.5 - 0.25, 3.75 - (-1.5)]


def test_rm_token_across_the_response_start_credits_the_policy_token_it_ends_in():
    # RM tokens "P" (0,1), ":ab" (1,4) straddles the start at 2, "cd<e>" (4,9)
    out = check_against_rule([1.0, 4.0, -2.0], [(0, 1), (1, 4), (4, 9)], TEXT, RESPONSE, [(0, 2), (2, 4)],
                             "prompt")
    assert out.baseline_score == 1.0
    assert out.token_rewards.tolist() == [3.0, -6.0]


def test_zero_width_special_tokens_end_where_the_previous_token_ends():
    # a BOS (0,0) in front and a special token with no text (0,0) between prompt and response
    spans = [(0, 0), (0, 2), (0, 0), (2, 4), (4, 6), (6, 9)]
    scores = [9.0, 0.25, 7.0, -1.5, 2.0, 3.75]
    out = check_against_rule(scores, spans, TEXT, RESPONSE, [(0, 2), (2, 4)], "prompt")
    assert out.baseline_score == 7.0  # the last RM token ending at or before the response start
    assert out.token_rewards.tolist() == [-1.5 - 7.0, 3.75 - (-1.5)]


def test_no_rm_token_before_the_response_measures_against_zero():
    out = check_against_rule([2.0, 5.0], [(0, 2), (2, 4)], "abcd", "abcd", [(0, 3), (3, 4)], "prompt")
    assert out.baseline_score == 0.0
    assert out.token_rewards.tolist() == [2.0, 3.0]


def test_empty_response_gives_an_empty_row():
    out = redistribute_across_tokenizers(S, RM_SPANS, TEXT, "", [], response_start=2)
    assert out.token_rewards.shape == (0,) and out.score == 3.75


def test_response_that_decodes_to_nothing_puts_the_whole_increment_on_its_last_token():
    # e.g. only an EOS whose text verl deletes: zero-width tokens at the response start
    out = check_against_rule(S, RM_SPANS, "P:abcd<e>", "", [(0, 0), (0, 0)], "prompt", response_start=2)
    assert out.token_rewards.tolist() == [0.0, 3.75 - 0.25]


def test_token_classify_shape_n_by_1_is_accepted():
    a = redistribute_across_tokenizers([[x] for x in S], RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)])
    b = redistribute_across_tokenizers(S, RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)])
    assert torch.equal(a.token_rewards, b.token_rewards)


# --- random tokenizations against the rule -----------------------------------------------------------------
def random_spans(rng, start, stop, gaps=False):
    """A random tokenization of characters [start, stop): contiguous spans, some zero-width."""
    cuts = sorted(rng.sample(range(start + 1, stop), k=min(stop - start - 1, rng.randint(0, stop - start))))
    edges = [start, *cuts, stop]
    spans = [(a, b) for a, b in zip(edges[:-1], edges[1:])]
    if gaps:  # zero-width tokens (specials) sprinkled in
        for _ in range(rng.randint(0, 3)):
            at = rng.randint(0, len(spans))
            spans.insert(at, (0, 0))
    return spans


@pytest.mark.parametrize("seed", range(40))
def test_random_tokenizations_follow_the_rule_and_telescope(seed):
    rng = random.Random(seed)
    prompt_len, response_len, tail_len = rng.randint(0, 12), rng.randint(1, 30), rng.randint(0, 8)
    rm_text = "".join(rng.choice("abcdefgh ") for _ in range(prompt_len + response_len + tail_len))
    start = prompt_len
    response = rm_text[start: start + response_len]
    rm_spans = random_spans(rng, 0, len(rm_text), gaps=True)
    policy = random_spans(rng, 0, response_len)
    scores = fresh_scores(len(rm_spans), seed)
    for baseline in ("prompt", "zero"):
        out = check_against_rule(scores, rm_spans, rm_text, response, policy, baseline, response_start=start)
        assert_row_sum(out)


# --- same tokenizer, no template: equal to the op ----------------------------------------------------------
SAME_TOKENIZER_CASES = [
    ("What is two plus two?\n", "Two plus two is four."),
    ("Tokens, spans and rewards:\n", " every prefix has a score!"),   # a leading space
    ("A café serves\n", "A café, é é."),                               # two-byte characters, whole tokens
    ("Please answer briefly:\n", "Because of Rayleigh scattering"),      # cut before any EOS
]


@pytest.mark.parametrize("baseline", ["prompt", "zero"])
@pytest.mark.parametrize("case", range(len(SAME_TOKENIZER_CASES)))
def test_one_tokenizer_without_template_equals_redistribute_token_rewards(case, baseline):
    prompt, response = SAME_TOKENIZER_CASES[case]
    tok = policy_tokenizer()
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    rm_ids, rm_spans = reward_model_token_spans(tok, prompt + response, add_special_tokens=False)
    assert rm_ids == prompt_ids + response_ids  # the RM reads exactly the policy's tokens
    assert not any("\ufffd" in tok.decode([i]) for i in response_ids)  # token ends are character ends
    text, policy_spans = policy_token_spans(tok, response_ids)
    assert text == response
    g = torch.Generator().manual_seed(100 + case)
    H = 7
    hidden = torch.randn(1, len(rm_ids), H, generator=g)
    weight, bias = torch.randn(H, generator=g), 0.3
    op = redistribute(hidden, weight, bias, attention_mask=torch.ones(1, len(rm_ids), dtype=torch.bool),
                      response_start=len(prompt_ids), baseline=baseline)
    out = redistribute_across_tokenizers(op.scores[0], rm_spans, prompt + response, response, policy_spans,
                                         response_start=len(prompt), baseline=baseline)
    assert torch.equal(out.token_rewards, op.token_rewards[0, len(prompt_ids):])
    assert out.score == float(op.rewards[0])


def test_character_split_across_tokens_credits_the_token_that_completes_it():
    tok = policy_tokenizer()
    response = "emoji 🙂🚀 ok"
    ids = tok(response, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the tokenizer must split an emoji for this test"
    text, spans = policy_token_spans(tok, ids)
    assert text == response
    for i, (a, b) in enumerate(spans.tolist()):
        # each token's span ends at a character boundary that its prefix has fully decoded
        assert tok.decode(ids[: i + 1]).startswith(text[:b])
        assert a == (spans[i - 1, 1] if i else 0)
    # a token that leaves a character incomplete has an empty span only when it adds no whole character
    incomplete = [i for i in range(len(ids)) if "\ufffd" in tok.decode(ids[: i + 1])]
    assert incomplete and all(spans[i, 1] < len(text) for i in incomplete)
    rm_ids, rm_spans = reward_model_token_spans(tok, "Q\n" + response, add_special_tokens=False)
    out = check_against_rule(fresh_scores(len(rm_ids), 7), rm_spans, "Q\n" + response, response, spans.tolist(),
                             "prompt", response_start=2)
    assert_row_sum(out)


# --- two different tokenizers, a chat template ----------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_two_tokenizers_with_a_chat_template(index, baseline):
    policy, rm = policy_tokenizer(), rm_tokenizer()
    response = CORPUS[index]
    ids = policy(response, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    text, spans = policy_token_spans(policy, ids, remove=[policy.eos_token])
    assert text == response
    chat = [{"role": "user", "content": CORPUS[index - 1]}, {"role": "assistant", "content": text}]
    rm_text = rm.apply_chat_template(chat, tokenize=False)
    rm_ids, rm_spans = reward_model_token_spans(rm, rm_text)
    assert rm_ids[0] == rm.bos_token_id and rm_spans[0].tolist() == [0, 0]
    out = check_against_rule(fresh_scores(len(rm_ids), index), rm_spans.tolist(), rm_text, text, spans.tolist(),
                             baseline)
    assert_row_sum(out)
    # the EOS (last policy token) takes the template's "<|end|>\n" and whatever the last word left
    tail = rm_text.rfind(text) + len(text)
    assert any(a >= tail for a, _ in rm_spans.tolist())


def test_policy_spans_strip_eos_and_keep_a_leading_space():
    tok = policy_tokenizer()
    ids = tok(" every prefix", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.eos_token_id]
    text, spans = policy_token_spans(tok, ids, remove=[tok.eos_token])
    assert text == " every prefix"
    assert spans[-1].tolist() == [len(text), len(text)] and spans[-2].tolist() == [len(text), len(text)]
    assert spans[0, 0] == 0 and spans[0, 1] >= 1 and text[: spans[0, 1]].startswith(" ")


def test_slow_tokenizer_is_refused_by_name():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match=r"sample 3: tokenizer: expected a fast .*got Slow"):
        reward_model_token_spans(Slow(), "text", sample=3)


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"response_text": "abXd"}, r"sample s-7: the response text is not in the reward model's rendered text"),
    ({"response_start": 3}, r"sample s-7: the response text is not in .* at response_start=3"),
    ({"rm_scores": S[:3]}, r"sample s-7: rm_scores and rm_spans: expected one score per RM token, got 3 scores "
                           r"and 4 spans"),
    ({"rm_scores": [[1.0, 2.0]] * 4}, r"sample s-7: rm_scores: expected \[n_rm\] or \[n_rm, 1\]"),
    ({"rm_scores": [1.0, float("nan"), 2.0, 3.0]}, r"sample s-7: rm_scores: expected finite scores, got nan at RM "
                                                  r"token 1"),
    ({"rm_spans": [(0, 2), (2, 4), (4, 6), (6, 99)]}, r"sample s-7: rm_spans: expected 0 <= start <= end <= 9"),
    ({"policy_spans": [(0, 2), (3, 2)]}, r"sample s-7: policy_spans: expected 0 <= start <= end <= 4 "
                                         r"\(len\(response_text\)\), got \(3, 2\) at token 1"),
    ({"policy_spans": [0, 2]}, r"sample s-7: policy_spans: expected \[n, 2\] integer"),
    ({"baseline": "first"}, r"sample s-7: baseline: expected 'prompt' or 'zero', got 'first'"),
    ({"response_text": "", "policy_spans": [(0, 0)]}, r"sample s-7: response_start: an empty response_text"),
])
def test_bad_input_names_the_sample(kwargs, message):
    args = {"rm_scores": S, "rm_spans": RM_SPANS, "rm_text": TEXT, "response_text": RESPONSE,
            "policy_spans": [(0, 2), (2, 4)], **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        redistribute_across_tokenizers(args.pop("rm_scores"), args.pop("rm_spans"), args.pop("rm_text"),
                                       args.pop("response_text"), args.pop("policy_spans"), sample="s-7", **args)


@pytest.mark.parametrize("start", [np.int64(2), np.int32(2), np.uint8(2), np.array(2), torch.tensor(2),
                                   torch.tensor(2, dtype=torch.int32)],
                         ids=["np.int64", "np.int32", "np.uint8", "np.array-0d", "tensor-0d", "tensor-0d-int32"])
def test_response_start_takes_integer_likes(start):
    want = redistribute_across_tokenizers(S, RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)], response_start=2)
    got = redistribute_across_tokenizers(S, RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)], response_start=start)
    assert torch.equal(got.token_rewards, want.token_rewards) and got.baseline_score == want.baseline_score


@pytest.mark.parametrize("start, given", [
    (True, "bool True"), (2.0, "float 2.0"), (np.float64(2), "float64 of dtype float64"),
    (np.bool_(True), "of dtype bool"), (torch.tensor(2.0), "dtype torch.float32"),
    (torch.tensor(True), "dtype torch.bool"), (torch.tensor([2]), "shape [1]"), ("2", "str '2'"),
], ids=["bool", "float", "np.float64", "np.bool", "tensor-float", "tensor-bool", "tensor-1d", "str"])
def test_response_start_that_is_not_an_integer_is_a_type_error(start, given):
    with pytest.raises(TypeError, match=r"sample 4: response_start: expected an int .*got .*" + re.escape(given)):
        redistribute_across_tokenizers(S, RM_SPANS, TEXT, RESPONSE, [(0, 2), (2, 4)], response_start=start,
                                       sample=4)


# --- the one-pass byte-level spans are the definition's --------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_byte_level_shortcut_equals_decoding_every_prefix(seed):
    from red_kernels.align import _byte_level_ends, _decoded_prefix_ends, _removed

    tok = policy_tokenizer()
    rng = random.Random(seed)
    text = rng.choice(CORPUS) + " " + rng.choice(CORPUS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole = [k for k in range(len(ids) + 1) if "\ufffd" not in tok.decode(ids[:k])]  # between characters
    for at in sorted(rng.sample(whole, 3), reverse=True):  # EOS and PAD (added tokens) in the middle, at the end
        ids.insert(at, rng.choice([tok.eos_token_id, tok.pad_token_id]))
    remove = [tok.eos_token] if seed % 2 else []
    decoded = tok.decode(ids)
    fast = _byte_level_ends(tok, ids, decoded)
    assert fast is not None
    got_text, got, _ = _removed(decoded, fast, remove)
    text_slow = _removed(decoded, torch.zeros(0, dtype=torch.int64), remove)[0]
    assert got_text == text_slow
    assert got.tolist() == _decoded_prefix_ends(tok, ids, text_slow, remove)


def test_undecodable_bytes_follow_the_definition():
    from red_kernels.align import _byte_level_ends, _decoded_prefix_ends

    tok = policy_tokenizer()
    ids = tok("emoji 🙂 ok", add_special_tokens=False)["input_ids"]
    broken = [i for i in ids if "\ufffd" in tok.decode([i])][:1] + ids  # a lone continuation byte first
    for ids_ in (broken, ids[:-3], broken[:-3]):  # a stray byte first; cut inside the emoji; both
        decoded = tok.decode(ids_)
        assert "\ufffd" in decoded
        text, spans = policy_token_spans(tok, ids_)
        assert text == decoded
        assert spans[:, 1].tolist()[:-1] == _decoded_prefix_ends(tok, ids_, text, [])[:-1]
        fast = _byte_level_ends(tok, ids_, decoded)
        assert fast is not None and fast.tolist()[:-1] == _decoded_prefix_ends(tok, ids_, text, [])[:-1]


def test_removed_moves_positions_out_of_deleted_text():
    from red_kernels.align import _removed

    text, ends, split = _removed("ab<e>cd<e>", torch.tensor([0, 2, 3, 5, 6, 7, 10]), ["<e>"])
    assert text == "abcd" and ends.tolist() == [0, 2, 2, 2, 3, 4, 4] and split  # 3: inside the first "<e>"
    assert not _removed("ab<e>cd<e>", torch.tensor([0, 2, 5, 6, 7, 10]), ["<e>"])[2]  # at an edge, or outside


def test_a_removed_string_split_across_tokens_ends_tokens_by_the_definition():
    """"</s>" written as five byte-level tokens and deleted: "x<" (the first two tokens) agrees with "x<b>y" for
    two characters, so the "<" token ends at 2, not where the deleted string started (1)."""
    tok = policy_tokenizer()
    ids = tok("x</s><b>y", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == ["x", "<", "/", "s", ">", "<", "b", ">", "y"]
    text, spans = policy_token_spans(tok, ids, remove=["</s>"])
    assert text == "x<b>y"
    assert spans.tolist() == [[0, 1], [1, 2], [2, 2], [2, 2], [2, 2], [2, 2], [2, 3], [3, 4], [4, 5]]


@pytest.mark.parametrize("seed", range(8))
def test_spans_follow_the_definition_when_removed_strings_split_across_tokens(seed):
    """Random corpus text with "</s>" and "<e>" written inside it (several tokens each), both removed: the spans
    are the definition's (a prefix that stops inside a deleted string may agree with the text after it)."""
    from red_kernels.align import _decoded_prefix_ends

    tok = policy_tokenizer()
    rng = random.Random(2000 + seed)
    words = rng.choice(CORPUS).split(" ")
    pieces = ["</s>", "<e>", "</s><b>", "</s></b>", "<e><b>", "<</s>e>"]  # some followed by text that starts alike
    for _ in range(3):
        words.insert(rng.randrange(len(words) + 1), rng.choice(pieces))
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    remove = ["</s>", "<e>"]
    text, spans = policy_token_spans(tok, ids, remove=remove)
    want = torch.cummax(torch.tensor(_decoded_prefix_ends(tok, ids, text, remove)), dim=0).values
    assert spans[:-1, 1].tolist() == want[:-1].tolist()
    assert spans[-1, 1] == len(text) and spans[1:, 0].tolist() == spans[:-1, 1].tolist()


@pytest.mark.parametrize("seed", range(20))
def test_byte_level_shortcut_on_random_token_soup(seed):
    """Random ids (stray bytes, cut characters, added tokens anywhere): the shortcut is the definition."""
    from red_kernels.align import _byte_level_ends, _decoded_prefix_ends, _removed

    tok = policy_tokenizer()
    rng = random.Random(1000 + seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]
    remove = [tok.eos_token] if seed % 2 else []
    decoded = tok.decode(ids)
    fast = _byte_level_ends(tok, ids, decoded)
    assert fast is not None
    text, got, _ = _removed(decoded, fast, remove)
    assert got.tolist()[:-1] == _decoded_prefix_ends(tok, ids, text, remove)[:-1]
