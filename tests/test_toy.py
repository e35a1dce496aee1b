"""The toy arithmetic task and the offline char tokenizer (megappo.toolkit.toy, char_tokenizer)."""

from __future__ import annotations

import json

import pytest

from megappo.config.schema import DataConfig
from megappo.toolkit.char_tokenizer import BOS, EOS, PAD, build_char_tokenizer, save_char_tokenizer
from megappo.data.dataset import PromptDataset
from megappo.data.answers import exact_integer_reward as toy_reward, is_single_integer as toy_well_formed
from megappo.toolkit.toy import TOY_TASKS, make_toy_dataset, toy_problems, toy_sft_pairs


@pytest.mark.parametrize("kind", sorted(TOY_TASKS))
def test_toy_problems_are_right_and_splits_disjoint(kind):
    train, held_out = toy_problems(kind, "train"), toy_problems(kind, "eval")
    assert train and held_out
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert 0.04 < len(held_out) / (len(train) + len(held_out)) < 0.2
    for prompt, answer in train[:50] + held_out[:50]:
        assert prompt.endswith("=") and eval(prompt[:-1]) == int(answer)  # noqa: S307 - our own digits


def test_make_toy_dataset_and_sft_pairs(tmp_path):
    path = make_toy_dataset(tmp_path / "toy" / "train.jsonl", 300, seed=1, kind="add2")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 300 and set(rows[0]) == {"prompt", "answer"}
    assert len({r["prompt"] for r in rows}) == 300  # no repeats within a pass
    assert rows == [json.loads(line) for line in make_toy_dataset(tmp_path / "again.jsonl", 300, 1).read_text().splitlines()]
    small = make_toy_dataset(tmp_path / "small.jsonl", 250, seed=0, kind="add1")  # more rows than problems
    assert len(small.read_text().splitlines()) == 250
    pairs = toy_sft_pairs(20, seed=2, kind="chain")
    assert len(pairs) == 20 and all(p.endswith("=") for p, _ in pairs)
    with pytest.raises(ValueError, match="unknown toy task kind 'mul'"):
        toy_problems("mul")


def test_toy_reward():
    assert toy_reward("68", "68", "23+45=")
    assert toy_reward(" 68<eos><pad>", "68", "")
    assert not toy_reward("680", "68", "") and not toy_reward("", "68", "")
    assert toy_well_formed("-3<eos>") and not toy_well_formed("3 apples")


def test_char_tokenizer_round_trip_and_specials():
    tok = build_char_tokenizer()
    text = "12+34=46\n(a b)\t~"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("é", add_special_tokens=False)["input_ids"]) == ["<unk>"]


def test_saved_tokenizer_loads_offline_with_chat_template(tmp_path):
    from transformers import AutoTokenizer

    directory = save_char_tokenizer(tmp_path / "tok", chat_template=True)
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2="}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|user|>2+2=<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 + 4  # four special tokens, four characters
    assert tok.decode(tok("9+9=18")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "9+9=18"


def test_toy_file_through_the_dataset(tmp_path):
    tok = build_char_tokenizer()
    path = make_toy_dataset(tmp_path / "t.jsonl", 10, seed=0)
    data = PromptDataset.from_config(DataConfig(prompt_length=16), tok, path=path)
    assert len(data) == 10 and all(item.prompt_ids[0] == tok.bos_token_id for item in data)
    assert all(toy_reward(item.answer, item.answer, item.text) for item in data)


def test_demo_summary_reads_metrics_and_plots(tmp_path, capsys):
    from megappo.demo import summarize

    rows = [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "reward/mean": 0.3}, {"step": 2, "reward/mean": 0.6, "eval/accuracy": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = summarize(tmp_path)
    assert out == {"warmup_accuracy": 0.25, "final_accuracy": 0.75}
    printed = capsys.readouterr().out
    assert "+50.0 points" in printed and "WARNING" not in printed
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + [{"step": 2, "eval/accuracy": 0.4}]))
    summarize(tmp_path)
    assert "below the demo's 30-point target" in capsys.readouterr().out

    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="no eval/accuracy rows"):
        summarize(tmp_path)
