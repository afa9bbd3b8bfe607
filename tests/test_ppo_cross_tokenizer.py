"""red_ppo with a reward model that has its own tokenizer and chat template (tests/align_tokenizers.py: a
byte-level BPE policy tokenizer, a word-level reward-model tokenizer with a BOS and another template).

Each response is re-rendered as text in the reward model's template, scored in one padded pass and moved onto
the policy's tokens. The expected rows are computed here independently: the rendered text written out by hand
from the template, the reward model run on each text alone, `redistribute_across_tokenizers` on that."""

import json
import math

import pytest
import torch

from align_tokenizers import policy_tokenizer, rm_tokenizer
from conftest import TINY_MODEL, TINY_POLICY, tiny_config
from red_kernels import redistribute_across_tokenizers
from red_kernels.align import policy_token_spans
from red_kernels.hf import score_prefixes
from red_ppo import checkpoint as ckpt
from red_ppo.config import ConfigError, load_config
from red_ppo.data import Prompt
from red_ppo.metrics import read_metrics
from red_ppo.rewards import red_rewards
from red_ppo.rollout import Rollout, left_pad, reward_model_mask

pytest.importorskip("transformers")

PROMPTS = ["What is two plus two?", "Please answer briefly: why is the sky blue?", "Say it in Japanese.",
           "Spell it.", "The quick brown fox", "Reward models read text; policies write tokens.",
           "Numbers like 3.14159 appear.", "Tokens, spans and rewards:"]
# (response text, ends with EOS): multi-byte text, a response cut before EOS, an EOS alone
RESPONSES = [(" Two plus two is four.", True), (" Because of Rayleigh scattering", False),
             ("日本語のテキスト, emoji 🙂.", True), ("", True), (" naïve piñatas, déjà vu", True)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]


def folders(tmp_path, policy=None, chat_lines=False):
    """The policy's and the reward model's tokenizers saved to folders, and a prompt file (with ``chat_lines``,
    every other prompt a conversation under ``messages``)."""
    (policy or policy_tokenizer()).save_pretrained(tmp_path / "policy-tokenizer")
    rm_tokenizer().save_pretrained(tmp_path / "rm-tokenizer")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]}
             if chat_lines and i % 2 else {"prompt": p} for i, p in enumerate(PROMPTS)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(tmp_path / "policy-tokenizer"), str(tmp_path / "rm-tokenizer"), str(prompts)


def cross_config(tmp_path, name="run", rm_tokenizer_folder=True, policy_tokenizer_object=None, chat_lines=False,
                 **sections):
    policy, rm, prompts = folders(tmp_path, policy_tokenizer_object, chat_lines)
    reward_model = {"config": dict(TINY_MODEL), "tokenizer": rm if rm_tokenizer_folder else None}
    return tiny_config(
        {"run": {"output_dir": str(tmp_path / name), "total_steps": 2, "save_every": 0, "eval_every": 0,
                 "eval_prompts": 2, "num_threads": 1, "progress": False},
         "model": {"tokenizer": policy, "policy": {"config": dict(TINY_POLICY)}, "reward_model": reward_model,
                   "critic_init": "policy"},
         "data": {"source": "file", "prompt_file": prompts}, "generation": {"max_new_tokens": 8},
         "rollout": {"batch_size": 4, "forward_batch_size": 4}, "ppo": {"minibatch_size": 2, "epochs": 2}},
        sections)


def make_trainer(data, **kwargs):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=data), **kwargs)


def visible_head(trainer):
    """A score head with a visible scale, so that prefix scores differ token to token."""
    with torch.no_grad():
        trainer.reward_model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))


def hand_rollout(trainer, rows, random_rows=2):
    """``rows`` of (prompt, messages or None, response text, EOS) with canonical response ids, then
    ``random_rows`` of random token ids (a sampled response need not be a canonical tokenization) with an EOS
    in the middle of the first. A response without EOS is cut short by the response mask, not the width.
    -> (rollout, prompts, response ids)."""
    tok = trainer.tokenizer
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for prompt, messages, text, eos in rows:
        prompts.append(Prompt(tok(prompt)["input_ids"], prompt, messages))
        responses.append(tok(text, add_special_tokens=False)["input_ids"] + ([trainer.eos_id] if eos else []))
    for k in range(random_rows):
        prompts.append(Prompt(tok(PROMPTS[k])["input_ids"], PROMPTS[k], None))
        ids = torch.randint(2, len(tok), (7,), generator=g).tolist()
        responses.append(ids[:3] + [trainer.eos_id] if k == 0 else [i for i in ids if i != trainer.eos_id])
    width = max(len(r) for r in responses)
    padded = torch.tensor([r + [trainer.pad_id] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in responses])
    ids, mask = left_pad([p.ids for p in prompts], trainer.pad_id)
    rollout = Rollout(torch.cat([ids, padded], 1), torch.cat([mask, response_mask.long()], 1), ids.shape[1],
                      response_mask)
    return rollout, prompts, responses


def chat_rows():
    rows = [(p, None, text, eos) for p, (text, eos) in zip(PROMPTS, RESPONSES)]
    rendered = policy_tokenizer().apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return [*rows, (rendered, CHAT, " Four.", True)]


def expected_row(trainer, prompt, response_ids, baseline):
    """The reward model on this row's text alone, written out from its template, aligned to the policy's tokens;
    and that text's score and the score before the response, from plain forwards of the reward model."""
    rm_tok = rm_tokenizer()
    text, spans = policy_token_spans(trainer.tokenizer, response_ids, remove=["<eos>"])
    turns = prompt.messages or [{"role": "user", "content": prompt.text}]
    head = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in turns) + "<|assistant|>\n"
    rm_text = head + text + "<|end|>\n"
    encoded = rm_tok(rm_text, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    assert ids[0, 0] == rm_tok.bos_token_id and (ids[0] == rm_tok.bos_token_id).sum() == 1  # one BOS
    model = trainer.reward_model
    with torch.no_grad():
        scores = score_prefixes(model, ids, None, 0, baseline="zero").scores[0]
        before = sum(end <= len(head) for _, end in encoded["offset_mapping"])
        whole, prefix = model(ids).logits[0, 0].item(), model(ids[:, :before]).logits[0, 0].item()
    aligned = redistribute_across_tokenizers(scores, encoded["offset_mapping"], rm_text, text, spans,
                                             response_start=len(head), baseline=baseline)
    return aligned, whole, prefix, f32_tolerance(scores)


def f32_tolerance(scores) -> float:
    """The float32 bound tests/test_hf.py holds score_prefixes to: a padded batch sums attention in another
    order than the row alone (and a plain forward applies the head in another order than the fused op)."""
    return 2e-5 * max(1.0, scores.abs().max().item())


@pytest.mark.parametrize("baseline", ["prompt", "zero"])
def test_rewards_are_the_reward_models_own_prefix_scores_aligned_and_telescope(tmp_path, baseline):
    trainer = make_trainer(cross_config(tmp_path, reward={"baseline": baseline}))
    assert trainer.rm_tokenizer is not None and len(trainer.rm_tokenizer) == 90
    assert trainer.reward_model.config.vocab_size == 90  # built from its own tokenizer
    visible_head(trainer)
    rollout, prompts, responses = hand_rollout(trainer, chat_rows())
    scores, token_rewards = trainer.reward_scores(rollout, prompts)
    P = rollout.prompt_width
    assert token_rewards.shape == rollout.input_ids.shape and token_rewards[:, :P].abs().sum() == 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        aligned, whole, prefix, atol = expected_row(trainer, prompt, response, baseline)
        n = len(response)
        assert n == int(rollout.lengths[i])
        torch.testing.assert_close(token_rewards[i, P:P + n], aligned.token_rewards, rtol=0, atol=atol)
        assert token_rewards[i, P + n:].abs().sum() == 0
        assert scores[i].item() == pytest.approx(whole, abs=atol)
        start = prefix if baseline == "prompt" else 0.0
        assert token_rewards[i].double().sum().item() == pytest.approx(whole - start, abs=atol)
    assert token_rewards[:, P:].abs().sum() > 0


def test_sparse_is_the_reward_models_score_of_the_rendered_text(tmp_path):
    trainer = make_trainer(cross_config(tmp_path, reward={"mode": "sparse", "kl_coef": 0.0}))
    visible_head(trainer)
    rollout, prompts, responses = hand_rollout(trainer, chat_rows())
    exp = trainer.make_experience(rollout, prompts)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        _, whole, _, atol = expected_row(trainer, prompt, response, "prompt")
        n = len(response)
        assert exp["rm_rewards"][i, n - 1].item() == pytest.approx(whole, abs=atol)
        assert exp["rm_rewards"][i, : n - 1].abs().sum() == 0 and exp["rm_rewards"][i, n:].abs().sum() == 0


def test_clip_clamps_every_prefix_score_before_the_alignment(tmp_path):
    clip = 0.5
    trainer = make_trainer(cross_config(tmp_path, reward={"clip": clip}))
    visible_head(trainer)
    rollout, prompts, responses = hand_rollout(trainer, chat_rows())
    scores, token_rewards = trainer.reward_scores(rollout, prompts)
    unclipped = 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        _, whole, prefix, atol = expected_row(trainer, prompt, response, "prompt")
        unclipped += abs(whole) > clip
        assert scores[i].item() == pytest.approx(max(-clip, min(clip, whole)), abs=atol)
        total = max(-clip, min(clip, whole)) - max(-clip, min(clip, prefix))
        assert token_rewards[i].double().sum().item() == pytest.approx(total, abs=atol)
    assert unclipped > 0  # the clip is active


def test_one_tokenizer_and_no_template_give_todays_rewards_exactly(tmp_path):
    """The reward model reads the policy's ids (today's path, unchanged); the cross-tokenizer path forced on with
    that same tokenizer and no template gives the same rewards wherever token boundaries are characters'."""
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=policy_tokenizer().backend_tokenizer, eos_token="<eos>",
                                    pad_token="<eos>", clean_up_tokenization_spaces=False)
    data = cross_config(tmp_path, rm_tokenizer_folder=False, policy_tokenizer_object=plain,
                        model={"critic_init": "reward_model_zero_head"})
    ascii_rows = [(p, None, text, eos) for p, (text, eos) in zip(PROMPTS, RESPONSES) if text.isascii()]
    for mode in ("red", "sparse"):
        data["reward"] = {"mode": mode}
        trainer = make_trainer(data)
        assert trainer.rm_tokenizer is None and trainer.pad_id == trainer.eos_id
        visible_head(trainer)
        rollout, prompts, _ = hand_rollout(trainer, ascii_rows, random_rows=0)
        scores, token_rewards = trainer.reward_scores(rollout, prompts)
        P = rollout.prompt_width
        with torch.no_grad():
            today = score_prefixes(trainer.reward_model, rollout.input_ids, reward_model_mask(rollout, trainer.pad_id),
                                   P)
        assert torch.equal(scores, today.rewards) and torch.equal(token_rewards, today.token_rewards)
        cross_scores, cross_token_rewards = trainer.cross_tokenizer_scores(rollout, prompts, trainer.tokenizer)
        mask = rollout.response_mask
        assert torch.equal(cross_scores, scores)
        assert torch.equal(red_rewards(cross_token_rewards, P, mask), red_rewards(token_rewards, P, mask))


def test_critic_from_the_reward_model_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import red_ppo.models
    import red_ppo.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")
    monkeypatch.setattr(red_ppo.models, "build_model", refuse)
    monkeypatch.setattr(red_ppo.trainer, "build_model", refuse)
    data = cross_config(tmp_path)
    del data["model"]["critic_init"]  # the default, reward_model_zero_head
    with pytest.raises(ConfigError, match=r"model.critic_init: expected 'policy' because the reward model has its "
                                          r"own tokenizer \(from '.*rm-tokenizer', not the policy's from "
                                          r"'.*policy-tokenizer': 90 tokens instead of 320\), got "
                                          r"'reward_model_zero_head'. The critic reads the policy's token ids"):
        make_trainer(data)


def test_a_run_trains_with_its_own_reward_tokenizer_and_resumes_exactly(tmp_path):
    # everything issue 24 added at once: chat lines, the reward model's own tokenizer, Hugging Face folders at
    # every checkpoint, samples and their pages at every evaluation, the win rate
    settings = {"reward": {"mode": "red", "beta_c": 0.5}, "chat_lines": True,
                "run": {"total_steps": 3, "eval_every": 1, "save_every": 1, "sample_pages": 2}}
    whole = make_trainer(cross_config(tmp_path, "whole", **settings))
    # the critic starts from the policy's backbone with a zero head
    policy_backbone = whole.policy.model.state_dict()
    assert all(torch.equal(whole.critic.backbone.state_dict()[k], v) for k, v in policy_backbone.items())
    assert whole.critic.head.weight.abs().sum() == 0
    whole.train()
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        for key in ("loss/policy", "loss/value", "reward/score", "reward/rm_token_sum", "eval/score"):
            assert math.isfinite(row[key]), key
    assert rows[1]["reward/score"] != 0.0

    make_trainer(cross_config(tmp_path, "parts", **settings)).train(stop_after=1)
    resumed = make_trainer(cross_config(tmp_path, "parts", **settings))
    resumed.train(resume=True)
    timing = ("time/", "throughput/")
    a, b = ([{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_metrics(tmp_path / name /
                                                                                           "metrics.jsonl")]
            for name in ("whole", "parts"))
    assert [r["step"] for r in b] == [0, 1, 2, 3] and a == b  # every reward, KL, loss and statistic, bit for bit
    final = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000003.pt")
    for name, tensor in resumed.policy.state_dict().items():
        assert torch.equal(tensor, final["policy"][name]), name
    assert any(p.messages is not None for p in whole.sampler.prompts + whole.eval_prompts)
    assert all(math.isfinite(r["eval/win_rate"]) for r in a)
    written = sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir())
    assert "step-000003.html" in written and written == sorted(p.name for p in (tmp_path / "parts" / "samples").iterdir())
    for name in written:
        assert (tmp_path / "whole" / "samples" / name).read_bytes() == \
            (tmp_path / "parts" / "samples" / name).read_bytes(), name
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "whole" / "checkpoints" / "step-000003-hf" / name).read_bytes() == \
            (tmp_path / "parts" / "checkpoints" / "step-000003-hf" / name).read_bytes(), name
