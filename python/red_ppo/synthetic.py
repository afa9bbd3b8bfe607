"""A small synthetic language with a real tokenizer and a hidden ground-truth scorer.

Prompts name a topic (and sometimes a mood, which nothing depends on): ``<bos> sea calm :``.
Responses are words followed, usually, by ``. <eos>``. The hidden scorer is a sum of
per-token contributions, so the true credit of every response token is known:

* a word of the prompt's topic +1, a word of another topic -1, a function word 0;
* repeating the previous word -1; every word after the first ``verbose_after`` (10) words -0.5;
* a malformed token (a special, a topic name, a mood, ':') -1;
* ending properly (``<eos>`` right after ``.``) ``proper_end`` (+2) on the ``<eos>``; a response
  that never emits ``<eos>`` ``no_eos`` (-2) on its last token.

The three settings in parentheses are the defaults; the demo chooses its own (`SyntheticConfig`, the
configuration's ``synthetic`` section, which also holds the demo's pre-training settings).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from red_ppo.typed_yaml import doc, require

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PUNCTUATION = [":", "."]
TOPIC_WORDS = {
    "sea": ["wave", "boat", "salt", "shore", "fish"],
    "sky": ["cloud", "star", "rain", "wind", "blue"],
    "city": ["street", "tower", "bus", "crowd", "light"],
    "forest": ["tree", "leaf", "moss", "deer", "path"],
    "music": ["song", "drum", "note", "choir", "piano"],
    "food": ["bread", "soup", "spice", "fruit", "tea"],
    "sport": ["goal", "race", "ball", "team", "coach"],
    "space": ["orbit", "comet", "moon", "rocket", "planet"],
}
TOPICS = list(TOPIC_WORDS)
MOODS = ["calm", "bright", "dark", "quick"]
FUNCTION_WORDS = ["the", "a", "and", "of", "with", "in", "is", "very", "near", "old"]
VOCAB = SPECIALS + PUNCTUATION + TOPICS + MOODS + [w for ws in TOPIC_WORDS.values() for w in ws] + FUNCTION_WORDS

ON_TOPIC, OFF_TOPIC, FUNCTION, REPEAT, VERBOSE, MALFORMED = 1.0, -1.0, 0.0, -1.0, -0.5, -1.0
PROPER_END, NO_EOS = 2.0, -2.0
VERBOSE_AFTER = 10


def build_tokenizer():
    """The language's word-level tokenizer as a `PreTrainedTokenizerFast` (left padding, <bos> prepended)."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    return tokenizer


class SyntheticTask:
    """Prompts, the language's own samples, and the hidden ground-truth scorer (on token ids)."""

    def __init__(self, max_words: int = 12, verbose_after: int = VERBOSE_AFTER, proper_end: float = PROPER_END,
                 no_eos: float = NO_EOS) -> None:
        self.max_words = max_words
        self.verbose_after, self.proper_end, self.no_eos = verbose_after, proper_end, no_eos
        self.id = {token: i for i, token in enumerate(VOCAB)}
        self.word = VOCAB
        self.eos_id, self.pad_id, self.bos_id = self.id["<eos>"], self.id["<pad>"], self.id["<bos>"]
        self.period_id = self.id["."]
        self.topic_of_word = {self.id[w]: t for t, ws in TOPIC_WORDS.items() for w in ws}
        self.function_ids = {self.id[w] for w in FUNCTION_WORDS}
        self.prompts = [f"{t} {m} :" if m else f"{t} :" for t in TOPICS for m in [None] + MOODS]

    # -- the language -------------------------------------------------------------

    def sample_response(self, rng: random.Random, topic: str, max_words: int | None = None,
                        perturb: bool = False) -> str:
        """One of the language's responses: words, then usually '. <eos>'.

        ``perturb`` widens the distribution (longer, repetitive, unterminated, malformed) so that
        a reward model trained on it has seen what a policy under optimisation may write.
        """
        max_words = max_words or self.max_words
        n = rng.randint(1, max_words)
        words: list[str] = []
        for _ in range(n):
            u = rng.random()
            if u < 0.45:
                words.append(rng.choice(TOPIC_WORDS[topic]))
            elif u < 0.75:
                words.append(rng.choice(FUNCTION_WORDS))
            else:
                words.append(rng.choice(TOPIC_WORDS[rng.choice([t for t in TOPICS if t != topic])]))
        ending = [".", "<eos>"] if rng.random() < 0.7 else ["<eos>"]
        if perturb:
            kind = rng.randrange(4)
            if kind == 0 and words:
                i = rng.randrange(len(words))
                words.insert(i, words[i])
            elif kind == 1:
                ending = [] if rng.random() < 0.5 else ["."]
            elif kind == 2:
                words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS + MOODS + [":", "<bos>"]))
        return " ".join(words + ending)

    def sample_prompt(self, rng: random.Random) -> str:
        return rng.choice(self.prompts)

    def topic_of_prompt(self, prompt_ids: list[int]) -> str:
        for i in prompt_ids:
            if self.word[i] in TOPIC_WORDS:
                return self.word[i]
        raise ValueError(f"prompt_ids: expected a prompt that names a topic, got {[self.word[i] for i in prompt_ids]}")

    # -- the hidden scorer --------------------------------------------------------

    def token_credit(self, prompt_ids: list[int], response_ids: list[int], complete: bool = True) -> list[float]:
        """True contribution of every response token (truncated after the first <eos>).

        ``complete=False`` reads ``response_ids`` as an unfinished prefix: no missing-EOS term."""
        topic = self.topic_of_prompt(prompt_ids)
        credit: list[float] = []
        previous = prompt_ids[-1] if prompt_ids else None
        for position, token in enumerate(response_ids):
            if token == self.eos_id:
                credit.append(self.proper_end if previous == self.period_id else 0.0)
                return credit
            if token == self.period_id:
                value = 0.0
            elif token in self.topic_of_word:
                value = ON_TOPIC if self.topic_of_word[token] == topic else OFF_TOPIC
            elif token in self.function_ids:
                value = FUNCTION
            else:
                value = MALFORMED
            if token == previous and token != self.period_id:
                value += REPEAT
            if position >= self.verbose_after:
                value += VERBOSE
            credit.append(value)
            previous = token
        if credit and complete:
            credit[-1] += self.no_eos
        return credit

    def score(self, prompt_ids: list[int], response_ids: list[int], complete: bool = True) -> float:
        return float(sum(self.token_credit(prompt_ids, response_ids, complete)))

    def metrics(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, float]:
        """Per-batch ground-truth metrics, for the trainer's ``sample_metrics`` hook."""
        scores = [self.score(p, r) for p, r in zip(prompts, responses)]
        proper = [len(r) >= 2 and r[-1] == self.eos_id and r[-2] == self.period_id for r in responses]
        return {"gt/score": float(np.mean(scores)), "gt/proper_ending": float(np.mean(proper))}


@dataclass
class SyntheticConfig:
    seed: int = doc(1234, "Seed of the synthetic language, its pre-training and its reward model.")
    max_words: int = doc(12, "Longest response (in words) of the language's own samples.")
    verbose_after: int = doc(10, "The hidden scorer's length penalty: -0.5 for every word after this many.")
    proper_end: float = doc(2.0, "The hidden scorer's term for ending properly ('. <eos>'), on the <eos>.")
    no_eos: float = doc(-2.0, "The hidden scorer's term for a response without <eos>, on its last token.")
    policy_config: dict = doc({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "max_position_embeddings": 64, "tie_word_embeddings": True},
                              "Config kwargs of the tiny policy (and of the reward model, which starts from it).")
    sft_steps: int = doc(600, "Supervised pre-training steps of the policy.")
    sft_batch_size: int = doc(64, "Sequences per supervised step.")
    sft_lr: float = doc(3e-3, "Peak learning rate of supervised pre-training (cosine decay, 5% warmup).")
    rm_init: Literal["policy", "scratch"] = doc("policy", "The reward model's start: 'policy', the supervised "
                                                          "policy's backbone with a fresh head; 'scratch', the same "
                                                          "architecture with every weight fresh.")
    rm_pairs: int = doc(4096, "Preference pairs for the reward model.")
    rm_prefix_pairs: float = doc(0.0, "Fraction of the pairs that compare two prefixes of one response (labelled "
                                      "by the truth of the prefixes, unfinished ones without the missing-EOS term).")
    rm_edit_pairs: float = doc(0.0, "Fraction of the pairs that compare a response with a one-token edit of it "
                                    "(a word replaced, inserted or deleted); the rest are two independent responses.")
    rm_epochs: int = doc(2, "Passes over the preference pairs.")
    rm_batch_size: int = doc(64, "Pairs per reward-model step.")
    rm_lr: float = doc(1e-3, "Peak learning rate of the reward model (cosine decay, 5% warmup).")
    label_temperature: float = doc(1.0, "Preference labels are drawn as P(a > b) = sigmoid((gt_a - gt_b) / T): "
                                        "Bradley-Terry label noise.")
    heldout_responses: int = doc(512, "Held-out responses for the reward model's accuracy and RED's credit fidelity.")

    def validate(self) -> None:
        for name in ("max_words", "sft_batch_size", "rm_pairs", "rm_epochs", "rm_batch_size", "heldout_responses"):
            require(getattr(self, name) >= 1, f"synthetic.{name}", "an integer >= 1", getattr(self, name))
        require(self.sft_steps >= 0, "synthetic.sft_steps", "an integer >= 0", self.sft_steps)
        require(self.seed >= 0, "synthetic.seed", "an integer >= 0", self.seed)
        for name in ("sft_lr", "rm_lr", "label_temperature"):
            require(getattr(self, name) > 0, f"synthetic.{name}", "a number > 0", getattr(self, name))
        require(isinstance(self.policy_config.get("model_type"), str), "synthetic.policy_config.model_type",
                "a transformers model type such as 'llama'", self.policy_config.get("model_type"))
        for name in ("rm_prefix_pairs", "rm_edit_pairs"):
            require(0 <= getattr(self, name) <= 1, f"synthetic.{name}", "a fraction in [0, 1]", getattr(self, name))
        require(self.rm_prefix_pairs + self.rm_edit_pairs <= 1, "synthetic.rm_edit_pairs",
                f"a fraction of at most 1 - rm_prefix_pairs = {1 - self.rm_prefix_pairs:g}", self.rm_edit_pairs)
        require(self.verbose_after >= 0, "synthetic.verbose_after", "an integer >= 0", self.verbose_after)

    def task(self) -> SyntheticTask:
        return SyntheticTask(self.max_words, self.verbose_after, self.proper_end, self.no_eos)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a, b) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    ra, rb = rank(np.asarray(a)), rank(np.asarray(b))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
