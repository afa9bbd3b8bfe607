"""Two tokenizers trained here with `tokenizers`, for the cross-tokenizer tests (no download).

The policy's is byte-level BPE (as GPT-2 and Qwen), with a small vocabulary so that rare multi-byte characters
split across tokens; the reward model's is word-level with a BOS and a chat template of its own, so its
tokens and the policy's disagree almost everywhere.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A café serves crème brûlée and naïve piñatas, déjà vu.",
    "Tokens, spans and rewards: every prefix has a score!",
    "Reward models read text; policies write tokens.",
    "Numbers like 3.14159 and 2718 appear, as do e-mails: a@b.org.",
    "Multi-byte text: 日本語のテキスト, Ελληνικά, русский, emoji 🙂🚀.",
    "  Leading spaces, trailing spaces   and\ttabs\nand new lines.\n",
    "What is two plus two? Two plus two is four.",
    "Please answer briefly: why is the sky blue? Because of Rayleigh scattering.",
]

RM_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
POLICY_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)


@functools.lru_cache(maxsize=None)
def policy_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, 320 tokens: the 256 bytes, a few merges, and <pad>, <eos> as special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   chat_template=POLICY_TEMPLATE, clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=None)
def rm_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level (words and punctuation), a BOS added in front, and its own chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="</s>", chat_template=RM_TEMPLATE)
