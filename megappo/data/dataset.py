"""Prompt datasets: rows from jsonl/parquet -> rendered, tokenized, length-filtered prompts.

A row holds a prompt under ``data.prompt_key`` (a string, or a list of chat messages
``{"role", "content"}``) and a reference answer under ``data.answer_key`` (a string or a
number). Rendering:

- with the tokenizer's chat template (``data.apply_chat_template``: ``auto`` uses it when
  the tokenizer has one, ``on`` requires it, ``off`` never uses it): a string prompt becomes
  one user message, ``data.system_prompt`` is prepended as a system message unless the
  row's messages already start with one, and the template is applied with the generation
  prompt; the text is tokenized without adding special tokens (the template has them).
- without: the prompt text (a message list's contents joined by blank lines), after
  ``data.system_prompt`` and a blank line when it is set, tokenized with the tokenizer's
  own special tokens (e.g. BOS).

Rows that cannot be used are skipped and counted by reason, with the first few of each
reason logged individually (file and line/row): a missing or null field, an empty prompt,
a prompt that is neither a string nor a message list, non-UTF-8 bytes, malformed JSON,
and prompts over ``data.prompt_length`` tokens. A file with no usable row is an error that
names the file and the reasons. Parquet rows are numbered from 0, jsonl lines from 1.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from megappo.data.sources import RowProblem, column_names, read_rows

logger = logging.getLogger(__name__)

Prompt = Union[str, list[dict[str, str]]]
LOGGED_PER_REASON = 3
"""Skipped rows logged individually per reason; the rest only count."""
_TOKENIZE_CHUNK = 1024


@dataclass(frozen=True)
class PromptItem:
    """One usable prompt."""

    prompt_ids: list[int]
    """Token ids of the rendered prompt (at most ``data.prompt_length``)."""
    answer: str
    """The reference answer, for the reward function."""
    index: int
    """Position in the dataset (after skipping bad rows); stable across runs and ranks."""
    text: str
    """The rendered prompt text (chat template applied) that ``prompt_ids`` encode."""


def _check_prompt(value: Any, key: str) -> Union[Prompt, RowProblem]:
    if value is None:
        return RowProblem(f"missing field {key!r}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return RowProblem("not valid UTF-8", f"field {key!r}")
    if isinstance(value, str):
        return value if value.strip() else RowProblem("empty prompt")
    if isinstance(value, list):
        well_formed = all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
        if not well_formed:
            return RowProblem("prompt is not a string or a list of {role, content} messages")
        if not any(m["content"].strip() for m in value):
            return RowProblem("empty prompt")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return RowProblem("prompt is not a string or a list of {role, content} messages", type(value).__name__)


def _check_answer(value: Any, key: str) -> Union[str, RowProblem]:
    if value is None:
        return RowProblem(f"missing field {key!r}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return RowProblem("not valid UTF-8", f"field {key!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return RowProblem("answer is not a string or a number", type(value).__name__)
    return value if value.strip() else RowProblem("empty answer")


class _SkipReport:
    """Skip counts by reason, with the first few rows of each reason logged."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path = path
        self.counts: collections.Counter[str] = collections.Counter()
        self._log = logger.warning if verbose else logger.debug

    def skip(self, location: str, problem: RowProblem) -> None:
        self.counts[problem.reason] += 1
        if self.counts[problem.reason] <= LOGGED_PER_REASON:
            detail = f" ({problem.detail})" if problem.detail else ""
            self._log("%s %s: skipped: %s%s", self.path, location, problem.reason, detail)

    def summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.counts.most_common())


class PromptDataset(Sequence[PromptItem]):
    """The usable prompts of one file, in file order."""

    def __init__(self, items: Sequence[PromptItem], *, path: Union[str, Path, None] = None) -> None:
        self.items = list(items)
        self.path = Path(path) if path is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        return self.items[index]

    @classmethod
    def from_config(
        cls, data_cfg: Any, tokenizer: Any, *, path: Union[str, Path], verbose: bool = True
    ) -> "PromptDataset":
        """Load ``path`` with the ``data`` config section (``megappo.config.schema.DataConfig``).
        ``verbose=False`` (ranks other than 0) logs the skipped rows at debug level only."""
        path = Path(path)
        use_template = _use_chat_template(data_cfg.apply_chat_template, tokenizer)
        report = _SkipReport(path, verbose)
        rows: list[tuple[str, str, str]] = []  # (location, rendered text, answer)
        total = 0
        flattened = 0
        for location, row in read_rows(path, role=_config_key(data_cfg, path)):
            total += 1
            if isinstance(row, RowProblem):
                report.skip(location, row)
                continue
            prompt = _check_prompt(row.get(data_cfg.prompt_key), data_cfg.prompt_key)
            answer = _check_answer(row.get(data_cfg.answer_key), data_cfg.answer_key)
            problem = next((p for p in (prompt, answer) if isinstance(p, RowProblem)), None)
            if problem is not None:
                report.skip(location, problem)
                continue
            if use_template:
                try:
                    text = _apply_template(tokenizer, prompt, data_cfg.system_prompt)
                except Exception as error:  # a template that rejects this row (e.g. a system role)
                    report.skip(location, RowProblem("chat template failed", f"{type(error).__name__}: {error}"))
                    continue
            else:
                flattened += isinstance(prompt, list)
                text = _plain_text(prompt, data_cfg.system_prompt)
            rows.append((location, text, answer))  # type: ignore[arg-type]
        if flattened:
            logger.log(
                logging.WARNING if verbose else logging.DEBUG,
                "%s: %d message-list prompts joined into plain text (no chat template applied)",
                path,
                flattened,
            )
        items = _tokenize_and_filter(rows, tokenizer, use_template, data_cfg.prompt_length, report)
        _finish_report(path, data_cfg, total, len(items), report, verbose)
        return cls(items, path=path)


TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files of which a tokenizer directory needs at least one (the vocabulary itself)."""


def tokenizer_source(data_cfg: Any, model_path: Union[str, Path, None]) -> tuple[str, str]:
    """``(directory, setting)``: ``data.tokenizer_path`` when set, else the model's
    directory; ``setting`` is the config key that named it, for messages."""
    if data_cfg.tokenizer_path:
        return str(data_cfg.tokenizer_path), "data.tokenizer_path"
    if model_path is None:
        raise ValueError("no tokenizer: set data.tokenizer_path or model.hf_path")
    return str(model_path), "model.hf_path"


def check_tokenizer_dir(path: Union[str, Path], setting: str = "data.tokenizer_path") -> None:
    """Files-only check (no transformers import; the dry run can call it): ``path`` is a
    directory holding a tokenizer vocabulary. transformers' own error for a model directory
    without one ("Couldn't instantiate the backend tokenizer ...") names no directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{setting}={str(path)!r}: not a directory (expected a HuggingFace tokenizer or model directory)")
    if not any((path / name).is_file() for name in TOKENIZER_MODEL_FILES):
        raise ValueError(
            f"{setting}={str(path)!r}: no tokenizer files in the directory (expected one of "
            f"{', '.join(TOKENIZER_MODEL_FILES)}); point data.tokenizer_path at the directory that has them"
        )


def load_tokenizer(data_cfg: Any, model_path: Union[str, Path, None]) -> Any:
    """The run's tokenizer (``AutoTokenizer``, local files only), with any failure a
    ``ValueError`` naming the directory and the setting that chose it."""
    from transformers import AutoTokenizer

    path, setting = tokenizer_source(data_cfg, model_path)
    check_tokenizer_dir(path, setting)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{setting}={path!r}: cannot load the tokenizer: {type(error).__name__}: {error}") from error


def _config_key(data_cfg: Any, path: Path) -> str:
    """Which ``data.*_path`` setting names ``path`` ("" if none does), for error messages."""
    keys = [key for key in ("train_path", "eval_path") if getattr(data_cfg, key, None) and Path(getattr(data_cfg, key)) == path]
    return " and ".join(f"data.{key}" for key in keys)


def _use_chat_template(mode: str, tokenizer: Any) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"data.apply_chat_template must be 'auto', 'on' or 'off', got {mode!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"data.apply_chat_template is 'on' but the tokenizer {name!r} has no chat template; "
            "use 'auto' or 'off', or a tokenizer with a chat_template"
        )
    return mode == "on" or (mode == "auto" and has_template)


def _apply_template(tokenizer: Any, prompt: Prompt, system_prompt: Optional[str]) -> str:
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _plain_text(prompt: Prompt, system_prompt: Optional[str]) -> str:
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def _tokenize_and_filter(
    rows: list[tuple[str, str, str]], tokenizer: Any, use_template: bool, prompt_length: int, report: _SkipReport
) -> list[PromptItem]:
    items: list[PromptItem] = []
    for start in range(0, len(rows), _TOKENIZE_CHUNK):
        chunk = rows[start : start + _TOKENIZE_CHUNK]
        encoded = tokenizer([text for _, text, _ in chunk], add_special_tokens=not use_template)["input_ids"]
        for (location, text, answer), ids in zip(chunk, encoded):
            if len(ids) > prompt_length:
                report.skip(location, RowProblem(f"over data.prompt_length={prompt_length} tokens", f"{len(ids)} tokens"))
                continue
            items.append(PromptItem(prompt_ids=list(ids), answer=answer, index=len(items), text=text))
    return items


def _finish_report(path: Path, data_cfg: Any, total: int, kept: int, report: _SkipReport, verbose: bool) -> None:
    summary = report.summary()
    if kept == 0:
        hint = ""
        missing_prompt = report.counts.get(f"missing field {data_cfg.prompt_key!r}", 0)
        missing_answer = report.counts.get(f"missing field {data_cfg.answer_key!r}", 0)
        if missing_prompt or missing_answer:
            hint = (
                f" Fields in the file: {column_names(path)}; set data.prompt_key "
                f"({data_cfg.prompt_key!r}) and data.answer_key ({data_cfg.answer_key!r}) to match."
            )
        what = f"all {total} rows were skipped ({summary})" if total else "it has no rows"
        raise ValueError(f"{path}: no usable prompts: {what}.{hint}")
    level = logging.WARNING if report.counts else logging.INFO
    if not verbose:
        level = logging.DEBUG
    skipped = f"; skipped {sum(report.counts.values())}: {summary}" if report.counts else ""
    logger.log(level, "%s: %d of %d prompts usable%s", path, kept, total, skipped)
