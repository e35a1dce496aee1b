"""Preference pairs for reward-model training: jsonl / parquet rows ``{prompt, chosen,
rejected}`` (field names configurable) -> token ids, with bad rows counted, not fatal.

Each side is tokenized the way the RL loop presents a response to the reward model: the
prompt as the policy sees it (the tokenizer's chat template with the generation prompt, or
plain text with the tokenizer's special tokens), then the response tokens, then EOS (a
finished response ends with it). Prompt and response are tokenized separately, as in the
loop, where the response ids come from the engine.

Values: ``prompt`` a string or a list of chat messages; ``chosen`` / ``rejected`` a string,
or a conversation (a list of messages) whose last message is the assistant's response.

Skipped and counted (a summary is logged; every row skipped is an error): rows that are
not JSON objects, a missing or empty-typed field, a chosen equal to its rejected (the pair
says nothing), a side longer than ``max_length`` tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from megappo.data.sources import RowProblem, read_rows

log = logging.getLogger("megappo")


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    """Response tokens of the preferred answer (EOS included)."""
    rejected_ids: list[int]
    index: int
    """Position among the kept pairs of its file."""

    @property
    def chosen_seq(self) -> list[int]:
        return self.prompt_ids + self.chosen_ids

    @property
    def rejected_seq(self) -> list[int]:
        return self.prompt_ids + self.rejected_ids


@dataclass(frozen=True)
class PreferenceSet:
    pairs: list[PreferencePair]
    rows: int
    """Rows read from the file (blank lines aside)."""
    skipped: dict[str, int]
    """Skipped rows by reason."""


@dataclass(frozen=True)
class PreferenceFields:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def _message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _prompt(row: dict, key: str) -> Union[str, list, RowProblem]:
    if key not in row:
        return RowProblem(f"missing field '{key}'")
    value = row[key]
    if isinstance(value, str) or _message_list(value):
        return value
    return RowProblem(f"field '{key}' is not a string or a list of chat messages", type(value).__name__)


def _response(row: dict, key: str) -> Union[str, RowProblem]:
    if key not in row:
        return RowProblem(f"missing field '{key}'")
    value = row[key]
    if isinstance(value, str):
        return value
    if _message_list(value) and value[-1]["role"] == "assistant":
        return value[-1]["content"]
    return RowProblem(f"field '{key}' is not a string or a conversation ending with an assistant message", type(value).__name__)


def prompt_text(tokenizer: Any, prompt: Union[str, list], *, use_template: bool, system_prompt: Optional[str]) -> str:
    """The prompt as the policy is given it (chat template with the generation prompt, or plain)."""
    if use_template:
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """A response's tokens as the engine would return a finished one: text, then EOS."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def load_preference_pairs(
    path: Union[str, Path],
    tokenizer: Any,
    *,
    fields: PreferenceFields = PreferenceFields(),
    use_template: bool,
    system_prompt: Optional[str] = None,
    max_length: int,
    role: str = "reward_train.train_path",
) -> PreferenceSet:
    """The usable pairs of ``path`` (see the module doc). ``role`` names the setting in
    messages. ``ValueError`` when no row is usable."""
    skips: Counter = Counter()
    first: dict[str, str] = {}
    pairs: list[PreferencePair] = []
    total = 0

    def skip(location: str, problem: RowProblem) -> None:
        skips[problem.reason] += 1
        first.setdefault(problem.reason, f"{location}{': ' + problem.detail if problem.detail else ''}")

    for location, row in read_rows(path, role=role):
        total += 1
        if isinstance(row, RowProblem):
            skip(location, row)
            continue
        prompt = _prompt(row, fields.prompt)
        chosen, rejected = _response(row, fields.chosen), _response(row, fields.rejected)
        problem = next((x for x in (prompt, chosen, rejected) if isinstance(x, RowProblem)), None)
        if problem is not None:
            skip(location, problem)
            continue
        if chosen == rejected:
            skip(location, RowProblem(f"identical '{fields.chosen}' and '{fields.rejected}'"))
            continue
        p_ids = list(tokenizer(prompt_text(tokenizer, prompt, use_template=use_template, system_prompt=system_prompt),
                               add_special_tokens=not use_template)["input_ids"])
        c_ids, r_ids = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
        longest = len(p_ids) + max(len(c_ids), len(r_ids))
        if longest > max_length:
            skip(location, RowProblem(f"over reward_train.max_length={max_length} tokens", f"{longest} tokens"))
            continue
        if not p_ids:
            skip(location, RowProblem("empty prompt after tokenization"))
            continue
        pairs.append(PreferencePair(p_ids, c_ids, r_ids, index=len(pairs)))
    if skips:
        detail = "; ".join(f"{reason}: {n} (first at {first[reason]})" for reason, n in skips.most_common())
        log.warning("%s (%s): skipped %d of %d rows: %s", path, role, sum(skips.values()), total, detail)
    if not pairs:
        why = f": {'; '.join(f'{r} ({n})' for r, n in skips.most_common())}" if skips else " (the file has no rows)"
        raise ValueError(f"{path} ({role}): no usable preference pairs{why}")
    return PreferenceSet(pairs, total, dict(skips))
