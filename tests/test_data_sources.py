"""Prompt files and tokenizers that are subtly bad (issue 14): a UTF-8 byte-order mark, a
corrupt parquet file (the error names the file and which setting chose it), a tokenizer
directory without a vocabulary (the error names the directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megappo.config.schema import DataConfig
from megappo.data.dataset import PromptDataset, check_tokenizer_dir, load_tokenizer, tokenizer_source
from megappo.toolkit.char_tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _parquet(path: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Incompressible prompts and small row groups, so the file has many pages to break.
    prompts = [f"{i * 7919 % 10007:05d}+{i}=" for i in range(rows)]
    pq.write_table(pa.table({"prompt": prompts, "answer": [str(i) for i in range(rows)]}), path, row_group_size=64)
    return path


def test_utf8_bom_keeps_the_first_row(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    path.write_bytes("\ufeff".encode() + b"\n".join(json.dumps(r).encode() for r in rows) + b"\n")
    data = PromptDataset.from_config(DataConfig(), tok, path=path)
    assert [(item.text, item.answer) for item in data] == [("1+2=", "3"), ("4+4=", "8")]
    # A BOM anywhere but the start of the file is still a malformed row, not silently eaten.
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows) + b"\n\xef\xbb\xbf" + json.dumps(rows[0]).encode())
    assert len(PromptDataset.from_config(DataConfig(), tok, path=path)) == 2


def test_corrupt_parquet_names_the_file_and_the_setting(tmp_path, tok):
    garbage = tmp_path / "train.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    cfg = DataConfig(train_path=str(garbage), eval_path=str(tmp_path / "eval.parquet"))
    with pytest.raises(ValueError) as error:
        PromptDataset.from_config(cfg, tok, path=garbage)
    message = str(error.value)
    assert message.startswith(f"{garbage} (data.train_path): not a readable parquet file")
    assert "magic bytes" in message  # pyarrow's own reason is kept

    # Broken in the middle: the footer reads, a later page does not.
    good = _parquet(tmp_path / "good.parquet", 2000)
    data = bytearray(good.read_bytes())
    assert len(PromptDataset.from_config(DataConfig(), tok, path=good)) == 2000
    broken = tmp_path / "eval.parquet"
    data[len(data) // 2 : len(data) // 2 + 400] = b"\x41" * 400
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{broken} \(data.eval_path\): not a readable parquet file( after row \d+)? \(corrupt or truncated\?\): .*thrift"):
        PromptDataset.from_config(cfg, tok, path=broken)


def test_same_file_for_train_and_eval_names_both(tmp_path, tok):
    garbage = tmp_path / "p.parquet"
    garbage.write_bytes(b"nope")
    cfg = DataConfig(train_path=str(garbage), eval_path=str(garbage))
    with pytest.raises(ValueError, match=r"\(data.train_path and data.eval_path\): not a readable parquet"):
        PromptDataset.from_config(cfg, tok, path=garbage)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl \(data.eval_path\)"):
        PromptDataset.from_config(DataConfig(eval_path=str(tmp_path / "missing.jsonl")), tok, path=tmp_path / "missing.jsonl")


def test_tokenizer_directory_without_tokenizer_files(tmp_path, tok):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        load_tokenizer(DataConfig(), model_dir)
    assert f"model.hf_path={str(model_dir)!r}: no tokenizer files" in str(error.value)
    assert "tokenizer.json" in str(error.value) and "data.tokenizer_path" in str(error.value)
    with pytest.raises(ValueError, match=r"data.tokenizer_path='/nonexistent/tok': not a directory"):
        load_tokenizer(DataConfig(tokenizer_path="/nonexistent/tok"), model_dir)

    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    check_tokenizer_dir(tok_dir)
    assert tokenizer_source(DataConfig(tokenizer_path=str(tok_dir)), model_dir) == (str(tok_dir), "data.tokenizer_path")
    loaded = load_tokenizer(DataConfig(tokenizer_path=str(tok_dir)), model_dir)
    assert loaded("1+2=")["input_ids"] == tok("1+2=")["input_ids"]

    # A vocabulary file that is not one: transformers' failure still names the directory.
    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"model.hf_path={str(model_dir)!r}: cannot load the tokenizer"):
        load_tokenizer(DataConfig(), model_dir)
