"""REDRewardManager inside verl 0.9.1: verl's own routing, rendering, batch assembly and GAE, on DataProto
batches laid out as verl's agent loop lays them out after a rollout, with a tiny random reward model whose
word-level tokenizer differs from the policy's byte-level BPE. vLLM cannot run here: the vLLM path is checked
as a format test, against a loopback HTTP server that answers ``/pooling`` with what the in-process scorer
computes, in vLLM's answer shape."""

from __future__ import annotations

import asyncio
import json
import threading
import types

import numpy as np
import pytest
import torch
import transformers
from aiohttp import web
from omegaconf import OmegaConf

from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopManager, RewardLoopWorker
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.reward import get_custom_reward_fn, load_reward_manager, resolve_reward_manager_cls

from red_kernels import redistribute
from red_kernels.hf import score_prefixes
from red_kernels.integrations import verl as red_verl
from red_kernels.integrations.verl import HFTokenScorer, REDRewardManager, VLLMTokenScorer

from align_tokenizers import CORPUS, policy_tokenizer, rm_tokenizer

MODULE = "pkg://red_kernels.integrations.verl"


def reward_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=512, num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a random head with a visible scale, so prefix scores differ token to token
        model.score.weight.normal_(0, 1.0)
    return model


def verl_config(**red):
    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": "policy", "tokenizer_path": None}},
        "reward": {
            "num_workers": 2,
            "custom_reward_function": {"path": MODULE, "name": "compute_score"},
            "reward_manager": {"source": "importlib", "name": "REDRewardManager",
                               "module": {"path": MODULE, "name": "custom_reward_manager"}},
            "reward_model": {"enable": True, "enable_resource_pool": False, "model_path": "tiny-rm",
                             "rollout": {"name": "vllm"}},
            "reward_kwargs": {"red": red},
        },
    })


# (prompt, response, ends with EOS): a leading space, multi-byte text, a response cut before EOS, an empty one
SAMPLES = [
    (CORPUS[7][:21], " Two plus two is four.", True),
    ("Say it in Japanese.", "日本語のテキスト, emoji 🙂.", True),
    (CORPUS[8][:38], "Because of Rayleigh scattering", False),
    ("Nothing?", "", True),                 # only an EOS
    ("Nothing at all?", "", False),         # no token at all
    (CORPUS[0], "The lazy dog; the quick fox!", True),
    ("Spell it.", "naïve piñatas, déjà vu", True),
]


def rollout_batch(policy, samples=SAMPLES, prompt_width=48, response_width=64):
    """What verl's agent loop hands the trainer: left-padded prompts, right-padded responses (EOS kept),
    attention_mask over both, position_ids over real tokens, response_mask, raw_prompt chats, uid."""
    pad = policy.pad_token_id
    rows = {k: [] for k in ("prompts", "responses", "response_mask", "attention_mask", "input_ids",
                            "position_ids")}
    chats = []
    for prompt, response, eos in samples:
        chat = [{"role": "user", "content": prompt}]
        chats.append(chat)
        p = policy.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        p = list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
        r = policy(response, add_special_tokens=False)["input_ids"] + ([policy.eos_token_id] if eos else [])
        assert len(p) <= prompt_width and len(r) <= response_width
        p_mask = [0] * (prompt_width - len(p)) + [1] * len(p)
        r_mask = [1] * len(r) + [0] * (response_width - len(r))
        prompts = [pad] * (prompt_width - len(p)) + p
        responses = r + [pad] * (response_width - len(r))
        mask = p_mask + r_mask
        rows["prompts"].append(prompts)
        rows["responses"].append(responses)
        rows["response_mask"].append(r_mask)
        rows["attention_mask"].append(mask)
        rows["input_ids"].append(prompts + responses)
        rows["position_ids"].append(list(np.clip(np.cumsum(mask) - 1, 0, None)))
    tensors = {k: torch.tensor(v, dtype=torch.int64) for k, v in rows.items()}
    raw = np.empty(len(chats), dtype=object)
    raw[:] = chats
    uid = np.array([f"u{i}" for i in range(len(chats))], dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors={"raw_prompt": raw, "uid": uid})


def make_manager(policy, rm_tok, model, **red):
    return REDRewardManager(verl_config(**red), policy, None, reward_router_address=None,
                            reward_model_tokenizer=rm_tok, scorer=HFTokenScorer(model, rm_tok))


def run_all(manager, data):
    async def go():
        return await asyncio.gather(*(manager.run_single(data[i: i + 1]) for i in range(len(data))))
    return asyncio.run(go())


def valid_lengths(data):
    P = data.batch["prompts"].shape[1]
    return data.batch["attention_mask"][:, P:].sum(1).tolist()


@pytest.fixture(scope="module")
def setup():
    policy, rm_tok = policy_tokenizer(), rm_tokenizer()
    return policy, rm_tok, reward_model(rm_tok), rollout_batch(policy)


# --- routing: docs/verl.md's configuration reaches run_single through verl's own code -------------------------
def test_configuration_routes_verl_to_the_manager(setup):
    policy, rm_tok, model, data = setup
    config = verl_config(mode="red")
    assert resolve_reward_manager_cls(config) is REDRewardManager
    assert get_custom_reward_fn(config) is not None  # verl calls run_single only when this is set
    manager = load_reward_manager(config, policy, reward_router_address="127.0.0.1:9",
                                  reward_model_tokenizer=rm_tok)
    assert isinstance(manager, REDRewardManager) and isinstance(manager.scorer, VLLMTokenScorer)
    assert manager.scorer.url == "http://127.0.0.1:9/pooling"
    worker = RewardLoopWorker.__new__(RewardLoopWorker)
    worker.config, worker.reward_manager = config, make_manager(policy, rm_tok, model)
    out = asyncio.run(worker.compute_score(data[0:1]))  # verl's dispatch: custom path set -> run_single
    assert len(out["reward_score"]) == valid_lengths(data)[0]


# --- the text: exactly what compute_score_disrm posts ------------------------------------------------------------
def test_reward_model_reads_what_compute_score_disrm_posts_and_sparse_is_its_score(setup):
    policy, rm_tok, model, data = setup
    worker = RewardLoopWorker.__new__(RewardLoopWorker)
    worker.config, worker.input_tokenizer, worker.reward_model_tokenizer = verl_config(), policy, rm_tok
    hf = HFTokenScorer(model, rm_tok)
    posted = []

    async def post(payload, endpoint, max_retries=16):  # vLLM's /classify: the LAST token's raw score
        posted.append((endpoint, payload))
        last = hf.pooling_response(payload["input"])["data"][0]["data"][-1][0]
        return {"data": [{"index": 0, "probs": [last]}]}

    worker._post_request = post
    seen = []

    class Recording(HFTokenScorer):
        async def score(self, text, *, sample):
            seen.append(text)
            return await super().score(text, sample=sample)

    manager = REDRewardManager(verl_config(mode="sparse"), policy, None, reward_model_tokenizer=rm_tok,
                               scorer=Recording(model, rm_tok))
    disrm = [asyncio.run(worker.compute_score_disrm(data[i: i + 1]))["reward_score"] for i in range(len(data))]
    rows = run_all(manager, data)
    assert [p["input"] for _, p in posted] == seen
    assert all(e == "classify" and p["use_activation"] is False for e, p in posted)
    # sparse mode is verl's default placement of the /classify score
    ours = REDRewardManager.assemble_rm_scores(data, [r["reward_score"] for r in rows])
    nonempty = [i for i, n in enumerate(valid_lengths(data)) if n]
    theirs = RewardManagerBase.assemble_rm_scores(data, disrm)
    assert torch.equal(ours[nonempty], theirs[nonempty])
    # an empty response: verl's default writes into column -1 (padding); our row is all zeros
    assert all(float(ours[i].abs().sum()) == 0 for i in range(len(data)) if i not in nonempty)


# --- the rows ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["prompt", "zero"])
def test_rows_telescope_to_the_score_minus_baseline_and_stop_at_the_response_end(setup, baseline):
    policy, rm_tok, model, data = setup
    rows = run_all(make_manager(policy, rm_tok, model, baseline=baseline), data)
    rm_scores = REDRewardManager.assemble_rm_scores(data, [r["reward_score"] for r in rows])
    assert rm_scores.dtype == torch.float32 and rm_scores.shape == data.batch["responses"].shape
    for i, n in enumerate(valid_lengths(data)):
        info = rows[i]["reward_extra_info"]
        rm_text = asyncio.run(make_manager(policy, rm_tok, model)._rm_input(data[i: i + 1]))
        ids = rm_tok(rm_text, add_special_tokens=True)["input_ids"]
        # the score is the reward model's own: a plain forward on the whole text, last token
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits[0, 0].item()
        assert info["rm_score"] == pytest.approx(full, abs=1e-5)
        assert float(rm_scores[i, n:].abs().sum()) == 0.0
        if n:
            total = float(rm_scores[i, :n].double().sum())
            assert total == pytest.approx(info["rm_score"] - info["rm_baseline_score"], abs=1e-5)
            if baseline == "zero":
                assert info["rm_baseline_score"] == 0.0
    assert float(rm_scores.abs().sum()) > 0


def test_one_tokenizer_and_a_bare_template_give_redistribute_token_rewards(setup):
    policy, _, _, _ = setup
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=policy.backend_tokenizer, eos_token="<eos>",
                                                pad_token="<pad>",
                                                chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = reward_model(bare, seed=3)
    samples = [("What is two plus two?\n", "Two plus two is four.", True),
               ("Tokens, spans and rewards:\n", " every prefix has a score!", False)]
    data = rollout_batch(policy, samples)
    rows = run_all(make_manager(policy, bare, model), data)
    for i, (prompt, response, eos) in enumerate(samples):
        p_ids = bare(prompt, add_special_tokens=False)["input_ids"]
        r_ids = bare(response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            op = score_prefixes(model, ids, None, len(p_ids), baseline="prompt")
        expected = op.token_rewards[0, len(p_ids):]
        if eos:  # verl deletes the EOS text: the EOS token (last) adds no text and there is no template tail
            expected = torch.cat([expected, expected.new_zeros(1)])
        assert torch.equal(torch.tensor(rows[i]["reward_score"], dtype=torch.float32), expected)


def test_beta_c_mixes_red_with_the_sparse_row(setup):
    policy, rm_tok, model, data = setup
    red = run_all(make_manager(policy, rm_tok, model), data)
    sparse = run_all(make_manager(policy, rm_tok, model, mode="sparse"), data)
    mixed = run_all(make_manager(policy, rm_tok, model, beta_c=0.25), data)
    for r, s, m in zip(red, sparse, mixed):
        expected = 0.25 * torch.tensor(r["reward_score"]) + 0.75 * torch.tensor(s["reward_score"])
        assert torch.allclose(torch.tensor(m["reward_score"]), expected, rtol=0, atol=1e-6)


def test_verl_rm_score_to_gae_with_dense_rows(setup, monkeypatch):
    """verl's RewardLoopManager.compute_rm_score (two workers, padding, assembly) and then verl's GAE."""
    policy, rm_tok, model, data = setup
    out = {}
    for mode in ("red", "sparse"):
        config = verl_config(mode=mode)
        workers = []
        for _ in range(2):
            w = RewardLoopWorker.__new__(RewardLoopWorker)
            w.config, w.reward_manager = config, make_manager(policy, rm_tok, model, mode=mode)
            workers.append(w)

        manager = RewardLoopManager.__new__(RewardLoopManager)
        manager.config, manager.reward_model_manager = config, None
        manager.reward_manager_cls = resolve_reward_manager_cls(config)
        manager.reward_loop_workers = [types.SimpleNamespace(compute_score_batch=types.SimpleNamespace(
            remote=lambda chunk, w=w: asyncio.run(w.compute_score_batch(chunk)))) for w in workers]
        monkeypatch.setattr("verl.experimental.reward_loop.reward_loop.ray.get", lambda refs: refs)
        result = manager.compute_rm_score(data)  # 7 samples over 2 workers: verl pads to 8, then unpads
        out[mode] = result.batch["rm_scores"]
        assert sorted(result.meta_info["reward_extra_keys"]) == ["rm_baseline_score", "rm_score"]
    mask = data.batch["response_mask"].float()
    g = torch.Generator().manual_seed(11)
    values = torch.randn(mask.shape, generator=g) * mask
    adv = {m: core_algos.compute_gae_advantage_return(out[m], values, mask, gamma=torch.tensor(1.0),
                                                      lam=torch.tensor(0.95))[0] for m in out}
    assert torch.isfinite(adv["red"]).all() and torch.isfinite(adv["sparse"]).all()
    real = mask.bool()
    assert (adv["red"] - adv["sparse"])[real].abs().max() > 1e-3
    # gamma = lam = 1, zero values: the return of a response's first token is its row's sum (verl whitens
    # the advantages, not the returns)
    returns = {m: core_algos.compute_gae_advantage_return(out[m], torch.zeros_like(mask), mask,
                                                          gamma=torch.tensor(1.0), lam=torch.tensor(1.0))[1]
               for m in out}
    for m in out:
        assert torch.allclose(returns[m][:, 0], out[m].sum(1), atol=1e-5)
    # RED: the return-to-go differs along a response; sparse: it is the score at every token
    assert not torch.allclose(returns["red"][0, :5], returns["red"][0, :1].expand(5))
    assert torch.allclose(returns["sparse"][0, :5], returns["sparse"][0, :1].expand(5))


# --- vLLM: the request and the answer (format test, loopback server) -----------------------------------------
class FakeVLLM:
    """A loopback HTTP server answering /pooling as vLLM does, from the in-process scorer; or badly."""

    def __init__(self, scorer, behaviour="ok"):
        self.scorer, self.behaviour, self.requests = scorer, behaviour, []

    async def pooling(self, request):
        body = await request.json()
        self.requests.append(body)
        if self.behaviour == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if self.behaviour == "http400":
            return web.json_response({"error": {"message": "max_model_len exceeded"}}, status=400)
        answer = self.scorer.pooling_response(body["input"])
        if self.behaviour == "classify_shape":
            answer = {"data": [{"index": 0, "probs": [answer["data"][0]["data"][-1][0]]}]}
        if self.behaviour == "truncated":
            answer["data"][0]["data"] = answer["data"][0]["data"][:-2]
        return web.Response(text=json.dumps(answer), content_type="application/json")

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/pooling", self.pooling)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_vllm_request_format():
    scorer = VLLMTokenScorer("10.0.0.1:8000", "/models/rm")
    assert scorer.url == "http://10.0.0.1:8000/pooling"
    assert scorer.request("text") == {"model": "/models/rm", "input": "text", "task": "token_classify",
                                      "use_activation": False}


def test_vllm_answer_through_http_gives_the_in_process_rows(setup):
    policy, rm_tok, model, data = setup
    hf = HFTokenScorer(model, rm_tok)
    with FakeVLLM(hf) as server:
        served = REDRewardManager(verl_config(), policy, None, reward_router_address=server.address,
                                  reward_model_tokenizer=rm_tok)
        rows = run_all(served, data)
    direct = run_all(make_manager(policy, rm_tok, model), data)
    assert [r["reward_score"] for r in rows] == [r["reward_score"] for r in direct]
    assert all(req["task"] == "token_classify" and req["use_activation"] is False and req["model"] == "tiny-rm"
               for req in server.requests)
    shape = hf.pooling_response("a text")["data"][0]
    assert shape["object"] == "pooling" and all(len(r) == 1 for r in shape["data"])


@pytest.mark.parametrize("behaviour, error, message", [
    ("http500", RuntimeError, r"sample uid u0: the reward model server answered HTTP 500"),
    ("http400", RuntimeError, r"sample uid u0: the reward model server answered HTTP 400 .*max_model_len"),
    ("classify_shape", ValueError, r"sample uid u0: the reward model's /pooling answer: expected"),
    ("truncated", ValueError, r"sample uid u0: the reward model scored \d+ tokens but its tokenizer makes"),
])
def test_server_errors_name_the_sample(setup, behaviour, error, message):
    policy, rm_tok, model, data = setup
    with FakeVLLM(HFTokenScorer(model, rm_tok), behaviour) as server:
        manager = REDRewardManager(verl_config(max_retries=2), policy, None, reward_router_address=server.address,
                                   reward_model_tokenizer=rm_tok)
        manager.scorer.backoff_s = 0.0
        with pytest.raises(error, match=message):
            asyncio.run(manager.run_single(data[0:1]))
        assert len(server.requests) == (2 if behaviour == "http500" else 1)  # 5xx retried, 4xx not


def test_unreachable_server_names_the_sample(setup):
    policy, rm_tok, _, data = setup
    manager = REDRewardManager(verl_config(max_retries=1), policy, None, reward_router_address="127.0.0.1:1",
                               reward_model_tokenizer=rm_tok)
    with pytest.raises(RuntimeError, match=r"sample uid u0: could not reach the reward model server"):
        asyncio.run(manager.run_single(data[0:1]))


# --- bad input: named, nothing half-written -------------------------------------------------------------------
def test_template_that_rewrites_the_response_is_refused_by_sample(setup):
    policy, rm_tok, model, _ = setup
    trimming = transformers.PreTrainedTokenizerFast(
        tokenizer_object=rm_tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
        pad_token="</s>",
        chat_template="{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}")
    data = rollout_batch(policy, [("Hi", "fine", True), ("Hi", "  padded answer  ", True)])
    manager = make_manager(policy, trimming, model)
    assert len(asyncio.run(manager.run_single(data[0:1]))["reward_score"]) == valid_lengths(data)[0]
    with pytest.raises(ValueError, match=r"sample uid u1: the reward model's chat template does not "
                                         r"reproduce the response"):
        asyncio.run(manager.run_single(data[1:2]))


def test_assemble_refuses_a_row_of_the_wrong_length_and_writes_nothing(setup):
    policy, rm_tok, model, data = setup
    rows = [r["reward_score"] for r in run_all(make_manager(policy, rm_tok, model), data)]
    bad = [*rows[:2], rows[2][:-1], *rows[3:]]
    with pytest.raises(ValueError, match=r"sample 2 \(uid u2\): expected a row of \d+ finite rewards .*got shape"):
        REDRewardManager.assemble_rm_scores(data, bad)
    with pytest.raises(ValueError, match=r"sample 1 \(uid u1\): expected a row of \d+ finite rewards"):
        REDRewardManager.assemble_rm_scores(data, [rows[0], [float("nan")] * len(rows[1]), *rows[2:]])
    with pytest.raises(ValueError, match=r"scores: expected one entry per sample \(7\), got 4"):
        REDRewardManager.assemble_rm_scores(data, rows[:4])
    # floats from another manager keep verl's default placement
    assert torch.equal(REDRewardManager.assemble_rm_scores(data, [1.0] * 7),
                       RewardManagerBase.assemble_rm_scores(data, [1.0] * 7))


def test_bad_settings_and_missing_tokenizer_are_named(setup):
    policy, rm_tok, model, _ = setup
    with pytest.raises(ValueError, match=r"reward.reward_kwargs.red.beta_c: expected a number in \[0, 1\], got 2"):
        make_manager(policy, rm_tok, model, beta_c=2)
    with pytest.raises(ValueError, match=r"reward.reward_kwargs.red: unknown keys \['basline'\]"):
        make_manager(policy, rm_tok, model, basline="zero")
    with pytest.raises(ValueError, match=r"reward_model_tokenizer: expected the reward model's tokenizer"):
        REDRewardManager(verl_config(), policy, None, reward_model_tokenizer=None,
                         scorer=HFTokenScorer(model, rm_tok))
    with pytest.raises(RuntimeError, match="only routes verl to REDRewardManager"):
        red_verl.compute_score()


def test_one_failing_sample_fails_verls_reward_step_and_names_it(setup, monkeypatch):
    policy, rm_tok, model, data = setup

    class FailsOnU2(HFTokenScorer):
        async def score(self, text, *, sample):
            if "u2" in str(sample):
                return red_verl.parse_token_classify_response({"data": [{"data": [[1.0, 2.0]]}]}, sample=sample)
            return await super().score(text, sample=sample)

    config = verl_config()
    w = RewardLoopWorker.__new__(RewardLoopWorker)
    w.config = config
    w.reward_manager = REDRewardManager(config, policy, None, reward_model_tokenizer=rm_tok,
                                        scorer=FailsOnU2(model, rm_tok))
    manager = RewardLoopManager.__new__(RewardLoopManager)
    manager.config, manager.reward_model_manager = config, None
    manager.reward_manager_cls = REDRewardManager
    manager.reward_loop_workers = [types.SimpleNamespace(compute_score_batch=types.SimpleNamespace(
        remote=lambda chunk: asyncio.run(w.compute_score_batch(chunk))))]
    monkeypatch.setattr("verl.experimental.reward_loop.reward_loop.ray.get", lambda refs: refs)
    with pytest.raises(ValueError, match=r"sample uid u2: the reward model's /pooling answer: expected"):
        manager.compute_rm_score(data)  # raises before any rm_scores exist


def test_hf_scorer_loads_the_reward_model_from_model_path(setup, tmp_path):
    policy, rm_tok, model, data = setup
    model.save_pretrained(tmp_path)
    config = verl_config(scorer="hf")
    config.reward.reward_model.model_path = str(tmp_path)
    loaded = REDRewardManager(config, policy, None, reward_model_tokenizer=rm_tok)
    assert isinstance(loaded.scorer, HFTokenScorer)
    assert run_all(loaded, data[:2]) == run_all(make_manager(policy, rm_tok, model), data[:2])
