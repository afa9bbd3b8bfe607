"""The PPO trainer: rollout, sparse or RED rewards with a KL penalty, GAE, clipped PPO
updates of the policy and the critic, checkpoints that resume exactly (with the policy as a
Hugging Face folder beside each), evaluation with samples and a win rate, and logging."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from red_kernels import redistribute
from red_kernels.cross_tokenizer import align_scores, policy_response, render_response, reward_model_text
from red_kernels.hf import score_prefixes
from red_ppo import checkpoint as ckpt
from red_ppo.config import ConfigError, TrainerConfig, to_dict
from red_ppo.data import Prompt, PromptSampler, load_prompts, split_prompts
from red_ppo.gae import compute_gae
from red_ppo.lora import AdapterFreeReference, add_adapters, require_peft, save_adapters_and_merged
from red_ppo.losses import explained_variance, policy_loss, token_mean, value_loss
from red_ppo.metrics import MetricsLog, import_wandb
from red_ppo.models import Critic, build_model, check_resources, checkpointing, enable_checkpointing, freeze, \
    model_dtypes, reward_model_tokenizer
from red_ppo.rewards import apply_missing_eos_penalty, kl_per_token, make_kl_controller, masked_mean, \
    mixed_rewards, red_rewards, shape_rewards, whiten
from red_ppo.rollout import Rollout, autocast, check_prefix_scores, generate_rollout, left_pad, response_logprobs, \
    reward_model_mask, rollout_logprobs
from red_ppo.samples import drop_samples_after, token_texts, write_samples

POSTFIX = (("score", "reward/score"), ("kl", "kl/sequence"), ("gt", "gt/score"))
# Changing these between an interrupted run and its resumption does not change the results
# (evaluation runs on its own RNG state); run.total_steps may grow when the schedule is constant.
RESUMABLE_CHANGES = {"run.save_every", "run.keep_checkpoints", "run.progress", "run.overwrite", "run.output_dir",
                     "run.eval_every", "run.report_to", "run.wandb_project", "run.sample_pages"}


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN or infinite; the models were not updated with it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: expected a usable device, got {name!r} but no CUDA GPU is visible")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("config",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


RewardFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Judge = Callable[[list[Prompt], list[str], list[str]], list[float]]


def check_verdicts(verdicts, count: int) -> list[float]:
    """A judge's answer: one number in [0, 1] per held-out prompt."""
    if not (isinstance(verdicts, (list, tuple)) and len(verdicts) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in verdicts)):
        raise ValueError(f"judge: expected a list of {count} numbers in [0, 1] (one per held-out prompt; 1: the "
                         f"policy's response wins), got {verdicts!r:.200}")
    return [float(v) for v in verdicts]


class PPOTrainer:
    """``PPOTrainer(cfg).train()``.

    ``sample_metrics(prompts, responses) -> dict`` adds metrics computed from the sampled token ids
    (the demo's ground truth); with ``data.source: synthetic`` it defaults to the synthetic
    language's scorer with its default terms (`SyntheticTask()`).

    ``reward_fn(input_ids, attention_mask, response_start) -> scores`` replaces the reward model as
    the source of scores: given a rollout's ``[B, T]`` token ids (left-padded prompts of width
    ``response_start``, then the responses), the ``[B, T]`` mask of the tokens to score, and the
    response start, it returns ``[B, T]`` prefix scores: ``scores[b, t]`` is the score of row b's
    text up to and including token t (read only where the mask is nonzero). The trainer reads the
    sequence score at each row's last masked token and, in RED mode, redistributes the prefix
    scores with ``red_kernels.redistribute``, exactly as it does the reward model's. Use it for an
    oracle, a rule-based scorer, or a reward model this trainer cannot load. The reward model is
    still built (the critic may start from it) but is not used for scores.

    A reward model with its own tokenizer (`red_ppo.models.reward_model_tokenizer`) reads each response as
    text, rendered with the conversation in its own chat template; its prefix scores are moved onto the
    policy's tokens (`red_kernels.cross_tokenizer`). ``tokenizer``, when given, is the policy's.

    ``judge(prompts, responses, baseline_responses) -> verdicts`` is a second judge of each evaluation
    besides the reward model's ``eval/win_rate``: given the held-out `Prompt`s, the policy's responses and
    the initial policy's (as text), it returns one number in [0, 1] per prompt (1: the policy's response
    wins; 0.5: a tie), logged as ``eval/judge_win_rate``.
    """

    def __init__(self, cfg: TrainerConfig, *, tokenizer=None,
                 sample_metrics: Callable[[list, list], dict] | None = None,
                 reward_fn: RewardFn | None = None, judge: Judge | None = None) -> None:
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable (input_ids, attention_mask, response_start) -> "
                            f"[B, T] scores, got {type(reward_fn).__name__}")
        if judge is not None and not callable(judge):
            raise TypeError(f"judge: expected a callable (prompts, responses, baseline_responses) -> a number in "
                            f"[0, 1] per prompt, got {type(judge).__name__}")
        import_wandb(cfg.run.report_to)  # a missing wandb fails here, before any model loads
        self.reward_fn, self.judge = reward_fn, judge
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.device = resolve_device(cfg.run.device)
        if cfg.model.lora is not None:
            require_peft()
        if tokenizer is None:
            tokenizer, rm_tokenizer = check_resources(cfg)
        else:
            rm_tokenizer = reward_model_tokenizer(cfg, tokenizer)
        self.rm_tokenizer = rm_tokenizer  # None: the reward model reads the policy's token ids
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        if sample_metrics is None and cfg.data.source == "synthetic":
            from red_ppo.synthetic import SyntheticTask
            sample_metrics = SyntheticTask().metrics
        self.sample_metrics = sample_metrics

        prompts, self.data_counts = load_prompts(cfg, tokenizer)
        train_prompts, self.eval_prompts = split_prompts(prompts, cfg.run.eval_prompts, cfg.run.seed)
        # The reference's responses to the held-out prompts and their scores: sampled at the first evaluation.
        self.baseline: dict | None = None
        self.sampler = PromptSampler(train_prompts, cfg.run.seed)
        self.shuffle = torch.Generator().manual_seed(cfg.run.seed + 1)

        seed_everything(cfg.run.seed)
        m = cfg.model
        # Trained models: float32 weights, forward under autocast in their dtype. Frozen models: in their dtype,
        # on the CPU between scoring phases with model.offload_frozen.
        self.dtypes = model_dtypes(cfg)
        self.frozen_home = torch.device("cpu") if m.offload_frozen else self.device
        self.policy = build_model(m.policy, tokenizer, "causal_lm", cfg).to(self.device).eval()
        if m.reference is not None:
            self.reference = freeze(build_model(m.reference, tokenizer, "causal_lm", cfg, self.dtypes["reference"])
                                    .to(self.frozen_home))
        elif m.lora is None:
            self.reference = freeze(copy.deepcopy(self.policy).to(self.frozen_home, self.dtypes["reference"]))
        self.reward_model = freeze(build_model(m.reward_model, rm_tokenizer or tokenizer, "seq_cls", cfg))
        if m.critic_init in ("reward_model", "reward_model_zero_head"):
            self.critic = Critic.from_reward_model(self.reward_model, cfg.reward.backend,
                                                   zero_head=m.critic_init == "reward_model_zero_head")
        else:
            self.critic = Critic.from_policy(self.policy, cfg.reward.backend)
        self.reward_model.to(self.frozen_home, self.dtypes["reward_model"])
        self.critic.requires_grad_(True)
        self.critic.to(self.device).eval()
        self.critic.autocast_dtype = self.dtypes["critic"]
        if m.gradient_checkpointing:
            enable_checkpointing(self.policy)
            enable_checkpointing(self.critic.backbone)
        # With LoRA the reference is the policy's own float32 weights with the adapters off: the policy's autocast.
        self.reference_dtype = torch.float32
        if m.lora is not None:  # after the critic, which copies the policy's backbone without adapters
            self.policy = add_adapters(self.policy, self.critic, m.lora)
            self.reference = AdapterFreeReference(self.policy)
            self.reference_dtype = self.dtypes["policy"]

        o = cfg.optim
        updates = cfg.run.total_steps * cfg.ppo.epochs * (cfg.rollout.batch_size // cfg.ppo.minibatch_size)
        self.optimizers, self.schedulers = {}, {}
        for name, model, lr in (("policy", self.policy, o.policy_lr), ("critic", self.critic, o.critic_lr)):
            trained = [q for q in model.parameters() if q.requires_grad]  # with LoRA: adapters and value head
            opt = torch.optim.AdamW(trained, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
            self.optimizers[name] = opt
            schedule = lr_lambda(o.warmup_steps, updates, o.schedule)
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        self.kl_controller = make_kl_controller(cfg.reward)
        self.step, self.samples = 0, 0
        self.last_checkpoint: Path | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ rollout

    def reward_scores(self, rollout: Rollout, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence scores ``[B]`` and RED token rewards ``[B, P + R]`` of one chunk of a rollout, whose row i
        answers ``prompts[i]``.

        Scores are read where the reward model was trained to read them (`reward_model_mask`), from
        the reward model's one pass through the fused op or from ``reward_fn``. ``reward.clip``
        clamps every prefix score before redistribution, so clipped token rewards still telescope.
        A reward model with its own tokenizer scores the re-rendered texts instead (`cross_tokenizer_scores`).
        """
        if len(prompts) != rollout.input_ids.shape[0]:
            raise ValueError(f"prompts: expected one Prompt per rollout row ({rollout.input_ids.shape[0]}), "
                             f"got {len(prompts)}")
        if self.rm_tokenizer is not None and self.reward_fn is None:
            return self.cross_tokenizer_scores(rollout, prompts, self.rm_tokenizer)
        r = self.cfg.reward
        mask, width = reward_model_mask(rollout, self.pad_id), rollout.prompt_width
        if self.reward_fn is None:
            out = score_prefixes(self.reward_model, rollout.input_ids, mask, width, baseline=r.baseline,
                                 backend=r.backend)
            if r.clip is None:
                return out.rewards, out.token_rewards
            prefix = out.scores
        else:
            prefix = self.reward_fn(rollout.input_ids, mask, width)
            check_prefix_scores("reward_fn", prefix, mask, "the rollout's")
        prefix = prefix.to(device=mask.device, dtype=torch.float32)
        if r.clip is not None:
            prefix = prefix.clamp(-r.clip, r.clip)
        # H = 1 and weight 1: the op applies the redistribution rule to the given scores themselves.
        out = redistribute(prefix.unsqueeze(-1).contiguous(), torch.ones(1, device=mask.device), attention_mask=mask,
                           response_start=width, baseline=r.baseline, backend=r.backend)
        return out.rewards, out.token_rewards

    def cross_tokenizer_scores(self, rollout: Rollout, prompts: list[Prompt], rm_tokenizer) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
        """`reward_scores` for a reward model that reads text with ``rm_tokenizer``.

        Each row's response text (the policy's sampled tokens decoded, the EOS text deleted) is rendered with the
        conversation in the reward model's chat template (a ``prompt`` line as one user message), or appended to
        the prompt's text where that tokenizer has no template; every row is scored in one padded pass of
        `score_prefixes`, and each row's prefix scores (clamped by ``reward.clip``) are moved onto the policy's
        response tokens by `red_kernels.redistribute_across_tokenizers`. The sequence score is the reward
        model's score of the whole rendered text. Token rewards sit in columns ``P + t`` as the fused op's do.
        """
        r = self.cfg.reward
        texts = []
        for row, (prompt, response) in enumerate(zip(prompts, rollout.response_lists())):
            response_text, policy_spans = policy_response(self.tokenizer, response)
            chat = prompt.messages if prompt.messages is not None else [{"role": "user", "content": prompt.text}]
            rm_text, start = render_response(rm_tokenizer, chat, prompt.text, response_text, sample=row)
            texts.append(reward_model_text(rm_tokenizer, rm_text, start, response_text, policy_spans, sample=row))
        lengths = [len(t.rm_ids) for t in texts]
        ids = torch.zeros((len(texts), max(lengths)), dtype=torch.long)  # padding: masked, as score_prefixes does
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            ids[row, : lengths[row]] = torch.tensor(text.rm_ids, dtype=torch.long)
            mask[row, : lengths[row]] = 1
        prefix = score_prefixes(self.reward_model, ids.to(self.device), mask.to(self.device), 0, baseline="zero",
                                backend=r.backend).scores.float().cpu()
        if r.clip is not None:
            prefix = prefix.clamp(-r.clip, r.clip)
        scores = torch.zeros(len(texts), dtype=torch.float32)
        token_rewards = torch.zeros(rollout.input_ids.shape, dtype=torch.float32)
        P = rollout.prompt_width
        for row, text in enumerate(texts):
            aligned = align_scores(text, prefix[row, : lengths[row]], baseline=r.baseline, sample=row)
            scores[row] = aligned.score
            token_rewards[row, P: P + aligned.token_rewards.numel()] = aligned.token_rewards
        return scores.to(self.device), token_rewards.to(self.device)

    def score_rollout(self, rollout: Rollout, prompts: list[Prompt]):
        """Sequence scores, RED token rewards and the critic's values, chunked; row i answers ``prompts[i]``."""
        scores, token_rewards, values = [], [], []
        chunk, R = self.cfg.rollout.forward_batch_size, rollout.response_mask.shape[1]
        for start in range(0, rollout.input_ids.shape[0], chunk):
            part = rollout.select(torch.arange(start, min(start + chunk, rollout.input_ids.shape[0])))
            part_scores, part_token_rewards = self.reward_scores(part, prompts[start:start + chunk])
            scores.append(part_scores)
            token_rewards.append(part_token_rewards)
            values.append(self.critic(part.input_ids, part.attention_mask, part.prompt_width, R).float())
        return torch.cat(scores), torch.cat(token_rewards), torch.cat(values) * rollout.response_mask

    @torch.no_grad()
    def make_experience(self, rollout: Rollout, prompts: list[Prompt]) -> dict:
        cfg, mask = self.cfg, rollout.response_mask
        temperature, chunk, lp_chunk = cfg.generation.temperature, cfg.rollout.forward_batch_size, \
            cfg.rollout.logprob_chunk
        logprobs = rollout_logprobs(self.policy, rollout, temperature, chunk, lp_chunk, self.dtypes["policy"])
        ref_logprobs = rollout_logprobs(self.reference, rollout, temperature, chunk, lp_chunk, self.reference_dtype)
        scores, token_rewards, values = self.score_rollout(rollout, prompts)
        rm_rewards = mixed_rewards(cfg.reward.mode, scores, token_rewards, rollout.prompt_width, mask,
                                   cfg.reward.beta_c)
        # Padding after an EOS may itself be the EOS id (pad == EOS): only real tokens count.
        no_eos = ~((rollout.responses == self.eos_id) & mask.bool()).any(1)
        rm_rewards = apply_missing_eos_penalty(rm_rewards, no_eos, mask, cfg.reward.missing_eos_penalty)
        kl = kl_per_token(logprobs, ref_logprobs, cfg.reward.kl_estimator) * mask
        rewards = shape_rewards(rm_rewards, kl, mask, self.kl_controller.value, cfg.reward.whiten)
        advantages, returns = compute_gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        raw_advantages = advantages
        if cfg.ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
        k1 = (logprobs - ref_logprobs) * mask
        stats = {
            "reward/score": scores.mean().item(),
            "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
            "reward/rm_token_sum": rm_rewards.sum(1).mean().item(),
            "reward/total": rewards.sum(1).mean().item(),
            "kl/sequence": k1.sum(1).mean().item(),
            "kl/penalty_sequence": kl.sum(1).mean().item(),
            "kl/coef": self.kl_controller.value,
            "value/mean": masked_mean(values, mask).item(),
            "value/explained_variance": explained_variance(values, returns, mask),
            "advantage/mean": masked_mean(raw_advantages, mask).item(),
            "return/mean": masked_mean(returns, mask).item(),
            "response/length": mask.sum(1).mean().item(),
            "response/no_eos_fraction": no_eos.float().mean().item(),
        }
        return {"logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
                "penalty_kl": kl, "rm_rewards": rm_rewards, "raw_advantages": raw_advantages, "stats": stats}

    # ------------------------------------------------------------------ update

    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            where = (f"the last good checkpoint is {self.last_checkpoint} (continue with --resume)"
                     if self.last_checkpoint else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"step {self.step + 1}: the {name} is {value.item()}, not finite; the run stopped before updating "
                f"the models with it, and {where}")

    @contextlib.contextmanager
    def frozen_on_device(self):
        """With model.offload_frozen, the reference and reward model on run.device for the block, then back on
        the CPU; without it, nothing (they stay on run.device)."""
        frozen = (self.reference, self.reward_model)
        if not self.cfg.model.offload_frozen:
            yield
            return
        for model in frozen:
            model.to(self.device)
        try:
            yield
        finally:
            for model in frozen:
                model.to(self.frozen_home)

    def ppo_update(self, rollout: Rollout, exp: dict) -> dict:
        with checkpointing(self.policy, self.critic):
            return self._ppo_epochs(rollout, exp)

    def _ppo_epochs(self, rollout: Rollout, exp: dict) -> dict:
        p = self.cfg.ppo
        B = rollout.response_mask.shape[0]
        totals: dict[str, float] = {}  # per minibatch: losses and gradient norms
        micro_totals: dict[str, float] = {}  # per micro-batch: diagnostics
        minibatches = micro_steps = 0
        for _ in range(p.epochs):
            order = torch.randperm(B, generator=self.shuffle)
            for start in range(0, B, p.minibatch_size):
                minibatch = order[start:start + p.minibatch_size]
                losses, diagnostics = self.accumulate_gradients(rollout, exp, minibatch)
                # Both norms are checked before either model steps, so a NaN leaves both untouched.
                norms = {name: self._clip_grad(model) for name, model in (("policy", self.policy),
                                                                          ("critic", self.critic))}
                for name, norm in norms.items():
                    self._check_finite(f"{name} gradient norm", norm)
                for name, norm in norms.items():
                    self.optimizers[name].step()
                    self.schedulers[name].step()
                    losses[f"grad_norm/{name}"] = norm.item()
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + value
                for key, value in diagnostics.items():
                    micro_totals[key] = micro_totals.get(key, 0.0) + value
                minibatches += 1
                micro_steps += p.grad_accum_steps
        return {**{k: v / minibatches for k, v in totals.items()}, **{k: v / micro_steps for k, v in micro_totals.items()}}

    def accumulate_gradients(self, rollout: Rollout, exp: dict, minibatch: torch.Tensor) -> tuple[dict, dict]:
        """Zero both models' gradients and accumulate the minibatch's over ``ppo.grad_accum_steps``
        micro-batches. Every micro-batch's token sums are divided by the minibatch's token count, so
        the gradient is the same for any number of micro-batches. -> (losses of the minibatch,
        diagnostics summed over micro-batches)."""
        p = self.cfg.ppo
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        micro = p.minibatch_size // p.grad_accum_steps
        tokens = rollout.response_mask[minibatch.to(rollout.response_mask.device)].sum().clamp(min=1)
        losses: dict[str, float] = {}
        diagnostics: dict[str, float] = {}
        for micro_start in range(0, len(minibatch), micro):
            index = minibatch[micro_start:micro_start + micro].to(self.device)
            part_losses, part_diagnostics = self._micro_step(rollout.select(index), exp, index, tokens)
            for key, value in part_losses.items():
                losses[key] = losses.get(key, 0.0) + value
            for key, value in part_diagnostics.items():
                diagnostics[key] = diagnostics.get(key, 0.0) + value
        return losses, diagnostics

    def _clip_grad(self, model) -> torch.Tensor:
        limit = self.cfg.ppo.max_grad_norm
        parameters = [q for q in model.parameters() if q.grad is not None]
        return torch.nn.utils.clip_grad_norm_(parameters, limit if limit is not None else float("inf"))

    def _micro_step(self, part: Rollout, exp: dict, index: torch.Tensor, tokens: torch.Tensor) -> tuple[dict, dict]:
        """Backward of one micro-batch, its token sums divided by the minibatch's ``tokens``."""
        p = self.cfg.ppo
        mask = part.response_mask
        with autocast(self.device, self.dtypes["policy"]):
            # No entropy graph when its coefficient is 0: the entropy is then only logged.
            logprobs, entropies = response_logprobs(self.policy, part.input_ids, part.attention_mask,
                                                    part.prompt_width, self.cfg.generation.temperature,
                                                    self.cfg.rollout.logprob_chunk,
                                                    entropy="grad" if p.entropy_coef else "value")
        entropy = token_mean(entropies, mask, tokens)
        pg_loss, pg_stats = policy_loss(logprobs, exp["logprobs"][index], exp["advantages"][index], mask,
                                        p.clip_range, tokens)
        loss = pg_loss - p.entropy_coef * entropy if p.entropy_coef else pg_loss
        self._check_finite("policy loss", pg_loss)
        values = self.critic(part.input_ids, part.attention_mask, part.prompt_width, mask.shape[1]).float()
        vf_loss, vf_stats = value_loss(values, exp["values"][index], exp["returns"][index], mask, p.value_clip_range,
                                       tokens)
        self._check_finite("value loss", vf_loss)
        loss.backward()
        vf_loss.backward()
        losses = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "policy/entropy": entropy.item()}
        diagnostics = {"policy/clipfrac": pg_stats["clipfrac"].item(), "policy/approx_kl": pg_stats["approx_kl"].item(),
                       "value/clipfrac": vf_stats["clipfrac"].item()}
        return losses, diagnostics

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.sampler.next_batch(cfg.rollout.batch_size)
        prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], self.pad_id, self.device)
        rollout = generate_rollout(self.policy, prompt_ids, prompt_mask, cfg.generation, self.eos_id, self.pad_id,
                                   self.dtypes["policy"])
        t1 = time.perf_counter()
        with self.frozen_on_device():
            exp = self.make_experience(rollout, prompts)
        t2 = time.perf_counter()
        update = self.ppo_update(rollout, exp)
        t3 = time.perf_counter()
        self.kl_controller.update(exp["penalty_kl"].sum(1).mean().item(), cfg.rollout.batch_size)
        self.samples += cfg.rollout.batch_size
        tokens = rollout.response_mask.sum().item()
        row = {"step": self.step + 1, "samples": self.samples, **exp["stats"], **update,
               "lr/policy": self.schedulers["policy"].get_last_lr()[0],
               "lr/critic": self.schedulers["critic"].get_last_lr()[0],
               "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2, "time/step_s": t3 - t0,
               "throughput/tokens_per_s": tokens / (t3 - t0), "throughput/samples_per_s": len(prompts) / (t3 - t0)}
        if self.step == 0:
            row.update(self.data_counts)  # once, in the first step's row
        if self.sample_metrics is not None:
            row.update(self.sample_metrics(rollout.prompt_lists(), rollout.response_lists()))
        return row

    def _generate(self, model, prompts: list[Prompt], dtype: torch.dtype) -> list[tuple[list[Prompt], Rollout]]:
        """``model``'s responses to ``prompts`` (under autocast in ``dtype``), chunk by chunk, sampled with
        evaluation's fixed seed in a forked RNG: the training RNG is untouched, and the reference's responses are
        the starting policy's."""
        cfg, chunk = self.cfg, self.cfg.rollout.forward_batch_size
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        chunks = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.run.seed + 2)
            for start in range(0, len(prompts), chunk):
                batch = prompts[start:start + chunk]
                ids, mask = left_pad([p.ids for p in batch], self.pad_id, self.device)
                chunks.append((batch, generate_rollout(model, ids, mask, cfg.generation, self.eos_id, self.pad_id,
                                                       dtype)))
        return chunks

    @torch.no_grad()
    def sample_baseline(self) -> dict:
        """The reference's (by default the initial policy's) responses to the held-out prompts and their scores:
        what ``eval/win_rate`` compares with. Sampled once, kept in checkpoints."""
        responses, scores = [], []
        for batch, rollout in self._generate(self.reference, self.eval_prompts, self.reference_dtype):
            scores.append(self.reward_scores(rollout, batch)[0].float().cpu())
            responses += rollout.response_lists()
        return {"responses": responses, "scores": torch.cat(scores)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Sample once per held-out prompt with a fixed seed, leaving the training RNG untouched; score the
        responses, count how often they beat the reference's, and write ``samples/step-NNNNNN.*``."""
        if not self.eval_prompts:
            return {}
        with self.frozen_on_device():
            return self._evaluate()

    def _evaluate(self) -> dict:
        cfg = self.cfg
        if self.baseline is None:
            self.baseline = self.sample_baseline()
        chunk = cfg.rollout.forward_batch_size
        scores, kls, lengths, prompts, responses, token_rewards = [], [], [], [], [], []
        for batch, rollout in self._generate(self.policy, self.eval_prompts, self.dtypes["policy"]):
            logprobs = rollout_logprobs(self.policy, rollout, cfg.generation.temperature, chunk,
                                        cfg.rollout.logprob_chunk, self.dtypes["policy"])
            ref = rollout_logprobs(self.reference, rollout, cfg.generation.temperature, chunk,
                                   cfg.rollout.logprob_chunk, self.reference_dtype)
            part_scores, part_token_rewards = self.reward_scores(rollout, batch)
            scores.append(part_scores.float().cpu())
            kls.append((logprobs - ref).sum(1))
            lengths.append(rollout.response_mask.sum(1))
            prompts += rollout.prompt_lists()
            chunk_responses = rollout.response_lists()
            responses += chunk_responses
            response_rewards = red_rewards(part_token_rewards, rollout.prompt_width, rollout.response_mask).cpu()
            token_rewards += [row[:len(r)].tolist() for row, r in zip(response_rewards, chunk_responses)]
        scores = torch.cat(scores)
        baseline = self.baseline["scores"]
        wins = (scores > baseline).float() + 0.5 * (scores == baseline).float()  # a tie counts half
        row = {"eval/score": scores.mean().item(), "eval/kl_sequence": torch.cat(kls).mean().item(),
               "eval/response_length": torch.cat(lengths).mean().item(), "eval/win_rate": wins.mean().item()}
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        baseline_texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in self.baseline["responses"]]
        records = [{"prompt": p.text, "response": text, "score": score, "baseline_response": baseline_text,
                    "baseline_score": baseline_score, "win": win}
                   for p, text, score, baseline_text, baseline_score, win
                   in zip(self.eval_prompts, texts, scores.tolist(), baseline_texts, baseline.tolist(), wins.tolist())]
        if self.judge is not None:
            verdicts = check_verdicts(self.judge(list(self.eval_prompts), texts, baseline_texts), len(texts))
            row["eval/judge_win_rate"] = sum(verdicts) / len(verdicts)
            for record, verdict in zip(records, verdicts):
                record["judge"] = verdict
        pages = [{"prompt": p.text, "tokens": token_texts(self.tokenizer, r), "rewards": rewards, "score": score}
                 for p, r, rewards, score in zip(self.eval_prompts[:cfg.run.sample_pages], responses, token_rewards,
                                                 scores.tolist())]
        write_samples(self.out / "samples", self.step, records, pages)
        if self.sample_metrics is not None:
            row.update({f"eval/{k}": v for k, v in self.sample_metrics(prompts, responses).items()})
        return row

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "step": self.step, "samples": self.samples, "config": to_dict(self.cfg),
            "policy": self.policy.state_dict(), "critic": self.critic.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "kl_controller": self.kl_controller.state_dict(), "sampler": self.sampler.state_dict(),
            "shuffle": self.shuffle.get_state(), "rng": ckpt.rng_state(),
            "threads": torch.get_num_threads(), "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = _flatten(to_dict(self.cfg)), _flatten(state["config"])
        allowed = set(RESUMABLE_CHANGES)
        if self.cfg.optim.schedule == "constant" and mine["run.total_steps"] >= state["step"]:
            allowed.add("run.total_steps")  # training longer: nothing done so far depended on the length
        # A key the checkpoint does not know (written by an older red_ppo) is no change while it keeps its default.
        defaults = _flatten(to_dict(type(self.cfg)()))
        new_at_default = {k for k in set(mine) - set(theirs) if k in defaults and mine[k] == defaults[k]}
        changed = sorted(k for k in set(mine) | set(theirs)
                         if mine.get(k) != theirs.get(k) and k not in allowed | new_at_default)
        if changed:
            details = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {mine.get(k)!r}" for k in changed[:5])
            raise ConfigError(f"--resume: expected the configuration of the interrupted run, got changes in "
                              f"{changed} ({details}); only {sorted(allowed)} may change")
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        for name in self.optimizers:
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.shuffle.set_state(state["shuffle"])
        ckpt.restore_rng_state(state["rng"])
        self.step, self.samples = state["step"], state["samples"]
        self.baseline = state.get("baseline")  # absent from checkpoints of older versions: sampled again

    def save(self) -> Path:
        self.last_checkpoint = ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.state_dict(),
                                                    self.cfg.run.keep_checkpoints, (self.policy, self.tokenizer))
        return self.last_checkpoint

    def save_final(self) -> None:
        folder = self.out / "final"
        if self.cfg.model.lora is None:
            ckpt.save_pretrained_atomic(folder / "policy", self.policy, self.tokenizer)
        else:
            save_adapters_and_merged(self.policy, folder / "policy_adapter", folder / "policy")
            self.tokenizer.save_pretrained(folder / "policy")
        ckpt.atomic_save(self.critic.state_dict(), folder / "critic.pt")

    # ------------------------------------------------------------------ the loop

    def _prepare_folder(self, resume: bool) -> int | None:
        if resume:
            path = ckpt.latest_checkpoint(self.out / "checkpoints")
            if path is None:
                raise ConfigError(f"--resume: expected a checkpoint in {self.out / 'checkpoints'}, found none")
            self.load_state_dict(ckpt.load_checkpoint(path))
            self.last_checkpoint = path
            drop_samples_after(self.out / "samples", self.step)
            return self.step
        if (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists():
            if not self.cfg.run.overwrite:
                raise ConfigError(f"run.output_dir: expected a folder without a previous run, got {str(self.out)!r} "
                                  f"which holds one; continue it with --resume or set run.overwrite=true")
            for name in ("checkpoints", "tb", "samples", "final"):
                shutil.rmtree(self.out / name, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        return None

    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True

    def train(self, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Run to ``run.total_steps`` (or stop after step ``stop_after``, with a checkpoint).

        SIGINT/SIGTERM finish the current step, write a checkpoint and return; a second one aborts.
        """
        cfg = self.cfg
        resume_step = self._prepare_folder(resume)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log = MetricsLog(self.out, resume_step, cfg.run.report_to, to_dict(cfg), cfg.run.wandb_project)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        history = []
        # disable=None: a live bar on a terminal, nothing when the console is a log file.
        bar = tqdm(total=cfg.run.total_steps, initial=self.step, disable=None if cfg.run.progress else True,
                   dynamic_ncols=True, desc=self.out.name, unit="step")
        try:
            if resume_step is None and cfg.run.eval_every:
                row = {"step": 0, "samples": 0, **self.evaluate()}  # the starting policy, for reference
                log.write(row)
                history.append(row)
            while self.step < cfg.run.total_steps:
                row = self.train_step()
                self.step += 1
                last = self.step == cfg.run.total_steps
                if last or (cfg.run.eval_every and self.step % cfg.run.eval_every == 0):
                    row.update(self.evaluate())
                log.write(row)
                history.append(row)
                stop = self._stop_requested or (stop_after is not None and self.step >= stop_after)
                if last or stop or (cfg.run.save_every and self.step % cfg.run.save_every == 0):
                    self.save()
                bar.update(1)
                bar.set_postfix({name: f"{row[k]:.3g}" for name, k in POSTFIX if row.get(k) is not None}, refresh=False)
                if stop:
                    break
        finally:
            bar.close()
            log.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.step == cfg.run.total_steps:
            self.save_final()
            from red_ppo.plot import plot_runs
            plot_runs([self.out], self.out / "reward_curves.png")
        return history
