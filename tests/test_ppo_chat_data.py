"""Chat data for red_ppo: `messages` lines rendered with the policy's chat template (no second BOS),
plain `prompt` lines tokenised as before, over-long prompts dropped (never cut) and counted, and every
malformed line a configuration error naming the file, the line and the key, before any model loads."""

import copy
import json
import math

import pytest

from align_tokenizers import POLICY_TEMPLATE, RM_TEMPLATE, policy_tokenizer, rm_tokenizer
from conftest import TINY_MODEL, TINY_POLICY, tiny_config
from red_ppo.config import ConfigError, load_config
from red_ppo.data import Prompt, load_prompts
from red_ppo.metrics import read_metrics
from red_ppo.synthetic import SyntheticTask, build_tokenizer

pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [{"role": "system", "content": "Please answer briefly."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps."},
     {"role": "user", "content": "Over the lazy dog?"}],
]


def bos_tokenizer():
    """The reward model's word-level tokenizer (it adds a BOS as a special token) with a template that writes the
    BOS itself, as Llama's do: tokenising its rendered text with special tokens would give two BOS."""
    tokenizer = copy.deepcopy(rm_tokenizer())
    tokenizer.chat_template = "{{ bos_token }}" + RM_TEMPLATE
    return tokenizer


def write_lines(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def config_for(path, **data):
    return load_config(base=tiny_config(data={"source": "file", "prompt_file": str(path), **data}))


def template_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


# ------------------------------------------------------------------ rendering

@pytest.mark.parametrize("make_tokenizer", [policy_tokenizer, bos_tokenizer], ids=["no-bos", "template-bos"])
def test_conversations_are_rendered_with_the_template_and_no_second_bos(tmp_path, make_tokenizer):
    tokenizer = make_tokenizer()
    path = write_lines(tmp_path, [{"messages": chat} for chat in CHATS])
    prompts, counts = load_prompts(config_for(path), tokenizer)
    assert counts == {"data/prompts": 3, "data/dropped_too_long": 0}
    for prompt, chat in zip(prompts, CHATS):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert prompt == Prompt(ids=template_ids(tokenizer, chat), text=text, messages=chat)
        assert text.endswith(("[assistant]: ", "<|assistant|>\n"))  # the generation prompt
        assert chat[-1]["content"] in text
    if tokenizer.bos_token_id is not None:
        bos = tokenizer.bos_token_id
        for prompt in prompts:
            assert prompt.ids[0] == bos and prompt.ids.count(bos) == 1
            # What today's tokenisation (special tokens on top of the template's) would have fed the policy:
            assert tokenizer(prompt.text, add_special_tokens=True)["input_ids"][:2] == [bos, bos]


def test_plain_prompts_keep_their_tokenisation(tmp_path):
    """`prompt` lines, .txt lines and the synthetic language: the tokenizer's special tokens, as before, even in a
    file that mixes them with conversations."""
    tokenizer = bos_tokenizer()
    texts = ["What is two plus two?", "Why is the sky blue?"]
    path = write_lines(tmp_path, [{"prompt": texts[0]}, {"messages": CHATS[0]}, {"prompt": texts[1]}])
    prompts, _ = load_prompts(config_for(path), tokenizer)
    expected = tokenizer(texts, add_special_tokens=True)["input_ids"]
    assert prompts[0] == Prompt(ids=expected[0], text=texts[0], messages=None)
    assert prompts[2] == Prompt(ids=expected[1], text=texts[1], messages=None)
    assert prompts[1].ids == template_ids(tokenizer, CHATS[0]) and prompts[1].messages == CHATS[0]

    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(texts) + "\n")
    assert [p.ids for p in load_prompts(config_for(txt), tokenizer)[0]] == expected

    synthetic = build_tokenizer()
    cfg = load_config(base=tiny_config())
    prompts, counts = load_prompts(cfg, synthetic)
    task_prompts = SyntheticTask().prompts
    assert [p.ids for p in prompts] == synthetic(task_prompts, add_special_tokens=True)["input_ids"]
    assert [p.text for p in prompts] == task_prompts and all(p.messages is None for p in prompts)
    assert counts == {"data/prompts": len(task_prompts), "data/dropped_too_long": 0}


def test_custom_keys(tmp_path):
    tokenizer = policy_tokenizer()
    path = write_lines(tmp_path, [{"conversation": CHATS[1]}, {"text": "hello"}])
    prompts, _ = load_prompts(config_for(path, messages_key="conversation", prompt_key="text"), tokenizer)
    assert prompts[0].messages == CHATS[1] and prompts[1].text == "hello"
    with pytest.raises(ConfigError, match="data.messages_key: expected a key other than data.prompt_key='text', "
                                          "got 'text'"):
        config_for(path, messages_key="text", prompt_key="text")


# ------------------------------------------------------------------ length

def test_long_prompts_are_dropped_never_cut(tmp_path):
    tokenizer = policy_tokenizer()
    chats = CHATS + [[{"role": "user", "content": "Numbers like 3.14159 and 2718 appear, as do e-mails. " * 3}]]
    lengths = [len(template_ids(tokenizer, chat)) for chat in chats]
    limit = sorted(lengths)[1]  # the two shortest are kept, one of them exactly at the limit
    assert len(set(lengths)) == len(lengths)
    path = write_lines(tmp_path, [{"messages": chat} for chat in chats])
    prompts, counts = load_prompts(config_for(path, max_prompt_length=limit), tokenizer)
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    assert len(kept) == 2 and counts == {"data/prompts": 2, "data/dropped_too_long": len(chats) - 2}
    assert [p.ids for p in prompts] == [template_ids(tokenizer, chats[i]) for i in kept]  # whole, header included


def test_every_prompt_too_long_is_an_error(tmp_path):
    tokenizer = policy_tokenizer()
    path = write_lines(tmp_path, [{"messages": chat} for chat in CHATS])
    lengths = [len(template_ids(tokenizer, chat)) for chat in CHATS]
    limit = min(lengths) - 1
    with pytest.raises(ConfigError) as error:
        load_prompts(config_for(path, max_prompt_length=limit), tokenizer)
    message = str(error.value)
    assert message.startswith(f"data.max_prompt_length: expected at least one prompt of at most {limit} tokens")
    assert f"every prompt of {path} longer ({min(lengths)} to {max(lengths)} tokens)" in message


# ------------------------------------------------------------------ malformed lines

REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}" + POLICY_TEMPLATE
)
USER = {"role": "user", "content": "hi"}
BAD_LINES = [
    ("not json", "data.prompt_file: line 3 of {path} is not JSON"),
    ({"text": "hi"}, "data.prompt_key: expected every line of {path} to hold a string under 'prompt', got line 3, "
                     "with no string under 'prompt' and no conversation under 'messages' (data.messages_key)"),
    ({"prompt": 3}, "data.prompt_key: expected every line of {path} to hold a string under 'prompt', got line 3"),
    (["hi"], "data.prompt_key: expected every line of {path} to hold a string under 'prompt', got line 3"),
    ({"prompt": "hi", "messages": [USER]}, "data.messages_key: expected line 3 of {path} to hold either a "
                                           "conversation under 'messages' or a string under 'prompt' "
                                           "(data.prompt_key), got both"),
    ({"messages": "hi"}, "data.messages_key: expected a list of {{role, content}} turns under 'messages', "
                         "got str \"hi\" (line 3 of {path})"),
    ({"messages": []}, "data.messages_key: expected a conversation of at least one turn under 'messages', got an "
                       "empty list (line 3 of {path})"),
    ({"messages": ["hi"]}, "data.messages_key: expected every turn to be a {{role, content}} dict of strings under "
                           "'messages', got turn 0: str \"hi\" (line 3 of {path})"),
    ({"messages": [{"role": "user"}]}, "got turn 0: dict {{\"role\": \"user\"}} (line 3 of {path})"),
    ({"messages": [USER, {"role": "assistant", "content": 2}]}, "got turn 1: dict"),
    ({"messages": [USER, {"role": "assistant", "content": "hello"}]},
     "data.messages_key: expected a conversation whose last turn is the user's under 'messages', got a last turn "
     "of role 'assistant' (line 3 of {path})"),
    ({"messages": [{"role": "tool", "content": "42"}, USER]},
     "data.messages_key: expected a conversation the policy's chat template accepts under 'messages', got one it "
     "refuses: unknown role tool (line 3 of {path})"),
]


def refusing_tokenizer():
    tokenizer = copy.deepcopy(policy_tokenizer())
    tokenizer.chat_template = REFUSING_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("line, expected", BAD_LINES, ids=[
    "not-json", "no-key", "prompt-not-a-string", "not-an-object", "both-keys", "messages-not-a-list", "empty",
    "turn-not-a-dict", "turn-without-content", "content-not-a-string", "last-turn-not-the-users", "refused-role"])
def test_malformed_lines_are_named(tmp_path, line, expected):
    path = write_lines(tmp_path, [{"messages": CHATS[0]}, "", line])  # a blank line counts: this is line 3
    with pytest.raises(ConfigError) as error:
        load_prompts(config_for(path), refusing_tokenizer())
    message = str(error.value)
    assert expected.format(path=path) in message
    assert str(path) in message and "line 3" in message


def test_a_conversation_needs_a_chat_template(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "sea :"}, {"messages": [{"role": "user", "content": "sea"}]}])
    with pytest.raises(ConfigError, match=r"data.messages_key: expected a policy tokenizer with a chat template to "
                                          r"render the conversation under 'messages' \(line 2 of .*prompts.jsonl\), "
                                          r"got model.tokenizer 'synthetic' without one"):
        load_prompts(config_for(path), build_tokenizer())


# ------------------------------------------------------------------ in the trainer

def saved_tokenizer(tmp_path, tokenizer):
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    return str(folder)


def chat_run(tmp_path, path, **sections):
    return tiny_config({"model": {"tokenizer": saved_tokenizer(tmp_path, policy_tokenizer()),
                                  "policy": {"config": dict(TINY_POLICY)},
                                  "reward_model": {"config": dict(TINY_MODEL)}},
                        "data": {"source": "file", "prompt_file": str(path), "max_prompt_length": 56},
                        "run": {"output_dir": str(tmp_path / "run"), "total_steps": 2, "save_every": 0,
                                "eval_every": 0, "eval_prompts": 2, "num_threads": 1, "progress": False},
                        "generation": {"max_new_tokens": 4}}, sections)


@pytest.mark.parametrize("line, expected", [
    ({"messages": [USER, {"role": "assistant", "content": "hello"}]}, "last turn is the user's"),
    ({"messages": []}, "at least one turn"),
    ({"text": "hi"}, "data.prompt_key: expected every line"),
], ids=["last-turn", "empty", "no-key"])
def test_bad_lines_fail_before_any_model_loads(tmp_path, monkeypatch, line, expected):
    import red_ppo.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the prompts were checked")
    monkeypatch.setattr(red_ppo.trainer, "build_model", refuse)
    path = write_lines(tmp_path, [{"messages": CHATS[0]}, line])
    with pytest.raises(ConfigError, match=expected) as error:
        red_ppo.trainer.PPOTrainer(load_config(base=chat_run(tmp_path, path)))
    assert str(path) in str(error.value) and "line 2" in str(error.value)


def test_a_chat_run_end_to_end(tmp_path, monkeypatch):
    """Two PPO steps on a `messages` file: the policy is fed exactly the rendered prompts' ids, one over-long
    prompt is dropped, and the first step's row counts the prompts."""
    import red_ppo.trainer

    tokenizer = policy_tokenizer()
    chats = CHATS[:2] + [[{"role": "user", "content": "Reward models read text; policies write tokens."}],
                         [{"role": "user", "content": "Why is the sky blue?"}], CHATS[2]]
    assert [len(template_ids(tokenizer, chat)) > 56 for chat in chats] == [False] * 4 + [True]
    path = write_lines(tmp_path, [{"messages": chat} for chat in chats])
    trainer = red_ppo.trainer.PPOTrainer(load_config(base=chat_run(tmp_path, path)))
    every = trainer.sampler.prompts + trainer.eval_prompts
    assert len(trainer.sampler.prompts) == 2 and len(trainer.eval_prompts) == 2
    assert sorted(p.ids for p in every) == sorted(template_ids(tokenizer, chat) for chat in chats[:4])

    expected = copy.deepcopy(trainer.sampler).next_batch(trainer.cfg.rollout.batch_size)
    fed = []
    original = red_ppo.trainer.generate_rollout

    def recording(policy, ids, mask, *args):
        fed.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])
        return original(policy, ids, mask, *args)
    monkeypatch.setattr(red_ppo.trainer, "generate_rollout", recording)
    trainer.train()
    assert fed[0] == [p.ids for p in expected]
    # two training steps, then the final evaluation: the reference's responses to compare with, and the policy's
    assert len(fed) == 4
    assert sorted(fed[2]) == sorted(fed[3]) == sorted(p.ids for p in trainer.eval_prompts)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["data/prompts"] == 4 and rows[0]["data/dropped_too_long"] == 1
    assert "data/prompts" not in rows[1]
    assert math.isfinite(rows[1]["loss/policy"]) and math.isfinite(rows[1]["eval/score"])
