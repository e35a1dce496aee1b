"""A character-level tokenizer built offline, for the CPU demo and the tests.

One token per character of a fixed alphabet (printable ASCII, tab and newline by
default), plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` and, for the optional chat
template, the role tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``.
Encoding prepends ``<bos>`` (as Llama-style tokenizers do); characters outside the
alphabet become ``<unk>``. It is a ``tokenizers`` WordLevel model behind a
``transformers`` fast tokenizer, so ``save_pretrained(dir)`` writes a ``tokenizer.json``
that ``AutoTokenizer.from_pretrained(dir)`` loads with no network.

The constants import nothing; ``tokenizers``/``transformers`` are imported when a
tokenizer is built.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Union

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
"""In id order: ``<pad>`` is 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3."""

DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
"""Digits, ASCII letters, punctuation, space, tab and newline (97 characters)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""``<bos><|system|>...<|end|><|user|>...<|end|><|assistant|>``; the model's answer then
ends with ``<eos>``."""


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, chat_template: bool = False) -> Any:
    """A ``transformers`` fast tokenizer over ``alphabet`` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = list(dict.fromkeys(alphabet))  # unique, in order
    clashes = [c for c in characters if c in SPECIAL_TOKENS]
    if clashes:
        raise ValueError(f"alphabet characters {clashes} clash with special tokens")
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *characters))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def save_char_tokenizer(
    directory: Union[str, Path], alphabet: str = DEFAULT_ALPHABET, *, chat_template: bool = False
) -> Path:
    """Build a char tokenizer and ``save_pretrained`` it into ``directory``; returns it."""
    directory = Path(directory)
    build_char_tokenizer(alphabet, chat_template=chat_template).save_pretrained(str(directory))
    return directory

