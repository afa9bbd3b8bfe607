"""Precision and memory in red_ppo: bf16 mixed precision over float32 weights, gradient checkpointing,
chunked response log-probs, no entropy graph at entropy_coef 0, frozen models offloaded, and exact
resume with all of it on."""

import copy

import pytest
import torch

from conftest import TINY_MODEL, tiny_config
from red_ppo import checkpoint as ckpt
from red_ppo.config import load_config
from red_ppo.metrics import read_metrics
from red_ppo.models import checkpointing
from red_ppo.rollout import generate_rollout, left_pad, response_logprobs, rollout_logprobs

pytest.importorskip("transformers")

BASE = {"run": {"eval_prompts": 0, "eval_every": 0, "save_every": 0, "num_threads": 1, "progress": False},
        "generation": {"max_new_tokens": 6}}


def trainer(tmp_path, name="run", **sections):
    from red_ppo.trainer import PPOTrainer
    return PPOTrainer(load_config(base=tiny_config(BASE, {"run": {"output_dir": str(tmp_path / name)}}, sections)))


def sample(t, rows=8):
    """A rollout of ``rows`` sampled prompts, and those prompts."""
    prompts = t.sampler.next_batch(rows)
    ids, mask = left_pad([p.ids for p in prompts], t.pad_id)
    return generate_rollout(t.policy, ids, mask, t.cfg.generation, t.eos_id, t.pad_id), prompts


def changed_fraction(t, steps):
    start = [q.detach().clone() for q in t.policy.parameters()]
    for _ in range(steps):
        t.train_step()
        t.step += 1
    changed = sum((q != s.to(q.dtype)).sum().item() for q, s in zip(t.policy.parameters(), start))
    return changed / sum(s.numel() for s in start)


def test_mixed_precision_keeps_the_updates_pure_bf16_loses(tmp_path):
    # lr 1e-6, 10 steps: AdamW's steps of about lr are below bf16's spacing near most weights.
    settings = {"model": {"dtype": "bfloat16"}, "ppo": {"epochs": 1},
                "optim": {"policy_lr": 1e-6, "critic_lr": 1e-6}}
    mixed = trainer(tmp_path, "mixed", **settings)
    assert all(q.dtype == torch.float32 for q in [*mixed.policy.parameters(), *mixed.critic.parameters()])
    assert mixed.dtypes["policy"] == mixed.dtypes["critic"] == torch.bfloat16
    pure = trainer(tmp_path, "pure", **settings)
    pure.policy.to(torch.bfloat16)  # what model.dtype=bfloat16 did before: AdamW on the bf16 weights themselves
    pure.critic.to(torch.bfloat16)
    # Measured: 99.5% of the weights changed in float32 and under mixed precision, 2.0% under pure bf16.
    assert changed_fraction(mixed, 10) > 0.99
    assert changed_fraction(pure, 10) < 0.05
    state = mixed.optimizers["policy"].state[next(mixed.policy.parameters())]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_frozen_models_in_their_dtype_and_trained_ones_float32(tmp_path):
    rm = {"config": dict(TINY_MODEL), "dtype": "float16"}
    t = trainer(tmp_path, model={"dtype": "bfloat16", "critic_dtype": "float32", "reward_model": rm})
    assert {q.dtype for q in t.reference.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in t.reward_model.parameters()} == {torch.float16}
    assert {q.dtype for q in t.policy.parameters()} == {q.dtype for q in t.critic.parameters()} == {torch.float32}
    assert t.dtypes == {"policy": torch.bfloat16, "critic": torch.float32, "reference": torch.bfloat16,
                        "reward_model": torch.float16}
    row = t.train_step()  # sampling, scoring and the update run in these dtypes on the CPU
    assert all(row[k] == row[k] for k in ("reward/score", "kl/sequence", "loss/policy", "loss/value"))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain = trainer(tmp_path, "plain")
    checked = trainer(tmp_path, "checked", model={"gradient_checkpointing": True})
    calls = []
    for model in (checked.policy, checked.critic.backbone):
        for layer in model.modules():
            if getattr(layer, "gradient_checkpointing", False) and hasattr(layer, "_gradient_checkpointing_func"):
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, inner=inner, **k: calls.append(1) or inner(*a, **k)
    rollout, prompts = sample(plain)
    exp = plain.make_experience(rollout, prompts)
    minibatch = torch.arange(4)
    assert plain.accumulate_gradients(rollout, exp, minibatch) == checked.accumulate_gradients(rollout, exp, minibatch)
    assert len(calls) == 0
    with checkpointing(checked.policy, checked.critic):
        checked.accumulate_gradients(rollout, exp, minibatch)
    assert len(calls) >= 2  # the layers were recomputed: checkpointing engaged (one layer in each model)
    for a, b in ((plain.policy, checked.policy), (plain.critic, checked.critic)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad), name  # measured: bit for bit on the CPU
    assert not any(m.training for m in checked.policy.modules())  # eval mode again after the update


def test_ppo_update_switches_checkpointing_on(tmp_path):
    t = trainer(tmp_path, model={"gradient_checkpointing": True})
    seen = []
    original = t._micro_step

    def spy(*args):
        layers = [m for m in t.policy.modules() if getattr(m, "gradient_checkpointing", False)]
        seen.append(any(m.training for m in layers) and not t.policy.training)
        return original(*args)

    t._micro_step = spy
    t.train_step()
    assert seen and all(seen)


@pytest.mark.parametrize("chunk", [1, 5, 48])
def test_chunked_logprobs_equal_the_whole_tensor_ones(tmp_path, chunk):
    t = trainer(tmp_path)
    rollout, _ = sample(t)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 0.7)
    with torch.no_grad():
        whole = response_logprobs(t.policy, *args)
        chunked = response_logprobs(t.policy, *args, chunk)
        reference = response_logprobs(copy.deepcopy(t.policy).double(), *args)
    if chunk > 1:  # measured: bit for bit, except with one token per chunk (a matrix-vector product)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    # The rollout's pass (3 rows per forward) too; float32 sums in other orders are held to float32's own
    # error against float64 (the whole path's), twice over as flash-attention's tests do.
    pairs = [*zip(chunked, whole, reference),
             (rollout_logprobs(t.policy, rollout, 0.7, 3, chunk), rollout_logprobs(t.policy, rollout, 0.7, 3),
              reference[0] * rollout.response_mask)]
    for ours, theirs, exact in pairs:
        assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max()

    # Gradients: sums over tokens in another order, held to the same bound (measured ratio 1.3-1.4).
    weights = torch.randn(rollout.response_mask.shape, generator=torch.Generator().manual_seed(1))

    def grads(model, c):
        model = copy.deepcopy(model)
        logprobs, entropy = response_logprobs(model, *args, c)
        ((logprobs + 0.1 * entropy) * weights).sum().backward()
        return {n: q.grad for n, q in model.named_parameters()}

    whole, chunked, exact = grads(t.policy, 0), grads(t.policy, chunk), grads(t.policy.double(), 0)
    for name in exact:
        own = (whole[name].double() - exact[name]).abs().max()
        assert (chunked[name].double() - exact[name]).abs().max() <= 2 * own, name


def test_chunked_logprobs_refuse_a_model_that_scales_its_logits(tmp_path):
    t = trainer(tmp_path)
    rollout, _ = sample(t)
    t.policy.config.final_logit_softcapping = 30.0  # as Gemma 2: its forward caps lm_head's output
    with pytest.raises(ValueError, match=r"rollout.logprob_chunk: .* config.final_logit_softcapping=30.0; set "):
        response_logprobs(t.policy, rollout.input_ids, rollout.attention_mask, rollout.prompt_width, 1.0, 5)


def saved_bytes(t, rollout, exp):
    """Bytes autograd keeps for backward over one micro-step's forward (the graph, measured as saved)."""
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor

    index = torch.arange(rollout.input_ids.shape[0])
    tokens = rollout.response_mask.sum()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        t._micro_step(rollout, exp, index, tokens)
    return sum(total)


@pytest.mark.parametrize("chunk", [0, 5])
def test_no_entropy_graph_at_zero_coefficient(tmp_path, chunk):
    zero = trainer(tmp_path, "zero", rollout={"logprob_chunk": chunk})
    bonus = trainer(tmp_path, "bonus", rollout={"logprob_chunk": chunk}, ppo={"entropy_coef": 0.01})
    rollout, prompts = sample(zero)
    exp = zero.make_experience(rollout, prompts)
    B, R = rollout.response_mask.shape
    vocab = zero.policy.config.vocab_size
    without, with_entropy = saved_bytes(zero, rollout, exp), saved_bytes(bonus, rollout, exp)
    if chunk == 0:  # the entropy graph keeps [B, R, V] float32 tensors of its own
        assert with_entropy - without >= B * R * vocab * 4
    else:  # each chunk's graph is recomputed in backward: the entropy adds [B, R] tensors, never a [B, R, V] one
        assert 0 < with_entropy - without < B * R * vocab * 4
    # the entropy is still logged, and the same with or without its graph
    assert zero.accumulate_gradients(rollout, exp, torch.arange(4))[0]["policy/entropy"] == \
        bonus.accumulate_gradients(rollout, exp, torch.arange(4))[0]["policy/entropy"]


def test_offload_frozen_moves_them_for_scoring_only(tmp_path):
    t = trainer(tmp_path, model={"offload_frozen": True})
    moves = []
    for name in ("reference", "reward_model"):
        model = getattr(t, name)
        original = model.to

        def to(*args, name=name, original=original, **kwargs):
            moves.append((name, torch.device(args[0])))
            return original(*args, **kwargs)

        model.to = to
    scoring = []
    make_experience = t.make_experience

    def spy(rollout, prompts):
        scoring.append(list(moves))
        return make_experience(rollout, prompts)

    t.make_experience = spy
    t.train_step()
    cpu = torch.device("cpu")
    assert scoring == [[("reference", t.device), ("reward_model", t.device)]]
    assert moves[2:] == [("reference", cpu), ("reward_model", cpu)]
    assert {q.device for q in [*t.reference.parameters(), *t.reward_model.parameters()]} == {cpu}


def test_resume_is_exact_with_mixed_precision_checkpointing_and_chunks(tmp_path):
    settings = {"reward": {"mode": "red", "kl_estimator": "k3", "adaptive_kl": True, "target_kl": 0.5,
                           "kl_horizon": 100, "whiten": True},
                "model": {"dtype": "bfloat16", "gradient_checkpointing": True, "offload_frozen": True},
                "rollout": {"logprob_chunk": 5}, "ppo": {"epochs": 2, "grad_accum_steps": 2, "entropy_coef": 0.01},
                "optim": {"policy_lr": 1e-3, "critic_lr": 1e-3},
                "run": {"total_steps": 4}}
    trainer(tmp_path, "whole", **settings).train()
    trainer(tmp_path, "parts", **settings).train(stop_after=2)
    resumed = trainer(tmp_path, "parts", **settings)
    resumed.train(resume=True)

    def rows(name):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}
                for row in read_metrics(tmp_path / name / "metrics.jsonl")]

    assert [r["step"] for r in rows("parts")] == [1, 2, 3, 4]
    assert rows("whole") == rows("parts")
    final = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000004.pt")
    for name, tensor in resumed.policy.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, final["policy"][name]), name
