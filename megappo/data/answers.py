"""Final-answer extraction for the rule-based rewards (pure string work, stdlib only).

GSM8K (Cobbe et al. 2021, arXiv 2110.14168): a reference solution ends with
``#### <number>``. The reference's answer is the number after the last ``####``; a
response's answer is the number after its last ``####`` or, when it has none, the last
number it contains (the lenient rule of the common GSM8K evaluators, e.g. verl's
``gsm8k.py`` "flexible" mode). Numbers are compared after normalization: thousands
separators, ``$`` and a sentence-final ``.`` are dropped, and numerically equal decimals
are written the same way (``72.00`` -> ``72``, ``-0`` -> ``0``).

MATH (Hendrycks et al. 2021, arXiv 2103.03874): the answer is the content of the last
``\\boxed{...}`` (or ``\\fbox{...}``, or the brace-less ``\\boxed 5``), with nested braces
balanced, as in the dataset's own ``last_boxed_only_string``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

GSM8K_MARKER = "####"

# A number as written in prose: optional sign and `$`, digits with optional thousands
# commas, optional decimals ("1,234.5", "$-3", ".5"). A trailing "." without digits is
# punctuation and is not captured.
_NUMBER_RE = re.compile(r"-?\$?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_AFTER_MARKER_RE = re.compile(re.escape(GSM8K_MARKER) + r"\s*(" + _NUMBER_RE.pattern + r")")
_BOXED_COMMANDS = ("\\boxed", "\\fbox")


def normalize_number(text: str) -> Optional[str]:
    """The canonical spelling of a number written in prose, or None when ``text`` is not one.

    Drops whitespace, ``$``, thousands commas and a trailing ``.``; writes integral values
    without decimals and strips trailing zeros of the others.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_reference(answer: str) -> Optional[str]:
    """The normalized number after the last ``####`` of a GSM8K reference; a reference
    without the marker (a bare ``"72"``) is read as the number itself."""
    if GSM8K_MARKER in answer:
        tail = answer.rsplit(GSM8K_MARKER, 1)[1]
        match = _NUMBER_RE.search(tail)
        return normalize_number(match.group(0)) if match else None
    return normalize_number(answer)


def extract_gsm8k_response(response: str) -> Optional[str]:
    """The normalized number after a response's last ``####``, else its last number."""
    marked = _AFTER_MARKER_RE.findall(response)
    if marked:
        return normalize_number(marked[-1])
    numbers = _NUMBER_RE.findall(response)
    for candidate in reversed(numbers):
        normalized = normalize_number(candidate)
        if normalized is not None:
            return normalized
    return None


def has_gsm8k_marker(response: str) -> bool:
    """True when the response states its answer GSM8K style: ``####`` then a number."""
    return _AFTER_MARKER_RE.search(response) is not None


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}`` (nested braces balanced) or
    brace-less ``\\boxed x``; None when there is none or its braces never close."""
    start = max(text.rfind(command) for command in _BOXED_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
    rest = text[start + len(command) :]
    if rest.startswith(" "):
        # "\boxed 5$": the MATH solutions' brace-less form runs to the closing `$`.
        content = rest[1:].split("$", 1)[0].strip()
        return content or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None


def has_boxed(response: str) -> bool:
    """True when the response has a complete ``\\boxed{...}`` (or ``\\fbox``) answer."""
    return extract_boxed(response) is not None


EOS_MARKERS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end|>")
"""End-of-sequence spellings a response may still contain when decoded with special tokens
(``<eos>`` is the toy task's character tokenizer's)."""
_INTEGER_RE = re.compile(r"-?\d+")


def _before_eos(response: str) -> str:
    cut = min((i for i in (response.find(m) for m in EOS_MARKERS) if i >= 0), default=len(response))
    return response[:cut].strip()


def exact_integer_reward(response: str, answer: str, prompt: str) -> bool:
    """Exact match of the response before its end-of-sequence marker with the answer (the
    ``toy`` reward: the toy arithmetic task in ``megappo.toolkit.toy``)."""
    return _before_eos(response) == answer.strip()


def is_single_integer(response: str) -> bool:
    """The response (before end of sequence) is one integer and nothing else."""
    return _INTEGER_RE.fullmatch(_before_eos(response)) is not None
