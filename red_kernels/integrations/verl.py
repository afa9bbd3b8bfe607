"""RED in verl (>= 0.9): a reward manager that turns the served reward model's per-token scores into dense
``rm_scores`` on the policy's own tokens.

verl's discriminative reward path (``RewardLoopWorker.compute_score_disrm``) renders the prompt's chat plus
the decoded response with the reward model's tokenizer and chat template, posts it to vLLM's ``/classify`` and
keeps one float. `REDRewardManager` renders the same text (with verl's own function), asks vLLM's ``/pooling``
for ``token_classify`` (the same head at every token, raw with ``use_activation: False``), aligns those
prefix scores to the policy's tokens with `red_kernels.redistribute_across_tokenizers` and returns the row
(the locate-align-row steps are `red_kernels.cross_tokenizer`'s, which red_ppo uses too); its
`assemble_rm_scores` writes the rows into ``rm_scores``. Routing (see docs/verl.md):

    reward.reward_model.enable=True  reward.reward_model.enable_resource_pool=False
    reward.custom_reward_function.path=pkg://red_kernels.integrations.verl   (makes verl call run_single)
    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://red_kernels.integrations.verl
    reward.reward_manager.name=REDRewardManager
    +reward.reward_kwargs.red.mode=red  (+ .baseline=prompt|zero, .beta_c=1.0, .scorer=vllm|hf)

This module imports verl; the core package never imports it.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import torch

from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from red_kernels.cross_tokenizer import (align_scores, locate_response, policy_response, reward_model_text,
                                         reward_row)
from red_kernels.reward_mix import check_reward_mix

__all__ = ["HFTokenScorer", "REDRewardManager", "VLLMTokenScorer", "compute_score", "locate_response",
           "parse_token_classify_response", "red_settings"]

DEFAULTS = {"mode": "red", "baseline": "prompt", "beta_c": 1.0, "scorer": "vllm", "max_retries": 3}


def compute_score(*args, **kwargs):
    """The ``custom_reward_function`` that makes verl hand each sample to `REDRewardManager.run_single`.

    verl calls a manager's ``run_single`` with a reward model enabled only when
    ``reward.custom_reward_function.path`` is set; `REDRewardManager` never calls this function.
    """
    raise RuntimeError("red_kernels.integrations.verl.compute_score only routes verl to REDRewardManager; "
                       "set reward.reward_manager.name=REDRewardManager (source importlib)")


def red_settings(config) -> dict:
    """``reward.reward_kwargs.red`` of a verl config, over `DEFAULTS`, checked."""
    reward = config.get("reward", {}) if hasattr(config, "get") else {}
    given = dict((reward.get("reward_kwargs", {}) or {}).get("red", {}) or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"reward.reward_kwargs.red: unknown keys {unknown}; expected some of {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **given}
    check_reward_mix(settings, prefix="reward.reward_kwargs.red.")
    checks = [("scorer", settings["scorer"] in ("vllm", "hf"), "'vllm' or 'hf'"),
              ("max_retries", isinstance(settings["max_retries"], int) and settings["max_retries"] >= 1,
               "an int >= 1")]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"reward.reward_kwargs.red.{key}: expected {expected}, got {settings[key]!r}")
    return settings


def sample_name(data: DataProto, index: int | None = None) -> str:
    """How errors name a sample: its row in the batch (``index``, where known) and its ``uid`` where verl set
    one. ``run_single`` sees a one-row slice, so it names the sample by uid alone."""
    uids = data.non_tensor_batch.get("uid") if data.non_tensor_batch else None
    uid = uids[index or 0] if uids is not None and len(uids) > (index or 0) else None
    if index is None:
        return f"uid {uid}" if uid is not None else "(no uid in non_tensor_batch)"
    return f"{index} (uid {uid})" if uid is not None else str(index)


# --- the scores: vLLM's /pooling token_classify, or the same answer from a Hugging Face model in-process -------
def parse_token_classify_response(body: Any, *, sample) -> torch.Tensor:
    """The ``[n_tokens]`` float64 scores in vLLM's ``/pooling`` answer to one ``token_classify`` request.

    The answer is ``{"data": [{"index": 0, "object": "pooling", "data": [[s_0], ..., [s_n-1]]}], ...}``: one
    item per input, one row per token, one column per label. A reward model has one label.
    """
    expected = 'expected {"data": [{"data": [[score], ...]}]} (token_classify of a one-label model)'
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        raise ValueError(f"sample {sample}: the reward model's /pooling answer: {expected}, got "
                         f"{str(body)[:200]}")
    rows = items[0].get("data")
    if (not isinstance(rows, list) or not rows
            or not all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], (int, float))
                       and not isinstance(r[0], bool) for r in rows)):
        got = rows if not isinstance(rows, list) else f"{len(rows)} rows, the first {rows[:1]}"
        raise ValueError(f"sample {sample}: the reward model's /pooling answer: {expected}, got "
                         f"{str(got)[:200]}")
    return torch.tensor([r[0] for r in rows], dtype=torch.float64)


class VLLMTokenScorer:
    """Per-token raw scores from a vLLM server (through verl's reward router) via ``/pooling``.

    vLLM serves a ``*ForSequenceClassification`` checkpoint as a pooling model whose ``token_classify`` task
    applies the score head at every token; ``use_activation: False`` keeps the raw scores that verl's
    ``/classify`` request keeps. The text is sent as verl sends it; vLLM tokenizes it with
    ``add_special_tokens=True`` (its default for a text input).
    """

    def __init__(self, router_address: str, model: str | None, *, max_retries: int = 3, backoff_s: float = 1.0):
        if not router_address:
            raise ValueError("router_address: expected verl's reward router address (host:port), got "
                             f"{router_address!r}; is reward.reward_model.enable True?")
        self.url = f"http://{router_address}/pooling"
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def request(self, text: str) -> dict:
        return {"model": self.model, "input": text, "task": "token_classify", "use_activation": False}

    async def post(self, payload: dict, *, sample) -> Any:
        import aiohttp

        error = None
        for attempt in range(self.max_retries):
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
                    async with session.post(self.url, json=payload) as response:
                        if response.status >= 400:
                            text = (await response.text())[:300]
                            error = RuntimeError(f"sample {sample}: the reward model server answered HTTP "
                                                 f"{response.status} to POST {self.url}: {text}")
                            if response.status < 500:
                                raise error
                        else:
                            return await response.json(content_type=None)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                error = RuntimeError(f"sample {sample}: could not reach the reward model server at {self.url}: "
                                     f"{type(e).__name__}: {e}")
            if attempt + 1 < self.max_retries:
                await asyncio.sleep(self.backoff_s * 2 ** attempt)
        raise error

    async def score(self, text: str, *, sample) -> torch.Tensor:
        return parse_token_classify_response(await self.post(self.request(text), sample=sample), sample=sample)


class HFTokenScorer:
    """What vLLM's ``token_classify`` returns, from a Hugging Face reward model in-process (tests, small runs).

    The text is tokenized as vLLM does (``add_special_tokens=True``) and scored in one forward by
    `red_kernels.hf.score_prefixes`: the score head at every token, no activation.
    """

    def __init__(self, model, tokenizer, *, model_name: str = "hf-in-process"):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name

    def pooling_response(self, text: str) -> dict:
        """vLLM's ``/pooling`` answer shape for one ``token_classify`` request."""
        from red_kernels.hf import score_prefixes

        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = score_prefixes(self.model, torch.tensor([ids], device=device), None, 0, baseline="zero")
        rows = [[float(s)] for s in out.scores[0].cpu().tolist()]
        return {"id": "pool-in-process", "object": "list", "model": self.model_name,
                "data": [{"index": 0, "object": "pooling", "data": rows}],
                "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}}

    async def score(self, text: str, *, sample) -> torch.Tensor:
        return parse_token_classify_response(self.pooling_response(text), sample=sample)


class REDRewardManager(RewardManagerBase):
    """verl reward manager: RED (``mode: red``) or the usual last-token score (``mode: sparse``) from a served
    reward model whose tokenizer may differ from the policy's.

    Settings in ``reward.reward_kwargs.red``: ``mode`` (red | sparse), ``baseline`` (prompt | zero), ``beta_c``
    (RED row ``beta_c * red + (1 - beta_c) * sparse``, as red_ppo), ``scorer`` (vllm | hf: a Hugging Face model
    loaded from ``reward.reward_model.model_path`` and run in-process), ``max_retries`` (HTTP).
    ``run_single`` returns ``{"reward_score": row, "reward_extra_info": {"rm_score", "rm_baseline_score"}}``
    with one value per valid response token; `assemble_rm_scores` places the rows.
    """

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, scorer=None):
        super().__init__(config, tokenizer, compute_score)
        self.settings = red_settings(config)
        if reward_model_tokenizer is None:
            raise ValueError("reward_model_tokenizer: expected the reward model's tokenizer (verl passes it when "
                             "reward.reward_model.enable is True), got None")
        self.reward_model_tokenizer = reward_model_tokenizer
        if scorer is None:
            model_path = config.reward.reward_model.model_path
            if self.settings["scorer"] == "vllm":
                scorer = VLLMTokenScorer(reward_router_address, model_path, max_retries=self.settings["max_retries"])
            else:
                from transformers import AutoModelForSequenceClassification

                model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
                scorer = HFTokenScorer(model, reward_model_tokenizer, model_name=model_path)
        self.scorer = scorer

    async def _rm_input(self, data: DataProto) -> str:
        # verl's own rendering, so that the text is exactly what compute_score_disrm posts
        worker = types.SimpleNamespace(input_tokenizer=self.tokenizer,
                                       reward_model_tokenizer=self.reward_model_tokenizer)
        return await RewardLoopWorker._preprocess_reward_inputs(worker, data)

    async def run_single(self, data: DataProto) -> dict:
        data = data[-1:]  # as verl's managers: the last sequence of a multi-sequence output
        sample = sample_name(data)
        item = data[0]
        if "raw_prompt" not in item.non_tensor_batch:
            raise ValueError(f"sample {sample}: expected non_tensor_batch['raw_prompt'] (the prompt's chat "
                             f"messages; data.return_raw_chat=True), got keys {sorted(item.non_tensor_batch)}")
        responses = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-responses.shape[-1]:].sum())
        ids = responses[:valid].tolist()
        rm_text = await self._rm_input(data)
        response_text, policy_spans = policy_response(self.tokenizer, ids)
        start = locate_response(self.reward_model_tokenizer, list(item.non_tensor_batch["raw_prompt"]),
                                response_text, rm_text, sample=sample)
        text = reward_model_text(self.reward_model_tokenizer, rm_text, start, response_text, policy_spans,
                                 sample=sample)
        scores = await self.scorer.score(rm_text, sample=sample)
        aligned = align_scores(text, scores, baseline=self.settings["baseline"], sample=sample)
        row = reward_row(aligned, self.settings["mode"], float(self.settings["beta_c"]))
        return {"reward_score": row.tolist(),
                "reward_extra_info": {"rm_score": aligned.score, "rm_baseline_score": aligned.baseline_score}}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list) -> torch.Tensor:
        """``rm_scores [bs, response_length]`` float32 from the rows ``run_single`` returned: row i in the first
        ``valid_response_length[i]`` columns, zeros after. Plain floats (another manager's scores) get verl's
        default placement. Every row is checked before anything is written."""
        responses = data.batch["responses"]
        if len(scores) != responses.shape[0]:
            raise ValueError(f"scores: expected one entry per sample ({responses.shape[0]}), got {len(scores)}")
        if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            return super().assemble_rm_scores(data, scores)
        prompt_length = data.batch["prompts"].size(1)
        valid = data.batch["attention_mask"][:, prompt_length:].sum(dim=1).tolist()
        rows = []
        for i, row in enumerate(scores):
            try:
                row = torch.as_tensor(row, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                row = None
            if row is None or row.dim() != 1 or row.numel() != valid[i] or not bool(torch.isfinite(row).all()):
                got = "not numbers" if row is None else f"shape {list(row.shape)}"
                raise ValueError(f"sample {sample_name(data, i)}: expected a row of {valid[i]} finite rewards "
                                 f"(one per valid response token), got {got}")
            rows.append(row)
        rm_scores = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        for i, row in enumerate(rows):
            rm_scores[i, : row.numel()] = row.to(rm_scores.device)
        return rm_scores
