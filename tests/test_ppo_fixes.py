"""The trainer's critic initialisations and the step-0 equivalence of sparse and RED under a
reward-model critic, where scores are read with pad == EOS, the NaN check before either
optimiser steps, clipping before the missing-EOS penalty, token-weighted gradient accumulation,
and the public ``reward_fn`` hook."""

import pytest
import torch

from conftest import tiny_config
from red_ppo.config import load_config
from red_ppo.rollout import build_rollout, left_pad, position_ids, reward_model_mask

pytest.importorskip("transformers")

# One step, nothing saved or evaluated; one epoch of one minibatch of 32.
ONE_STEP = {
    "run": {"total_steps": 1, "save_every": 0, "eval_every": 0, "eval_prompts": 4, "num_threads": 1, "progress": False},
    "generation": {"max_new_tokens": 8},
    "rollout": {"batch_size": 32, "forward_batch_size": 32},
    "ppo": {"epochs": 1, "minibatch_size": 32, "grad_accum_steps": 1},
}


def tiny(tmp_path, **sections) -> dict:
    return tiny_config(ONE_STEP, {"run": {"output_dir": str(tmp_path / "run")}}, sections)


def synthetic_tokenizer(pad_is_eos: bool):
    from red_ppo.synthetic import build_tokenizer
    tokenizer = build_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == pad_is_eos
    return tokenizer


def make_trainer(tmp_path, pad_is_eos=False, reward_fn=None, **sections):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=tiny(tmp_path, **sections)), tokenizer=synthetic_tokenizer(pad_is_eos),
                      reward_fn=reward_fn)


def hand_rollout(trainer, rows=32, width=9, seed=0, sampled_pads=False):
    """Sampled prompts and random responses with an EOS at random places (some rows without one,
    one row that is only an EOS), so lengths differ; ``sampled_pads``: rows 1 and 2 hold pad ids
    the policy sampled (a distinct pad only). -> (rollout, its prompts)."""
    g = torch.Generator().manual_seed(seed)
    prompts = trainer.sampler.next_batch(rows)
    ids, mask = left_pad([p.ids for p in prompts], trainer.pad_id)
    special = {trainer.pad_id, trainer.eos_id, trainer.tokenizer.bos_token_id, trainer.tokenizer.unk_token_id}
    words = torch.tensor([i for i in range(len(trainer.tokenizer)) if i not in special])
    responses = words[torch.randint(len(words), (rows, width), generator=g)]
    ends = torch.randint(0, width + 3, (rows,), generator=g)  # >= width: no EOS
    ends[0], ends[1], ends[2] = 0, width + 1, width + 1
    for row, end in enumerate(ends.tolist()):
        if end < width:
            responses[row, end] = trainer.eos_id
    if sampled_pads and trainer.pad_id != trainer.eos_id:  # inside row 1, and last in row 2 (no EOS)
        responses[1, 3] = trainer.pad_id
        responses[2, 3:] = torch.tensor([trainer.pad_id, words[0], trainer.pad_id] + [trainer.pad_id] * (width - 6))
    return build_rollout(ids, mask, responses, trainer.eos_id, trainer.pad_id), prompts


# ------------------------------------------------------------------ 1. the critic's start

def test_critic_initialisations(tmp_path):
    heads = {}
    for init in ("reward_model_zero_head", "reward_model", "policy"):
        trainer = make_trainer(tmp_path, model={"critic_init": init})
        heads[init] = trainer.critic.head
        rm_backbone = trainer.reward_model.model.state_dict()
        source = rm_backbone if init != "policy" else trainer.policy.model.state_dict()
        critic_backbone = trainer.critic.backbone.state_dict()
        assert all(torch.equal(critic_backbone[k], source[k]) for k in source), init
        if init == "reward_model":
            assert torch.equal(trainer.critic.head.weight, trainer.reward_model.score.weight)
        else:
            assert trainer.critic.head.weight.abs().sum() == 0 and trainer.critic.head.bias.abs().sum() == 0
    assert load_config(base=tiny(tmp_path)).model.critic_init == "reward_model_zero_head"  # the default


def step0(trainer, rollout, prompts, mode):
    trainer.cfg.reward.mode = mode
    return trainer.make_experience(rollout, prompts)


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["distinct-pad", "pad-is-eos"])
@pytest.mark.parametrize("init", ["reward_model", "default"])
def test_step0_sparse_td_errors_equal_red_rewards_only_under_the_reward_model_critic(tmp_path, init, pad_is_eos):
    """gamma = 1, lambda = 0, no KL at step 0: sparse's advantages are its TD errors
    r_t + V_{t+1} - V_t. With V = the reward model's prefix score, they are RED's token rewards."""
    model = {"critic_init": init} if init != "default" else {}
    trainer = make_trainer(tmp_path, pad_is_eos, model=model, reward={"kl_coef": 0.0},
                           ppo={"lam": 0.0, "gamma": 1.0, "whiten_advantages": False})
    rollout, prompts = hand_rollout(trainer)
    sparse, red = step0(trainer, rollout, prompts, "sparse"), step0(trainer, rollout, prompts, "red")
    mask = rollout.response_mask.bool()
    td_errors, red_rewards = sparse["advantages"][mask], red["rm_rewards"][mask]
    difference = (td_errors - red_rewards).abs().max().item()
    if init == "reward_model":
        assert difference < 1e-5
    else:
        assert difference > 1e-2
        # With a zero head the critic adds nothing at step 0: the TD errors are the sparse rewards.
        assert torch.equal(sparse["advantages"], sparse["rm_rewards"])


# ------------------------------------------------------------------ 2. where the score is read

@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["distinct-pad", "pad-is-eos"])
def test_scores_are_read_where_a_sequence_classifier_reads_them(tmp_path, pad_is_eos):
    trainer = make_trainer(tmp_path, pad_is_eos)
    rollout, prompts = hand_rollout(trainer, sampled_pads=True)
    scores, token_rewards = trainer.reward_scores(rollout, prompts)
    rm = trainer.reward_model
    assert rm.config.pad_token_id == trainer.pad_id
    with torch.no_grad():  # transformers scores the last token that is not the pad id
        expected = rm(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                      position_ids=position_ids(rollout.attention_mask)).logits[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    P = rollout.prompt_width
    lengths = rollout.lengths
    ends_with_eos = rollout.responses[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)] == trainer.eos_id
    mask = reward_model_mask(rollout, trainer.pad_id)
    scored = mask[:, P:].sum(1)
    # pad == EOS: the EOS is not scored; a distinct pad: it is, and so is a pad sampled inside a response.
    expected_scored = lengths - (ends_with_eos.long() if pad_is_eos else 0)
    if not pad_is_eos:
        assert lengths[1] == 9 and lengths[2] == 9
        expected_scored[2] = 5  # trailing sampled pads are not scored
    assert torch.equal(scored, expected_scored)
    with torch.no_grad():
        prompt_scores = rm(input_ids=rollout.input_ids[:, :P], attention_mask=rollout.attention_mask[:, :P],
                           position_ids=position_ids(rollout.attention_mask[:, :P])).logits[:, 0]
    # RED's token rewards telescope to the same sequence score (baseline: the prompt's score).
    torch.testing.assert_close(token_rewards[:, P:].sum(1), expected - prompt_scores, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ 3. NaN before either step

def test_a_nan_critic_gradient_leaves_the_policy_untouched(tmp_path):
    from red_ppo.trainer import NonFiniteLossError

    trainer = make_trainer(tmp_path)
    rollout, prompts = hand_rollout(trainer)
    exp = trainer.make_experience(rollout, prompts)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.critic.head.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteLossError, match="critic gradient norm is nan.*before updating"):
        trainer.ppo_update(rollout, exp)
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.optimizers["policy"].state and trainer.schedulers["policy"].last_epoch == 0


# ------------------------------------------------------------------ 4. clip, then the penalty

@pytest.mark.parametrize("mode", ["sparse", "red"])
def test_clip_applies_to_the_scores_and_the_missing_eos_penalty_comes_after(tmp_path, mode):
    from red_kernels.hf import score_prefixes

    clip, penalty = 1e-3, 5.0
    trainer = make_trainer(tmp_path, reward={"mode": mode, "clip": clip, "missing_eos_penalty": penalty,
                                             "kl_coef": 0.0})
    rollout, prompts = hand_rollout(trainer)
    exp = trainer.make_experience(rollout, prompts)
    P, mask = rollout.prompt_width, rollout.response_mask
    with torch.no_grad():
        out = score_prefixes(trainer.reward_model, rollout.input_ids, reward_model_mask(rollout, trainer.pad_id), P)
    assert (out.rewards.abs() > clip).float().mean() > 0.5  # the clip is active on most rows
    no_eos = ~((rollout.responses == trainer.eos_id) & mask.bool()).any(1)
    assert 0 < no_eos.sum() < len(no_eos)
    clipped_score = out.rewards.clamp(-clip, clip)
    expected_sum = clipped_score - penalty * no_eos.float()
    if mode == "red":  # every prefix score is clipped, so the token rewards telescope to the clipped ones
        expected_sum = expected_sum - out.scores[:, P - 1].clamp(-clip, clip)
        rows = rollout.lengths > 0
        red = exp["rm_rewards"] + penalty * torch.nn.functional.one_hot(
            (rollout.lengths - 1).clamp(min=0), mask.shape[1]).float() * no_eos[:, None].float()
        assert red[rows].abs().max() <= 2 * clip + 1e-6
    torch.testing.assert_close(exp["rm_rewards"].sum(1), expected_sum, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 5. gradient accumulation

def test_gradient_accumulation_does_not_change_the_gradient(tmp_path):
    """Four micro-batches give the minibatch's gradient up to the rounding of summing it in another order. That
    rounding is measured, not guessed: the gradient of the same minibatch in one micro-batch with its rows in
    FLOOR_ORDERS other orders. Each tensor (and each loss) may differ by 3x the largest difference those show."""
    floor_orders, multiple = 6, 3.0
    trainer = make_trainer(tmp_path, ppo={"entropy_coef": 0.01, "value_clip_range": 0.2})
    rollout, prompts = hand_rollout(trainer)
    assert len(set(rollout.lengths.tolist())) > 3
    exp = trainer.make_experience(rollout, prompts)
    # Move the models off the rollout's so that ratios and value clipping are not trivial.
    with torch.no_grad():
        for q in list(trainer.policy.parameters()) + list(trainer.critic.parameters()):
            q.add_(0.05 * torch.randn_like(q))
    minibatch = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    params = [q for q in list(trainer.policy.parameters()) + list(trainer.critic.parameters())]

    def gradient(accum, rows):
        trainer.cfg.ppo.grad_accum_steps = accum
        losses, _ = trainer.accumulate_gradients(rollout, exp, rows)
        return [q.grad.clone() for q in params if q.grad is not None], losses

    grads_one, losses_one = gradient(1, minibatch)
    grads_four, losses_four = gradient(4, minibatch)
    orders = [gradient(1, minibatch[torch.randperm(32, generator=torch.Generator().manual_seed(10 + seed))])
              for seed in range(floor_orders)]
    assert len(grads_one) == len(grads_four) == len(params) and sum(g.abs().sum() for g in grads_one) > 0
    for i, (one, four) in enumerate(zip(grads_one, grads_four)):
        floor = max((grads[i] - one).abs().max().item() for grads, _ in orders)
        difference = (four - one).abs().max().item()
        assert difference <= multiple * floor, f"parameter {i}: {difference:.2e} apart, floor {floor:.2e}"
    for key in ("loss/policy", "loss/value", "policy/entropy"):
        floor = max(abs(losses[key] - losses_one[key]) for _, losses in orders)
        assert abs(losses_four[key] - losses_one[key]) <= multiple * floor, (key, losses_four[key], losses_one[key])


# ------------------------------------------------------------------ the reward hook

def test_reward_fn_replaces_the_reward_model(tmp_path):
    calls = []

    def reward_fn(input_ids, attention_mask, response_start):
        calls.append((input_ids.shape, response_start))
        # a prefix score that every token moves: a fixed value per token id, summed over real tokens
        table = torch.linspace(-1.0, 1.0, 68, dtype=torch.float64)
        return torch.cumsum(table[input_ids] * attention_mask, dim=1).float()

    trainer = make_trainer(tmp_path, reward_fn=reward_fn, reward={"mode": "red", "baseline": "prompt"})
    rollout, prompts = hand_rollout(trainer)
    scores, token_rewards = trainer.reward_scores(rollout, prompts)
    mask = reward_model_mask(rollout, trainer.pad_id)
    P = rollout.prompt_width
    table = torch.linspace(-1.0, 1.0, 68, dtype=torch.float64)
    per_token = table[rollout.input_ids] * mask
    torch.testing.assert_close(scores.double(), per_token.sum(1), atol=1e-5, rtol=0)
    # RED: each scored response token's reward is its own table value (the difference of prefix scores).
    torch.testing.assert_close(token_rewards[:, P:].double(), per_token[:, P:], atol=1e-5, rtol=0)
    assert token_rewards[:, :P].abs().sum() == 0
    assert calls == [(rollout.input_ids.shape, P)]
    trainer.train()
    assert len(calls) > 1  # training and evaluation score through the hook


def test_reward_fn_errors(tmp_path):
    with pytest.raises(TypeError, match="reward_fn: expected a callable"):
        make_trainer(tmp_path, reward_fn=3)
    trainer = make_trainer(tmp_path, reward_fn=lambda ids, mask, start: torch.zeros(ids.shape[0]))
    with pytest.raises(ValueError, match=r"reward_fn: expected a floating-point tensor of prefix scores of shape "
                                         r"\[32, \d+\].*got torch.float32 tensor of shape \[32\]"):
        trainer.reward_scores(*hand_rollout(trainer))
