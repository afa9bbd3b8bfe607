"""Steps 1 and 2 of the demo: supervised pre-training of a tiny policy on the synthetic
language, and a tiny Bradley-Terry reward model trained through the fused op's gradients.
Both are saved with their tokenizer and reused while their settings are unchanged."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from red_kernels.hf import score_prefixes
from red_ppo.rollout import generate_rollout, left_pad
from red_ppo.sources import pair_accuracy
from red_ppo.synthetic import VOCAB, SyntheticConfig, SyntheticTask, spearman

CACHE_VERSION = 3


def fingerprint(*parts) -> str:
    text = json.dumps([CACHE_VERSION, VOCAB, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(folder: Path, key: str) -> dict | None:
    marker = folder / "pretrain.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == key:
            return info
    return None


def _warmup_cosine(step: int, total: int) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _step(model, opt, sched, loss: torch.Tensor) -> None:
    """One optimiser step of the pre-training loops: gradients clipped at norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def _save(model, tokenizer, folder: Path) -> None:
    """The trained model in eval mode, saved with its tokenizer as a `from_pretrained` folder."""
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _encode(tokenizer, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    p = tokenizer(prompts)["input_ids"]
    r = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return list(zip(p, r))


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def pretrain_policy(task: SyntheticTask, tokenizer, s: SyntheticConfig, folder: Path, log=print) -> dict:
    """Step 1: next-token training on the language's samples (loss on response tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    key = fingerprint("sft", s.seed, s.max_words, s.policy_config, s.sft_steps, s.sft_batch_size, s.sft_lr)
    info = cached(folder, key)
    if info is not None:
        log(f"[1/3] supervised policy: reusing {folder}")
        return info
    t0 = time.perf_counter()
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    kwargs = dict(s.policy_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s.sft_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _warmup_cosine(i, s.sft_steps))
    losses = []
    model.train()
    for step in range(s.sft_steps):
        prompts = [task.sample_prompt(rng) for _ in range(s.sft_batch_size)]
        responses = [task.sample_response(rng, p.split()[0]) for p in prompts]
        pairs = _encode(tokenizer, prompts, responses)
        ids, mask = _right_pad([p + r for p, r in pairs], tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for i, (p, _) in enumerate(pairs):
            labels[i, : len(p)] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        _step(model, opt, sched, loss)
        losses.append(loss.item())
    _save(model, tokenizer, folder)
    info = {"fingerprint": key, "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "seconds": time.perf_counter() - t0}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2))
    log(f"[1/3] supervised policy: {info['parameters']:,} parameters, {s.sft_steps} steps, "
        f"loss {info['final_loss']:.3f}, {info['seconds']:.0f}s")
    return info


@torch.no_grad()
def sample_policy_responses(policy, tokenizer, prompts: list[str], max_new_tokens: int,
                            chunk: int = 256) -> list[list[int]]:
    """Responses (token ids, truncated after EOS) sampled at temperature 1 from ``policy``."""
    from red_ppo.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    out = []
    for start in range(0, len(prompts), chunk):
        ids, mask = left_pad(tokenizer(prompts[start:start + chunk])["input_ids"], tokenizer.pad_token_id)
        rollout = generate_rollout(policy, ids, mask, gen, tokenizer.eos_token_id, tokenizer.pad_token_id)
        out += rollout.response_lists()
    return out


def _response_pool(task, tokenizer, policy, rng: random.Random, count: int, max_new_tokens: int):
    """Pairs of responses to one prompt (rows 2i and 2i + 1): the first half of the rows sampled
    from the supervised policy, the second half from the language with perturbations."""
    prompts = [p for p in (task.sample_prompt(rng) for _ in range(count // 2)) for _ in range(2)]
    half = 2 * (len(prompts) // 4)
    from_policy = sample_policy_responses(policy, tokenizer, prompts[:half], max_new_tokens)
    texts = [task.sample_response(rng, p.split()[0], max_words=max_new_tokens - 2, perturb=rng.random() < 0.5)
             for p in prompts[half:]]
    from_language = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    responses = [r[:max_new_tokens] for r in from_policy + from_language]
    return [ids for ids in tokenizer(prompts)["input_ids"]], responses


def pair_kinds(count: int, prefix: float, edit: float, rng: random.Random) -> list[str]:
    """``count`` pair types in a shuffled order: ``round(prefix * count)`` prefix pairs,
    ``round(edit * count)`` minimal-edit pairs, the rest independent."""
    n_prefix, n_edit = round(prefix * count), round(edit * count)
    kinds = ["prefix"] * n_prefix + ["edit"] * n_edit + ["independent"] * (count - n_prefix - n_edit)
    rng.shuffle(kinds)
    return kinds


def make_pair(task: SyntheticTask, rng: random.Random, kind: str, prompt: list[int], a: list[int], b: list[int],
              max_len: int):
    """One preference pair -> (prompt, (x, x_complete), (y, y_complete), kind made).

    ``prefix``: two prefixes of ``a`` (the longer may be all of it); an unfinished prefix is scored
    without the missing-EOS term, so the pair teaches the prefix's own credit. ``edit``: ``a`` and
    ``a`` with one word replaced, inserted or deleted (never its <eos>). ``independent``: ``a`` and
    ``b``. A response too short for its kind gives an independent pair."""
    if kind == "prefix" and len(a) >= 2:
        k1, k2 = sorted(rng.sample(range(1, len(a) + 1), 2))
        return prompt, (a[:k1], k1 == len(a)), (a[:k2], k2 == len(a)), "prefix"
    body = a[:-1] if a and a[-1] == task.eos_id else list(a)
    if kind == "edit" and body:
        words = sorted(task.topic_of_word) + sorted(task.function_ids)
        edited = list(a)
        action = rng.randrange(3) if len(body) > 1 else rng.randrange(2)
        i = rng.randrange(len(body))
        if action == 0:
            edited[i] = rng.choice([w for w in words if w != edited[i]])
        elif action == 1:
            edited.insert(i, rng.choice(words))
        else:
            del edited[i]
        return prompt, (a, True), (edited[:max_len], True), "edit"
    return prompt, (a, True), (b, True), "independent"


def _batch_scores(rm, tokenizer, prompts: list[list[int]], responses: list[list[int]], baseline: str = "prompt"):
    """The fused op's output on right-padded ``prompt + response`` rows (response_start per row)."""
    ids, mask = _right_pad([p + r for p, r in zip(prompts, responses)], tokenizer.pad_token_id)
    start = torch.tensor([len(p) for p in prompts])
    return score_prefixes(rm, ids, mask, start, baseline=baseline, backend="auto"), start


def _new_reward_model(s: SyntheticConfig, tokenizer, sft_folder: Path):
    """The reward model before training: the supervised policy's backbone with a fresh head
    (``rm_init: policy``), or the same architecture with every weight fresh (``rm_init: scratch``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if s.rm_init == "policy":
        rm = AutoModelForSequenceClassification.from_pretrained(sft_folder, num_labels=1)
    else:
        kwargs = dict(s.policy_config)
        config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **kwargs)
        rm = AutoModelForSequenceClassification.from_config(config)
    rm.config.pad_token_id = tokenizer.pad_token_id
    return rm


def train_reward_model(task: SyntheticTask, tokenizer, sft_folder: Path, s: SyntheticConfig, folder: Path,
                       max_new_tokens: int, baseline: str = "prompt", log=print, checkpoints: list[int] = ()) -> dict:
    """Step 2: Bradley-Terry on noisy preference pairs, gradients through `redistribute`'s rewards.

    ``checkpoints``: optimiser steps after which the reward model is also saved, in ``folder/step-NNNNNN``
    with its held-out measures (``info["checkpoints"]``); the finished model is ``folder`` itself."""
    from transformers import AutoModelForCausalLM

    sft_key = json.loads((sft_folder / "pretrain.json").read_text())["fingerprint"]
    key = fingerprint("rm", sft_key,
                      s.seed, s.rm_pairs, s.rm_epochs, s.rm_batch_size, s.rm_lr, s.label_temperature,
                      s.heldout_responses, max_new_tokens, baseline, s.rm_prefix_pairs, s.rm_edit_pairs,
                      s.verbose_after, s.proper_end, s.no_eos, s.rm_init, list(checkpoints))
    info = cached(folder, key)
    if info is not None:
        log(f"[2/3] reward model: reusing {folder}")
        return info
    t0 = time.perf_counter()
    rng = random.Random(s.seed + 1)
    torch.manual_seed(s.seed + 1)
    policy = AutoModelForCausalLM.from_pretrained(sft_folder).eval()
    pool_prompts, pool = _response_pool(task, tokenizer, policy, rng, 2 * s.rm_pairs, max_new_tokens)
    held_prompts, held = _response_pool(task, tokenizer, policy, rng, s.heldout_responses, max_new_tokens)
    chosen, rejected, agree = [], [], 0
    kinds = pair_kinds(s.rm_pairs, s.rm_prefix_pairs, s.rm_edit_pairs, rng)
    made = {"independent": 0, "prefix": 0, "edit": 0}
    for i in range(s.rm_pairs):
        prompt, (a, a_done), (b, b_done), kind = make_pair(task, rng, kinds[i], pool_prompts[2 * i], pool[2 * i],
                                                           pool[2 * i + 1], max_new_tokens)
        made[kind] += 1
        gap = task.score(prompt, a, a_done) - task.score(prompt, b, b_done)
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-gap / s.label_temperature))
        agree += (gap > 0) == a_wins if gap != 0 else 0.5
        chosen.append((prompt, a if a_wins else b))
        rejected.append((prompt, b if a_wins else a))

    rm = _new_reward_model(s, tokenizer, sft_folder)
    rm.train()
    steps = s.rm_epochs * math.ceil(s.rm_pairs / s.rm_batch_size)
    if any(k > steps for k in checkpoints):
        raise ValueError(f"checkpoints: expected optimiser steps of at most {steps} (synthetic.rm_epochs x "
                         f"ceil(rm_pairs / rm_batch_size)), got {list(checkpoints)}")
    saved = {}
    opt = torch.optim.AdamW(rm.parameters(), lr=s.rm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _warmup_cosine(i, steps))
    generator = torch.Generator().manual_seed(s.seed + 2)
    losses = []
    for _ in range(s.rm_epochs):
        order = torch.randperm(s.rm_pairs, generator=generator).tolist()
        for start in range(0, s.rm_pairs, s.rm_batch_size):
            index = order[start:start + s.rm_batch_size]
            rows = [chosen[i] for i in index] + [rejected[i] for i in index]
            out, _ = _batch_scores(rm, tokenizer, [p for p, _ in rows], [r for _, r in rows])
            good, bad = out.rewards[: len(index)], out.rewards[len(index):]
            loss = -F.logsigmoid(good - bad).mean()
            _step(rm, opt, sched, loss)
            losses.append(loss.item())
            if len(losses) in checkpoints:
                saved[len(losses)] = _checkpoint(rm, tokenizer, task, held_prompts, held, baseline,
                                                 folder / f"step-{len(losses):06d}", losses)
    _save(rm, tokenizer, folder)
    info = {"fingerprint": key, "final_loss": float(np.mean(losses[-20:])), "label_agreement": agree / s.rm_pairs,
            "pairs": made, "steps": steps, "init": s.rm_init,
            **credit_fidelity(rm, tokenizer, task, held_prompts, held, baseline),
            "checkpoints": {str(k): v for k, v in saved.items()}, "seconds": time.perf_counter() - t0}
    (folder / "heldout.json").write_text(json.dumps({"prompts": held_prompts, "responses": held}))
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2))
    log(f"[2/3] reward model: {s.rm_pairs} pairs (labels agree with the truth {info['label_agreement']:.0%}), "
        f"loss {info['final_loss']:.3f}, held-out accuracy {info['heldout_accuracy']:.1%}, "
        f"RED credit fidelity rho={info['fidelity_spearman']:.3f}, {info['seconds']:.0f}s")
    return info


def _checkpoint(rm, tokenizer, task, prompts, responses, baseline, folder: Path, losses: list[float]) -> dict:
    """Save the reward model as it is mid-training, with its held-out measures; back to training mode."""
    _save(rm, tokenizer, folder)
    info = {"step": len(losses), "final_loss": float(np.mean(losses[-20:])),
            **credit_fidelity(rm, tokenizer, task, prompts, responses, baseline)}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2))
    rm.train()
    return info


@torch.no_grad()
def credit_fidelity(rm, tokenizer, task: SyntheticTask, prompts: list[list[int]], responses: list[list[int]],
                    baseline: str = "prompt") -> dict:
    """How well RED's token rewards rank the true per-token contributions on held-out responses.

    ``fidelity_spearman`` pools every response token; ``fidelity_spearman_per_response`` averages
    the rank correlation within responses of at least 3 tokens whose truth is not constant.
    ``heldout_accuracy`` is the reward model's pairwise accuracy on the pairs (rows 2i, 2i + 1
    answer one prompt; true ties left out, a tied score counts one half): Bradley-Terry only
    identifies score differences between responses to one prompt, so pairs across prompts would
    not measure it. ``score_sd`` is the sd of its sequence scores.
    """
    red, truth, per_response, seq_scores = [], [], [], []
    for start in range(0, len(prompts), 256):
        p, r = prompts[start:start + 256], responses[start:start + 256]
        out, begin = _batch_scores(rm, tokenizer, p, r, baseline)
        for row, (pi, ri) in enumerate(zip(p, r)):
            tokens = out.token_rewards[row, begin[row]: begin[row] + len(ri)].tolist()
            true = task.token_credit(pi, ri)
            if not ri:
                continue
            red += tokens
            truth += true
            if len(ri) >= 3 and len(set(true)) > 1:
                per_response.append(spearman(tokens, true))
        seq_scores += out.rewards.tolist()
    true_scores = [task.score(p, r) for p, r in zip(prompts, responses)]
    return {"fidelity_spearman": spearman(red, truth), "score_sd": float(np.std(seq_scores)),
            "fidelity_spearman_per_response": float(np.nanmean(per_response)) if per_response else float("nan"),
            "fidelity_tokens": len(red), "fidelity_responses": sum(1 for r in responses if r),
            "heldout_accuracy": pair_accuracy(seq_scores, true_scores),
            "score_spearman": spearman(seq_scores, true_scores)}
