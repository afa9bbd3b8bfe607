"""``red-ppo diagnose``: will RED help with this reward model? A check that needs no ground truth.

With gamma = 1, RED's token rewards ``r_t = s_t - s_{t-1}`` are the sparse reward plus potential-based
shaping by the reward model's prefix scores ``s_t``; they can only help PPO by assigning credit sooner, and
they assign it well when ``s_t`` is a good value estimate of the reward model's own final score under the
policy. `diagnose` measures that directly: for prefixes of the policy's own responses it compares ``r_t``
with the Monte-Carlo advantage ``A_t = V(y<=t) - V(y<t)``, where ``V`` is the mean final score of policy
continuations from the prefix. `verdict` reads the result against reward sources whose RED gain was measured
(``diagnose_validation.json``, written from the study).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from red_ppo.data import Prompt, load_prompts
from red_ppo.models import build_model, check_resources, freeze, model_dtypes
from red_ppo.rollout import Rollout, check_prefix_scores, generate_rollout, left_pad, reward_model_mask
from red_ppo.samples import reward_page, token_texts
from red_ppo.synthetic import spearman
from red_ppo.trainer import PPOTrainer, resolve_device, seed_everything

VALIDATION_PATH = Path(__file__).with_name("diagnose_validation.json")
RESAMPLES = 2000
EXAMPLES = 8


def _check_count(name: str, value, least: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected an integer >= {least} ({meaning}), got {value!r}")


def _score_rows(score_fn, rows: list[tuple[list[int], list[int]]], pad_id: int, device,
                batch_size: int) -> list[tuple[float, np.ndarray, float]]:
    """Each (prompt ids, response ids) row scored as the trainer scores a rollout: left-padded prompts, the
    responses after them, ``score_fn`` under `reward_model_mask`. Returns per row (the prompt's score ``s_{-1}``,
    the prefix scores of the scored response tokens [n] float64, the sequence score at the last scored token)."""
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        prompt_ids, prompt_mask = left_pad([p for p, _ in part], pad_id, device)
        width = max(1, max(len(r) for _, r in part))
        responses = torch.full((len(part), width), pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(part), width))
        for i, (_, response) in enumerate(part):
            responses[i, :len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask[i, :len(response)] = 1
        responses, response_mask = responses.to(device), response_mask.to(device)
        rollout = Rollout(torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, response_mask.long()], 1),
                          prompt_ids.shape[1], response_mask)
        mask = reward_model_mask(rollout, pad_id)
        P = rollout.prompt_width
        scores = score_fn(rollout.input_ids, mask, P)
        check_prefix_scores("score_fn", scores, mask, "the rows'")
        scores = scores.detach().float().cpu().double().numpy()
        mask = mask.cpu().numpy()
        for i in range(len(part)):
            scored = int(mask[i, P:].sum())
            last = int(np.flatnonzero(mask[i])[-1])  # the sequence score: the last scored token (the prompt's if none)
            out.append((float(scores[i, P - 1]), scores[i, P:P + scored].copy(), float(scores[i, last])))
    return out


def _sample(policy, heads: list[list[int]], budgets: list[int], generation, eos_id: int, pad_id: int, device,
            batch_size: int, log, what: str) -> list[list[int]]:
    """One policy continuation of each token list in ``heads`` (fed as a prompt), at most ``budgets[i]`` tokens,
    up to and including the first EOS. Rows go longest budget first, ``batch_size`` per generate call, each
    call sampling its largest budget and every row cut to its own (the same distribution as that budget)."""
    order = sorted(range(len(heads)), key=lambda i: -budgets[i])
    out: list[list[int]] = [[] for _ in heads]
    for done, start in enumerate(range(0, len(order), batch_size), 1):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([heads[i] for i in rows], pad_id, device)
        gen = dataclasses.replace(generation, max_new_tokens=budgets[rows[0]])
        for i, response in zip(rows, generate_rollout(policy, ids, mask, gen, eos_id, pad_id).response_lists()):
            out[i] = response[:budgets[i]]
        if done % 20 == 0:
            log(f"diagnose: {what}: {min(start + batch_size, len(order))}/{len(order)} rows")
    return out


def _interval(values: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    denominator = float((x * x).sum())
    return float((x * (y - y.mean())).sum() / denominator) if denominator > 0 else math.nan


def diagnose(policy, tokenizer, prompts: list[Prompt], score_fn, *, prefixes: int = 160, continuations: int = 32,
             generation, seed: int = 0, batch_size: int = 256, device=None, log=print) -> dict:
    """How well RED's token rewards from ``score_fn`` track the policy's Monte-Carlo advantage under that score.

    ``score_fn(input_ids, attention_mask, response_start) -> [B, T]`` prefix scores: `PPOTrainer`'s
    ``reward_fn`` contract (left-padded prompts of width ``response_start``, then the responses; the mask is
    `reward_model_mask`, the tokens the trainer scores). ``generation``: `red_ppo.config.GenerationConfig`.

    Method. ``prefixes`` responses are sampled from ``policy``, one per prompt of a seeded shuffle of
    ``prompts`` (cycling when there are fewer prompts), and each gives one prefix: a position ``t`` drawn
    uniformly among its scored tokens. There ``r_t = s_t - s_{t-1}`` (``s_{-1}``: the prompt's score, RED's
    baseline ``"prompt"``), ``V(y<=t)`` and ``V(y<t)`` are the mean sequence scores of ``continuations``
    policy continuations of ``prompt + y<=t`` and ``prompt + y<t`` (the same sampling settings, the budget that
    remains of ``max_new_tokens``; a prefix that ends with EOS or fills the budget is its own completion), and
    ``A_t = V(y<=t) - V(y<t)``.

    Returns (floats; nan where undefined):

    * ``consistency``: Spearman's rho of ``r_t`` against ``A_t`` over the prefixes, ``consistency_ci95``;
    * ``calibration_slope``: the OLS slope of ``V(y<=t)`` on ``s_t`` (1: ``s_t`` is, on average, a calibrated
      estimate of the final score it leads to; below 1: the prefix scores over-state the differences between
      prefixes), ``calibration_slope_ci95``;
    * ``advantage_se_mean``: the mean Monte-Carlo standard error of ``A_t`` (sample sd over continuations /
      sqrt(K), both values), beside ``advantage_sd``, the spread of ``A_t`` over prefixes: where the error is
      not small against the spread, the consistency is pulled toward 0 by noise and K should grow;
    * ``responses``, ``prefixes``, ``continuations``, ``seconds``, ``interval_method``;
    * ``prefix_table``: one row per prefix; ``examples``: the first responses as `reward_page` samples.

    Intervals: a percentile bootstrap over the responses (``RESAMPLES`` resamples). Each response gives
    exactly one prefix, so the prefixes are independent draws given the prompt set, and the bootstrap over
    them is the clustered bootstrap over responses without needing cluster weights. Its coverage is close to
    nominal at these counts (simulated on bivariate normal data: 94-97% at 60 and 240 prefixes); the
    percentile bootstrap under-covers at the handful of seeds the study warns about, not here. The intervals
    hold the prompt set fixed and include the Monte-Carlo noise of ``A_t``, which attenuates rho (it never
    inflates it). Resamples whose rho or slope is undefined (constant values) are left out of the interval.

    Deterministic given ``seed``: the torch RNG is forked (the caller's state is left as it was) and seeded.
    """
    _check_count("prefixes", prefixes, 1, "prefixes to measure, one per sampled response")
    _check_count("continuations", continuations, 2, "policy continuations per prefix; 2 at least for an error")
    _check_count("batch_size", batch_size, 1, "rows per generate call and per score_fn call")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    if not prompts or not all(isinstance(p, Prompt) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of red_ppo.data.Prompt, got {prompts!r:.200}")
    if not callable(score_fn):
        raise TypeError(f"score_fn: expected a callable (input_ids, attention_mask, response_start) -> [B, T] "
                        f"prefix scores, got {type(score_fn).__name__}")
    _check_count("generation.max_new_tokens", getattr(generation, "max_new_tokens", None), 1,
                 "a red_ppo.config.GenerationConfig")
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    pad_id, eos_id, budget = tokenizer.pad_token_id, tokenizer.eos_token_id, generation.max_new_tokens
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        order = rng.permutation(len(prompts))
        chosen = [prompts[order[i % len(prompts)]] for i in range(prefixes)]
        responses = _sample(policy, [p.ids for p in chosen], [budget] * prefixes, generation, eos_id, pad_id, device,
                            batch_size, log, "responses")
        scored = _score_rows(score_fn, [(p.ids, r) for p, r in zip(chosen, responses)], pad_id, device, batch_size)
        kept = [i for i, (_, s, _) in enumerate(scored) if s.size]  # pad == EOS: a lone EOS has no scored token
        if not kept:
            raise ValueError(f"policy: expected responses with a token to score, got {prefixes} responses that are "
                             f"each an EOS alone (the trainer scores none of them when the pad id is the EOS id)")
        positions = {i: int(rng.integers(scored[i][1].size)) for i in kept}
        # Two heads per prefix: y<=t, then y<t. Finished heads are their own completion.
        heads = [(chosen[i].ids, responses[i][:positions[i] + cut]) for i in kept for cut in (1, 0)]
        finished = [len(h) == budget or bool(h) and h[-1] == eos_id for _, h in heads]
        todo = [j for j, done in enumerate(finished) if not done]
        rows = [j for j in todo for _ in range(continuations)]
        log(f"diagnose: {len(kept)} prefixes, {len(rows)} continuations to sample")
        tails = _sample(policy, [heads[j][0] + heads[j][1] for j in rows], [budget - len(heads[j][1]) for j in rows],
                        generation, eos_id, pad_id, device, batch_size, log, "continuations")
        completed = [(heads[j][0], heads[j][1] + tail) for j, tail in zip(rows, tails)]
        completed += [heads[j] for j, done in enumerate(finished) if done]
        finals = [score for _, _, score in _score_rows(score_fn, completed, pad_id, device, batch_size)]
    per_head: dict[int, list[float]] = {}
    for j, score in zip(rows + [j for j, done in enumerate(finished) if done], finals):
        per_head.setdefault(j, []).append(score)
    values = np.array([np.mean(per_head[j]) for j in range(len(heads))])
    variances = np.array([np.var(per_head[j], ddof=1) / len(per_head[j]) if len(per_head[j]) > 1 else 0.0
                          for j in range(len(heads))])
    v_after, v_before = values[0::2], values[1::2]
    advantage, advantage_se = v_after - v_before, np.sqrt(variances[0::2] + variances[1::2])
    s_t = np.array([scored[i][1][positions[i]] for i in kept])
    s_prev = np.array([scored[i][1][positions[i] - 1] if positions[i] else scored[i][0] for i in kept])
    r_t = s_t - s_prev

    boot = np.random.default_rng(seed + 1)
    n = len(kept)
    rhos, slopes = np.empty(RESAMPLES), np.empty(RESAMPLES)
    for b in range(RESAMPLES):
        pick = boot.integers(n, size=n)
        rhos[b], slopes[b] = spearman(r_t[pick], advantage[pick]), _slope(s_t[pick], v_after[pick])
    table = [{"response": i, "t": positions[i], "token_reward": float(r), "prefix_score": float(s),
              "value_after": float(va), "value_before": float(vb), "advantage": float(a), "advantage_se": float(se)}
             for i, r, s, va, vb, a, se in zip(kept, r_t, s_t, v_after, v_before, advantage, advantage_se)]
    examples = []
    for i in range(min(EXAMPLES, len(responses))):
        prompt_score, prefix_scores, score = scored[i]
        rewards = np.diff(np.concatenate([[prompt_score], prefix_scores])).tolist()
        rewards += [0.0] * (len(responses[i]) - len(rewards))  # an unscored trailing EOS (pad == EOS) gets none
        examples.append({"prompt": chosen[i].text, "tokens": token_texts(tokenizer, responses[i]),
                         "rewards": rewards, "score": score})
    return {
        "consistency": spearman(r_t, advantage), "consistency_ci95": _interval(rhos),
        "calibration_slope": _slope(s_t, v_after), "calibration_slope_ci95": _interval(slopes),
        "advantage_se_mean": float(advantage_se.mean()),
        "advantage_sd": float(advantage.std(ddof=1)) if n > 1 else math.nan,
        "responses": prefixes, "prefixes": n, "continuations": continuations,
        "seconds": time.perf_counter() - began,
        "interval_method": f"percentile bootstrap over responses, one prefix each, {RESAMPLES} resamples",
        "prefix_table": table, "examples": examples,
    }


# ---------------------------------------------------------------------------------------------------- the command

class RewardModelScores:
    """A configured reward model as a ``score_fn``, scored by `PPOTrainer`'s own methods (``reward_scores``:
    the fused op, ``reward.clip``; with a tokenizer of its own, the chat template and the cross-tokenizer
    alignment) on an object that holds only what they read, so no critic, reference or optimiser is built.

    Those methods return the sequence score and RED's token rewards under ``reward.baseline = "prompt"`` (set
    here whatever the run uses: the diagnostic measures every prefix score against the prompt's); the prefix
    scores are rebuilt from them: ``s_{-1} = score - sum(r)``, ``s_t = s_{-1} + r_0 + ... + r_t``, the last
    scored token's set to the sequence score itself. Rows are matched to their `Prompt` (a conversation's
    messages, for the reward model's template) by the prompt's token ids."""

    reward_scores = PPOTrainer.reward_scores
    cross_tokenizer_scores = PPOTrainer.cross_tokenizer_scores

    def __init__(self, cfg, tokenizer, rm_tokenizer, reward_model, prompts: list[Prompt], device) -> None:
        self.cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, baseline="prompt"))
        self.tokenizer, self.rm_tokenizer, self.reward_model = tokenizer, rm_tokenizer, reward_model
        self.device, self.pad_id, self.reward_fn = device, tokenizer.pad_token_id, None
        self.prompts: dict[tuple, Prompt] = {}
        for prompt in prompts:
            known = self.prompts.setdefault(tuple(prompt.ids), prompt)
            if known.messages != prompt.messages:
                raise ValueError(f"prompts: expected conversations with different token ids to differ, got two "
                                 f"that the policy's template renders alike: {known.messages!r:.120} and "
                                 f"{prompt.messages!r:.120}")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
        P = response_start
        rollout = Rollout(input_ids, attention_mask, P, attention_mask[:, P:].float())
        scores, token_rewards = self.reward_scores(rollout, [self.prompts[tuple(p)] for p in rollout.prompt_lists()])
        rewards = token_rewards[:, P:].double() * rollout.response_mask.double()
        scores = scores.double()
        prefix = torch.zeros(input_ids.shape, dtype=torch.float64, device=input_ids.device)
        prefix[:, P - 1] = scores - rewards.sum(1)
        prefix[:, P:] = prefix[:, P - 1: P] + rewards.cumsum(1)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(attention_mask)
        last = columns.masked_fill(attention_mask == 0, -1).amax(1)
        prefix[torch.arange(input_ids.shape[0], device=input_ids.device), last] = scores
        return prefix


def run_diagnose(cfg, output: Path | None = None, prefixes: int = 160, continuations: int = 32,
                 validation: Path = VALIDATION_PATH, log=print) -> dict:
    """``red-ppo diagnose``: the configured policy (as `red-ppo train` starts it), reward model and prompts
    (all of them); ``diagnose.json`` and ``diagnose.html`` in ``output`` (default ``run.output_dir/diagnose``).
    Generation and scoring go ``rollout.forward_batch_size`` rows at a time; the seed is ``run.seed``."""
    _check_count("prefixes", prefixes, 1, "prefixes to measure, one per sampled response")
    _check_count("continuations", continuations, 2, "policy continuations per prefix; 2 at least for an error")
    sources = load_validation(validation)
    tokenizer, rm_tokenizer = check_resources(cfg)
    device = resolve_device(cfg.run.device)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    prompts, _ = load_prompts(cfg, tokenizer)
    seed_everything(cfg.run.seed)  # models without a path start from the run's seed
    dtypes = model_dtypes(cfg)
    policy = freeze(build_model(cfg.model.policy, tokenizer, "causal_lm", cfg, dtypes["policy"])).to(device)
    reward_model = freeze(build_model(cfg.model.reward_model, rm_tokenizer or tokenizer, "seq_cls", cfg,
                                      dtypes["reward_model"])).to(device)
    score_fn = RewardModelScores(cfg, tokenizer, rm_tokenizer, reward_model, prompts, device)
    result = diagnose(policy, tokenizer, prompts, score_fn, prefixes=prefixes, continuations=continuations,
                      generation=cfg.generation, seed=cfg.run.seed, batch_size=cfg.rollout.forward_batch_size,
                      device=device, log=log)
    line = verdict(result, sources)
    folder = Path(output) if output is not None else Path(cfg.run.output_dir) / "diagnose"
    written = write_report(result, line, folder)
    log(summary(result, line))
    log(f"wrote {written[0]} and {written[1]}")
    return dict(result, verdict=line)


# ---------------------------------------------------------------------------------------------------- the verdict

def _check_validation(validation) -> list[dict]:
    if not isinstance(validation, list):
        raise ValueError(f"validation: expected a list of measured reward sources, got {type(validation).__name__}")
    for index, source in enumerate(validation):
        where = f"validation[{index}]"
        if not isinstance(source, dict) or not isinstance(source.get("name"), str):
            raise ValueError(f"{where}: expected a dict with a 'name' string, got {source!r:.200}")
        for key in ("consistency", "gain"):
            value = source.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}.{key}: expected a finite number, got {value!r}")
            interval = source.get(f"{key}_ci95")
            if not (isinstance(interval, (list, tuple)) and len(interval) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in interval) and interval[0] <= interval[1]):
                raise ValueError(f"{where}.{key}_ci95: expected [lo, hi] finite with lo <= hi, got {interval!r}")
    return validation


def thresholds(validation: list[dict]) -> dict:
    """The verdict's thresholds, from the measured sources alone.

    A source *helped* when its gain interval lies above 0 (``gain_ci95[0] > 0``); otherwise (the interval
    reaches 0 or below) it *did not help*. ``helps_above`` is the lowest consistency of a source that helped,
    ``no_help_below`` the highest consistency of one that did not (None where there is no such source). The
    validation *separates* when both exist and ``no_help_below < helps_above``: then every source at or above
    ``helps_above`` helped and every one at or below ``no_help_below`` did not."""
    sources = _check_validation(validation)
    helped = [s["consistency"] for s in sources if s["gain_ci95"][0] > 0]
    not_helped = [s["consistency"] for s in sources if s["gain_ci95"][0] <= 0]
    helps_above = min(helped) if helped else None
    no_help_below = max(not_helped) if not_helped else None
    return {"helps_above": helps_above, "no_help_below": no_help_below,
            "separates": helps_above is not None and no_help_below is not None and no_help_below < helps_above}


def _nearest(consistency: float, sources: list[dict], count: int = 2) -> str:
    near = sorted(sources, key=lambda s: abs(s["consistency"] - consistency))[:count]
    return "; ".join(f"{s['name']} (consistency {s['consistency']:.2f}, RED - sparse gain {s['gain']:+.2f} "
                     f"[{s['gain_ci95'][0]:+.2f}, {s['gain_ci95'][1]:+.2f}])" for s in near)


def verdict(result: dict, validation: list[dict]) -> str:
    """One line: which side of the validated thresholds (`thresholds`) the consistency falls on and how sure.

    * no validated source: ``"no validation data: numbers without a verdict"``;
    * a validation that does not separate (one side missing, or a source that did not help at or above the
      lowest one that did): no verdict, the nearest validated sources named;
    * otherwise: *helps* when the whole 95% interval is at or above ``helps_above``, *does not help* when it is at
      or below ``no_help_below``; *probably* either when only the point estimate is, the interval reaching
      across; *undecided* when the point lies between the thresholds. The nearest validated sources are named.
    """
    sources = _check_validation(validation)
    if not sources:
        return "no validation data: numbers without a verdict"
    rho, (lo, hi) = result["consistency"], result["consistency_ci95"]
    if not all(math.isfinite(v) for v in (rho, lo, hi)):
        return (f"no verdict: the consistency is undefined (RED's token rewards or the Monte-Carlo advantages are "
                f"constant over the prefixes); more prefixes or another prompt set may help")
    limits = thresholds(sources)
    measured = f"consistency {rho:.2f} [{lo:.2f}, {hi:.2f}]"
    nearest = f"nearest validated sources: {_nearest(rho, sources)}"
    if not limits["separates"]:
        return (f"no verdict: the validation does not separate reward sources where RED helped from those where it "
                f"did not (lowest consistency that helped: {limits['helps_above']}, highest that did not: "
                f"{limits['no_help_below']}); {measured}; {nearest}")
    up, down = limits["helps_above"], limits["no_help_below"]
    if lo >= up:
        line = f"RED likely helps: {measured} lies wholly at or above {up:.2f}, where every validated source helped"
    elif hi <= down:
        line = (f"RED likely does not help: {measured} lies wholly at or below {down:.2f}, where no validated source "
                f"helped")
    elif rho >= up:
        line = (f"RED probably helps, not sure: {measured} is at or above {up:.2f} (every validated source there "
                f"helped) but its interval reaches below")
    elif rho <= down:
        line = (f"RED probably does not help, not sure: {measured} is at or below {down:.2f} (no validated source "
                f"there helped) but its interval reaches above")
    else:
        line = (f"undecided: {measured} lies between {down:.2f} (highest consistency where RED did not help) and "
                f"{up:.2f} (lowest where it helped)")
    return f"{line}; {nearest}"


def load_validation(path: Path = VALIDATION_PATH) -> list[dict]:
    """The measured reward sources of ``path`` (``{"source": ..., "sources": [...]}``); none when it is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "sources" not in data:
        raise ValueError(f"{path}: expected a JSON object with a 'sources' list, got {str(data)[:200]}")
    return _check_validation(data["sources"])


# ---------------------------------------------------------------------------------------------------- the report

def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def summary(result: dict, line: str) -> str:
    """The numbers and the verdict, as printed."""
    lo, hi = result["consistency_ci95"]
    slo, shi = result["calibration_slope_ci95"]
    return (f"consistency (Spearman of RED token rewards against the Monte-Carlo advantage): "
            f"{result['consistency']:.3f} [{lo:.3f}, {hi:.3f}]\n"
            f"calibration slope (Monte-Carlo value on the prefix score): {result['calibration_slope']:.3f} "
            f"[{slo:.3f}, {shi:.3f}]\n"
            f"Monte-Carlo error of A_t: {result['advantage_se_mean']:.3g} (mean) against its spread "
            f"{result['advantage_sd']:.3g} (sd over prefixes)\n"
            f"{result['prefixes']} prefixes of {result['responses']} responses, {result['continuations']} "
            f"continuations each, {result['seconds']:.1f} s\n"
            f"verdict: {line}")


def write_report(result: dict, line: str, folder: Path) -> tuple[Path, Path]:
    """``diagnose.json`` (the result with the verdict line; nan as null) and ``diagnose.html`` (the example
    responses, every token shaded by its RED reward) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _json_safe(dict(result, verdict=line))
    (folder / "diagnose.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    page = reward_page(0, result["examples"], title="RED token rewards of the policy's responses (red-ppo diagnose)")
    (folder / "diagnose.html").write_text(page, encoding="utf-8")
    return folder / "diagnose.json", folder / "diagnose.html"
