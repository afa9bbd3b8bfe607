"""`red-ppo diagnose`: RED's token rewards against the policy's Monte-Carlo advantage under the same scores.

A tiny random Llama writes on the synthetic language, whose hidden scorer (`OracleScores`) gives exact prefix
scores: the oracle must be consistent, the same scores shuffled within each response (the final score kept)
must not be, and the oracle shifted by a constant must give the very same numbers. Calibration is checked on
a scorer whose prefix score is, by construction, the expected final score under a uniform policy."""

import json
import math

import pytest
import torch
import yaml

from conftest import TINY_POLICY, tiny_config
from red_ppo.cli import main
from red_ppo.config import GenerationConfig, load_config
from red_ppo.data import Prompt
from red_ppo.demo import OracleScores
from red_ppo.diagnose import RewardModelScores, diagnose, load_validation, thresholds, verdict
from red_ppo.rollout import generate_rollout, left_pad, reward_model_mask
from red_ppo.synthetic import SyntheticTask, build_tokenizer
from test_ppo_cross_tokenizer import cross_config, visible_head

pytest.importorskip("transformers")

GENERATION = GenerationConfig(max_new_tokens=8)
OFFSET = 5.0  # the oracle's scores are multiples of 0.5: adding 5 and subtracting it again is exact in float32


def tiny_policy(tokenizer, uniform=False):
    """A random one-layer Llama over the synthetic vocabulary; ``uniform``: its lm_head zeroed, so that every
    token is sampled with probability 1 / vocabulary at every step, whatever came before."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_POLICY)
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), **kwargs,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config).eval()
    if uniform:
        policy.config.tie_word_embeddings = False
        policy.lm_head.weight = torch.nn.Parameter(torch.zeros_like(policy.lm_head.weight))
    return policy


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these batches are tiny, and on a busy 2-core machine a second thread costs 3x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def language():
    tokenizer, task = build_tokenizer(), SyntheticTask()
    prompts = [Prompt(tokenizer(p)["input_ids"], p, None) for p in task.prompts]
    return tokenizer, task, prompts


def run(policy, tokenizer, prompts, score_fn, **kwargs):
    settings = dict(prefixes=60, continuations=16, generation=GENERATION, batch_size=256, log=lambda *a: None)
    return diagnose(policy, tokenizer, prompts, score_fn, **(settings | kwargs))


class Shuffled:
    """The oracle's prefix scores permuted among each response's tokens but the last (the final score kept)."""

    def __init__(self, oracle):
        self.oracle, self.generator = oracle, torch.Generator().manual_seed(1)

    def __call__(self, input_ids, attention_mask, response_start):
        scores, P = self.oracle(input_ids, attention_mask, response_start), response_start
        for row in range(scores.shape[0]):
            n = int(attention_mask[row, P:].sum())
            scores[row, P:P + n - 1] = scores[row, P:P + n - 1][torch.randperm(n - 1, generator=self.generator)]
        return scores


class ZeroDrift:
    """+1 for each token of one half of the vocabulary, -1 for each of the other half (EOS and one more token
    0): under the uniform policy every next token adds 0 in expectation, so the expected final score from any
    prefix is the prefix's own score, V(y<=t) = s_t: a perfectly calibrated score."""

    def __init__(self, tokenizer):
        others = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
        half = len(others) // 2
        self.weight = torch.zeros(len(tokenizer), dtype=torch.float64)
        self.weight[others[:half]], self.weight[others[half:2 * half]] = 1.0, -1.0

    def __call__(self, input_ids, attention_mask, response_start):
        P = response_start
        scores = torch.zeros(input_ids.shape, dtype=torch.float64)
        scores[:, P:] = (self.weight[input_ids[:, P:]] * attention_mask[:, P:]).cumsum(1)
        return scores


def test_the_oracle_is_consistent_shuffled_scores_are_not_and_an_offset_changes_nothing(language):
    tokenizer, task, prompts = language
    policy, oracle = tiny_policy(tokenizer), OracleScores(task)
    before = torch.get_rng_state()
    exact = run(policy, tokenizer, prompts, oracle)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left as it was
    assert exact["prefixes"] == exact["responses"] == 60 and exact["continuations"] == 16
    # The oracle's token reward is the true credit of token t, and A_t is that credit plus the change the token
    # makes to the expected future (small for a near-uniform policy) plus Monte-Carlo noise (error about 0.5
    # against a spread of 0.9 at K = 16, which caps rho near 0.8).
    assert exact["consistency"] > 0.5
    shuffled = run(policy, tokenizer, prompts, Shuffled(oracle))
    # Shuffled prefix scores make r_t the difference of two of the response's prefix scores taken at random
    # positions, unrelated to token t except at the last token (whose score is kept): about 1 prefix in 8 here.
    lo, hi = shuffled["consistency_ci95"]
    assert lo < 0 < hi and abs(shuffled["consistency"]) < 0.2
    assert exact["consistency_ci95"][0] > hi  # the oracle's interval lies above the shuffled scores'

    shifted = run(policy, tokenizer, prompts, lambda ids, mask, start: oracle(ids, mask, start) + OFFSET)
    for a, b in zip(exact["prefix_table"], shifted["prefix_table"], strict=True):
        assert (a["response"], a["t"], a["token_reward"], a["advantage"]) == \
            (b["response"], b["t"], b["token_reward"], b["advantage"])  # bit for bit
        assert b["value_after"] == a["value_after"] + OFFSET and b["prefix_score"] == a["prefix_score"] + OFFSET
    for key in ("consistency", "consistency_ci95", "calibration_slope", "calibration_slope_ci95"):
        assert shifted[key] == exact[key], key


def test_the_oracle_tokens_rewards_are_the_true_credit_and_finished_prefixes_are_their_own_value(language):
    tokenizer, task, prompts = language
    oracle, lengths = OracleScores(task), []

    def recording(input_ids, attention_mask, response_start):
        lengths.extend(attention_mask[:, response_start:].sum(1).tolist())
        return oracle(input_ids, attention_mask, response_start)

    result = run(tiny_policy(tokenizer), tokenizer, prompts, recording, prefixes=12, continuations=2)
    # a completion samples only the budget its prefix left: no scored response is longer than max_new_tokens
    assert max(lengths) == GENERATION.max_new_tokens and len(lengths) > 12 * 2
    ids = {text: i for i, text in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))}
    for example in result["examples"]:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        response = [ids[text.strip()] for text in example["tokens"]]
        assert example["rewards"] == task.token_credit(prompt_ids, response)
        assert example["score"] == task.score(prompt_ids, response)
    for row in result["prefix_table"]:
        example = result["examples"][row["response"]] if row["response"] < len(result["examples"]) else None
        if example is not None and row["t"] == len(example["tokens"]) - 1:  # the whole response: no continuation
            assert row["value_after"] == example["score"]


def test_a_calibrated_score_has_slope_one_and_the_oracle_under_a_uniform_policy_less(language):
    tokenizer, task, prompts = language
    policy = tiny_policy(tokenizer, uniform=True)
    calibrated = run(policy, tokenizer, prompts, ZeroDrift(tokenizer), continuations=8)
    lo, hi = calibrated["calibration_slope_ci95"]
    assert lo < 1 < hi and abs(calibrated["calibration_slope"] - 1) < 0.15
    # The oracle's s_t is the credit so far; its value adds the expected credit still to come. A uniform policy's
    # tokens are mostly off-topic or malformed (about -0.6 each), so a later prefix has a lower s_t but less
    # loss ahead: the value varies less than s_t across prefixes, and the slope is below 1.
    oracle = run(policy, tokenizer, prompts, OracleScores(task), continuations=8)
    assert oracle["calibration_slope_ci95"][1] < 1


@pytest.mark.parametrize("own_tokenizer", [True, False], ids=["own-tokenizer-and-chat", "policy-tokenizer"])
def test_the_reward_model_scores_are_the_trainers(tmp_path, own_tokenizer):
    from red_ppo.trainer import PPOTrainer

    run = {"run": {"output_dir": str(tmp_path / "run"), "num_threads": 1}, "generation": {"max_new_tokens": 8}}
    config = cross_config(tmp_path, chat_lines=True) if own_tokenizer else tiny_config(run)
    trainer = PPOTrainer(load_config(base=config))
    visible_head(trainer)
    prompts = trainer.sampler.prompts + trainer.eval_prompts
    assert any(p.messages is not None for p in prompts) == own_tokenizer
    ids, mask = left_pad([p.ids for p in prompts], trainer.pad_id)
    torch.manual_seed(3)
    rollout = generate_rollout(trainer.policy, ids, mask, trainer.cfg.generation, trainer.eos_id, trainer.pad_id)
    scores, token_rewards = trainer.reward_scores(rollout, prompts)
    score_fn = RewardModelScores(trainer.cfg, trainer.tokenizer, trainer.rm_tokenizer, trainer.reward_model, prompts,
                                 trainer.device)
    scored = reward_model_mask(rollout, trainer.pad_id)
    prefix = score_fn(rollout.input_ids, scored, rollout.prompt_width)
    P = rollout.prompt_width
    for row in range(len(prompts)):
        last = int(scored[row].nonzero().max())
        assert prefix[row, last] == scores[row]  # the sequence score itself
        rewards = torch.diff(prefix[row, P - 1:last + 1])
        torch.testing.assert_close(rewards.float(), token_rewards[row, P:last + 1], rtol=0,
                                   atol=1e-6 * max(1.0, prefix.abs().max().item()))


def test_the_command_writes_the_numbers_and_the_page(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cross_config(tmp_path, chat_lines=True)))
    assert main(["diagnose", "--config", str(config), "--prefixes", "6", "--continuations", "2",
                 "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "diagnose.json").read_text())
    assert written["prefixes"] == 6 and written["continuations"] == 2 and len(written["prefix_table"]) == 6
    assert written["verdict"] == verdict({k: math.nan if v is None else v for k, v in written.items()},
                                         load_validation())
    assert f"verdict: {written['verdict']}" in printed and "consistency" in printed
    page = (tmp_path / "out" / "diagnose.html").read_text()
    assert page.count('<div class="sample">') == 6 and "red-ppo diagnose" in page


def test_bad_input_names_the_argument(language, tmp_path, capsys):
    tokenizer, task, prompts = language
    policy = tiny_policy(tokenizer)
    cases = [({"prefixes": 0}, "prefixes"), ({"continuations": 1}, "continuations"), ({"batch_size": 0}, "batch_size"),
             ({"prompts": []}, "prompts"), ({"generation": GenerationConfig(max_new_tokens=0)},
                                            "generation.max_new_tokens")]
    for change, name in cases:
        settings = {"prompts": prompts} | change
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            run(policy, tokenizer, settings.pop("prompts"), OracleScores(task), **settings)
    with pytest.raises(ValueError, match=r"^score_fn: expected a floating-point tensor .* got torch.int64"):
        run(policy, tokenizer, prompts, lambda ids, mask, start: ids, prefixes=2, continuations=2)
    with pytest.raises(TypeError, match="^score_fn: expected a callable"):
        run(policy, tokenizer, prompts, "oracle")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cross_config(tmp_path)))
    assert main(["diagnose", "--config", str(config), "--continuations", "1"]) == 2
    assert "--continuations: expected an integer >= 2, got 1" in capsys.readouterr().err


def source(name, consistency, gain_lo, gain_hi):
    return {"name": name, "consistency": consistency, "consistency_ci95": [consistency - 0.1, consistency + 0.1],
            "gain": (gain_lo + gain_hi) / 2, "gain_ci95": [gain_lo, gain_hi]}


def measured(rho, lo, hi):
    return {"consistency": rho, "consistency_ci95": [lo, hi]}


VALIDATION = [source("oracle", 0.89, 5.0, 9.0), source("oracle+noise", 0.6, 0.2, 1.5),
              source("learned", 0.27, -0.7, 0.1), source("demo", -0.13, -0.5, -0.1)]


def test_the_thresholds_come_from_the_validation():
    assert thresholds(VALIDATION) == {"helps_above": 0.6, "no_help_below": 0.27, "separates": True}
    # a source whose gain interval reaches 0 moves to the other side and moves the thresholds
    moved = VALIDATION[:1] + [source("oracle+noise", 0.6, 0.0, 1.5)] + VALIDATION[2:]
    assert thresholds(moved) == {"helps_above": 0.89, "no_help_below": 0.6, "separates": True}
    assert thresholds(VALIDATION[:2]) == {"helps_above": 0.6, "no_help_below": None, "separates": False}
    overlapping = VALIDATION + [source("exploited", 0.7, -2.0, -0.5)]
    assert thresholds(overlapping) == {"helps_above": 0.6, "no_help_below": 0.7, "separates": False}


def test_the_verdict_says_which_side_and_how_sure():
    assert verdict(measured(0.5, 0.4, 0.6), []) == "no validation data: numbers without a verdict"
    assert verdict(measured(0.8, 0.7, 0.9), VALIDATION).startswith("RED likely helps: consistency 0.80 [0.70, 0.90]")
    assert verdict(measured(0.1, 0.0, 0.2), VALIDATION).startswith("RED likely does not help")
    assert verdict(measured(0.65, 0.5, 0.75), VALIDATION).startswith("RED probably helps, not sure")
    assert verdict(measured(0.2, 0.1, 0.35), VALIDATION).startswith("RED probably does not help, not sure")
    line = verdict(measured(0.4, 0.3, 0.5), VALIDATION)
    assert line.startswith("undecided: consistency 0.40 [0.30, 0.50] lies between 0.27") and "0.60" in line
    assert "nearest validated sources: learned (consistency 0.27" in line and "oracle+noise (consistency 0.60" in line
    for sources in (VALIDATION[:2], VALIDATION + [source("exploited", 0.7, -2.0, -0.5)]):
        assert verdict(measured(0.8, 0.7, 0.9), sources).startswith("no verdict: the validation does not separate")
    assert verdict(measured(math.nan, math.nan, math.nan), VALIDATION).startswith("no verdict: the consistency is "
                                                                                  "undefined")


def test_bad_validation_names_the_entry(tmp_path):
    broken = [dict(VALIDATION[0], gain_ci95=[1.0])]
    with pytest.raises(ValueError, match=r"^validation\[0\]\.gain_ci95: expected \[lo, hi\]"):
        verdict(measured(0.5, 0.4, 0.6), broken)
    with pytest.raises(ValueError, match=r"^validation\[1\]: expected a dict with a 'name'"):
        thresholds([VALIDATION[0], {"consistency": 0.3}])
    path = tmp_path / "validation.json"
    path.write_text(json.dumps({"source": "the study", "sources": VALIDATION}))
    assert load_validation(path) == VALIDATION and load_validation(tmp_path / "absent.json") == []


def test_the_committed_validation_is_the_full_studys():
    """The package's validation (the verdict's thresholds) is `red-ppo study`'s diagnose_validation.json, copied
    unchanged: the full study (not --quick), every deterministic source of the committed study config, each gain
    the study's paired mean inside its t-interval, and the thresholds are what `thresholds` derives from it."""
    from red_ppo.diagnose import VALIDATION_PATH
    from red_ppo.study_config import StudyConfig, source_names

    data = json.loads(VALIDATION_PATH.read_text())
    assert data["source"].startswith("red-ppo study: ")
    sources = load_validation()
    deterministic = [n for n in source_names(len(StudyConfig().rm_levels)) if not n.startswith("noise-")]
    assert [s["name"] for s in sources] == deterministic and len(data["independent_noise"]) == 3
    for s in sources:
        assert s["gain_ci95"][0] <= s["gain"] <= s["gain_ci95"][1], s["name"]
        assert s["consistency_ci95"][0] <= s["consistency"] <= s["consistency_ci95"][1], s["name"]
    limits = thresholds(sources)
    helped = [s for s in sources if s["gain_ci95"][0] > 0]
    assert limits["helps_above"] == (min(s["consistency"] for s in helped) if helped else None)
