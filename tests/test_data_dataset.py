"""Prompt datasets (megappo.data.dataset): formats, bad rows, chat templates, length filter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megappo.config.schema import DataConfig
from megappo.toolkit.char_tokenizer import build_char_tokenizer
from megappo.data.dataset import PromptDataset


@pytest.fixture(scope="module")
def plain_tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return build_char_tokenizer(chat_template=True)


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (JSON-encoded) or raw bytes lines."""
    with path.open("wb") as out:
        for row in rows:
            out.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            out.write(b"\n")
    return path


def test_jsonl_good_rows(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": 8}])
    data = PromptDataset.from_config(DataConfig(apply_chat_template="auto"), plain_tok, path=path)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first.text == "1+2=" and first.answer == "3" and first.index == 0
    assert first.prompt_ids == plain_tok("1+2=")["input_ids"]
    assert first.prompt_ids[0] == plain_tok.bos_token_id  # no template: the tokenizer's own BOS
    assert second.answer == "8" and second.index == 1


def test_bad_rows_counted_and_logged(tmp_path, plain_tok, caplog):
    rows = [
        {"prompt": "ok 1", "answer": "1"},
        {"answer": "2"},  # line 2: no prompt
        {"prompt": "   ", "answer": "3"},  # line 3: empty
        b'{"prompt": "caf\xe9", "answer": "4"}',  # line 4: latin-1 byte, not UTF-8
        b'{"prompt": "broken", ',  # line 5: malformed JSON
        {"prompt": 17, "answer": "6"},  # line 6: not a string or messages
        {"prompt": "ok 7", "answer": None},  # line 7: null answer
        [1, 2],  # line 8: not an object
        {"prompt": "x" * 40, "answer": "9"},  # line 9: 41 tokens > 16
        {"prompt": [{"role": "user", "content": "ok 10"}], "answer": "10"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = DataConfig(prompt_length=16, apply_chat_template="off")
    with caplog.at_level(logging.WARNING, logger="megappo.data"):
        data = PromptDataset.from_config(cfg, plain_tok, path=path)
    assert [item.text for item in data] == ["ok 1", "ok 10"]
    assert [item.index for item in data] == [0, 1]
    log = caplog.text
    for expected in [
        "bad.jsonl line 2: skipped: missing field 'prompt'",
        "line 3: skipped: empty prompt",
        "line 4: skipped: not valid UTF-8",
        "line 5: skipped: malformed JSON",
        "line 6: skipped: prompt is not a string",
        "line 7: skipped: missing field 'answer'",
        "line 8: skipped: not a JSON object",
        "line 9: skipped: over data.prompt_length=16 tokens (41 tokens)",
    ]:
        assert expected in log, expected
    summary = [r.getMessage() for r in caplog.records if "prompts usable" in r.getMessage()]
    assert len(summary) == 1
    assert "2 of 10 prompts usable; skipped 8:" in summary[0]
    assert "1 over data.prompt_length=16 tokens" in summary[0]


def test_many_bad_rows_logged_individually_only_a_few_times(tmp_path, plain_tok, caplog):
    rows = [{"answer": str(i)} for i in range(20)] + [{"prompt": "fine", "answer": "1"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="megappo.data"):
        data = PromptDataset.from_config(DataConfig(), plain_tok, path=path)
    assert len(data) == 1
    individual = [r for r in caplog.records if "skipped: missing field" in r.getMessage()]
    assert len(individual) == 3
    assert "skipped 20: 20 missing field 'prompt'" in caplog.text


def test_nothing_usable_is_a_clear_error(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "wrong_keys.jsonl", [{"question": "1+1=", "answer": "2"}] * 3)
    with pytest.raises(ValueError) as error:
        PromptDataset.from_config(DataConfig(), plain_tok, path=path)
    message = str(error.value)
    assert "wrong_keys.jsonl" in message and "no usable prompts" in message
    assert "3 missing field 'prompt'" in message and "question" in message  # the fields that exist

    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 50, "answer": "1"}])
    with pytest.raises(ValueError, match="long.jsonl: no usable prompts.*over data.prompt_length=8"):
        PromptDataset.from_config(DataConfig(prompt_length=8), plain_tok, path=too_long)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no usable prompts: it has no rows"):
        PromptDataset.from_config(DataConfig(), plain_tok, path=empty)


def test_unsupported_and_missing_files(tmp_path, plain_tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset.from_config(DataConfig(), plain_tok, path=tmp_path / "nope.jsonl")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        PromptDataset.from_config(DataConfig(), plain_tok, path=csv)


def test_parquet_with_custom_keys_and_bad_rows(tmp_path, plain_tok, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": ["2+2=", None, "", "3+3="],
            "solution": ["work #### 4", "#### 1", "#### 2", None],
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    cfg = DataConfig(prompt_key="question", answer_key="solution")
    with caplog.at_level(logging.WARNING, logger="megappo.data"):
        data = PromptDataset.from_config(cfg, plain_tok, path=path)
    assert [(item.text, item.answer) for item in data] == [("2+2=", "work #### 4")]
    assert "p.parquet row 1: skipped: missing field 'question'" in caplog.text
    assert "p.parquet row 2: skipped: empty prompt" in caplog.text
    assert "p.parquet row 3: skipped: missing field 'solution'" in caplog.text


def test_parquet_message_lists(tmp_path, chat_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]]
    pq.write_table(pa.table({"prompt": messages, "answer": ["2"]}), tmp_path / "m.parquet")
    data = PromptDataset.from_config(DataConfig(system_prompt="ignored"), chat_tok, path=tmp_path / "m.parquet")
    # The row's own system message is kept; data.system_prompt is not added twice.
    assert data[0].text == "<bos><|system|>Be brief.<|end|><|user|>1+1=<|end|><|assistant|>"


def test_chat_template_application(tmp_path, chat_tok, plain_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    cfg = DataConfig(system_prompt="Add.", apply_chat_template="auto")
    item = PromptDataset.from_config(cfg, chat_tok, path=path)[0]
    assert item.text == "<bos><|system|>Add.<|end|><|user|>1+2=<|end|><|assistant|>"
    ids = chat_tok.convert_ids_to_tokens(item.prompt_ids)
    assert ids[:3] == ["<bos>", "<|system|>", "A"] and ids[-1] == "<|assistant|>"
    assert ids.count("<bos>") == 1  # the template's BOS only, none added by the tokenizer

    off = PromptDataset.from_config(DataConfig(system_prompt="Add.", apply_chat_template="off"), chat_tok, path=path)
    assert off[0].text == "Add.\n\n1+2="

    auto_without = PromptDataset.from_config(DataConfig(apply_chat_template="auto"), plain_tok, path=path)
    assert auto_without[0].text == "1+2="

    with pytest.raises(ValueError, match="apply_chat_template is 'on' but the tokenizer .* has no chat template"):
        PromptDataset.from_config(DataConfig(apply_chat_template="on"), plain_tok, path=path)


def test_quiet_on_other_ranks(tmp_path, plain_tok, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"answer": "2"}])
    with caplog.at_level(logging.INFO, logger="megappo.data"):
        PromptDataset.from_config(DataConfig(), plain_tok, path=path, verbose=False)
    assert not caplog.records
