"""The reward model's single-process pieces (no process group): the Bradley-Terry loss and
its gradient against a hand computation, preference-data validation, the checks that
refuse what is not a one-label reward model, the export config, the pair order, and the
trainer's command-line errors. The multi-rank checks are in test_reward_model_parallel.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from hf_fixtures import REPO_ROOT, make_tiny_hf_model, make_tiny_hf_reward_model, write_char_tokenizer
from megappo.algo.bradley_terry import bradley_terry_loss
from megappo.data.preferences import PreferenceFields, load_preference_pairs


# ---- Bradley-Terry --------------------------------------------------------------------


def test_bradley_terry_loss_and_gradient_by_hand():
    """loss = -1/N sum log sigmoid(c - r); d loss / d c_i = -sigmoid(r_i - c_i) / N and
    d loss / d r_i = +sigmoid(r_i - c_i) / N, written out with math on plain floats."""
    c_vals, r_vals, n = [0.5, -1.0, 2.0], [0.0, 1.5, 2.0], 5.0  # N: the global pair count (> these 3)
    chosen = torch.tensor(c_vals, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(r_vals, dtype=torch.float64, requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected, num_pairs=n)
    loss.backward()

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    want = -sum(math.log(sig(c - r)) for c, r in zip(c_vals, r_vals)) / n
    assert loss.item() == pytest.approx(want, rel=1e-12)
    for i, (c, r) in enumerate(zip(c_vals, r_vals)):
        assert chosen.grad[i].item() == pytest.approx(-sig(r - c) / n, rel=1e-12)
        assert rejected.grad[i].item() == pytest.approx(sig(r - c) / n, rel=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie (2.0, 2.0) counts as wrong
    assert metrics["margin"].item() == pytest.approx((0.5 - 2.5 + 0.0) / 3)


def test_bradley_terry_loss_is_finite_for_large_margins_and_checks_shapes():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]), num_pairs=1)
    assert loss.item() == pytest.approx(400.0)
    with pytest.raises(ValueError, match="alike"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2), num_pairs=1)
    with pytest.raises(ValueError, match="num_pairs"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), num_pairs=0)


# ---- preference data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    write_char_tokenizer(d, 103)
    return AutoTokenizer.from_pretrained(d)


def _write_jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def test_preference_rows_are_validated_and_counted(tmp_path, char_tok):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "rejected": "4"},  # missing chosen
        {"prompt": "1+3=", "chosen": "4", "rejected": "4"},  # identical
        {"prompt": "1+4=", "chosen": 5, "rejected": "6"},  # not a string
        "not json",
        {"prompt": "9+9=", "chosen": "1" * 40, "rejected": "18"},  # too long
        {"prompt": [{"role": "user", "content": "2+2="}],
         "chosen": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "5"}]},
    ]
    data = load_preference_pairs(_write_jsonl(tmp_path / "p.jsonl", rows), char_tok, use_template=False, max_length=20)
    assert data.rows == 7 and len(data.pairs) == 2
    assert data.skipped == {
        "missing field 'chosen'": 1,
        "identical 'chosen' and 'rejected'": 1,
        "field 'chosen' is not a string or a conversation ending with an assistant message": 1,
        "malformed JSON": 1,
        "over reward_train.max_length=20 tokens": 1,
    }
    first = data.pairs[0]
    eos = char_tok.eos_token_id
    assert first.chosen_ids == char_tok("2", add_special_tokens=False)["input_ids"] + [eos]
    assert first.chosen_seq == first.prompt_ids + first.chosen_ids and first.rejected_seq[-1] == eos
    assert data.pairs[1].chosen_ids[:-1] == char_tok("4", add_special_tokens=False)["input_ids"]


def test_preference_field_names_are_configurable_and_all_bad_is_an_error(tmp_path, char_tok):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"q": "1+1=", "good": "2", "bad": "3"}])
    data = load_preference_pairs(path, char_tok, fields=PreferenceFields("q", "good", "bad"), use_template=False, max_length=64)
    assert len(data.pairs) == 1
    with pytest.raises(ValueError, match=r"no usable preference pairs: missing field 'chosen' \(1\)"):
        load_preference_pairs(path, char_tok, fields=PreferenceFields("q", "chosen", "bad"), use_template=False, max_length=64)


def test_preference_pairs_from_parquet(tmp_path, char_tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "chosen": ["2", "4"], "rejected": ["3", "4"]}), path)
    data = load_preference_pairs(path, char_tok, use_template=False, max_length=64)
    assert len(data.pairs) == 1 and data.skipped == {"identical 'chosen' and 'rejected'": 1}


# ---- what is (not) a reward model ----------------------------------------------------


def test_a_causal_lm_or_several_labels_is_not_a_reward_model(tmp_path):
    from megappo.weights.reward import reward_spec

    lm = make_tiny_hf_model(tmp_path, "llama", layers=2)
    with pytest.raises(ValueError, match=r"is a causal LM, not a reward model .*LlamaForSequenceClassification"):
        reward_spec(lm)
    two = make_tiny_hf_reward_model(tmp_path, "qwen2", layers=2, num_labels=2, name="two-labels", tokenizer=False)
    with pytest.raises(ValueError, match=r"num_labels=2 .*one label"):
        reward_spec(two)
    ok = make_tiny_hf_reward_model(tmp_path, "qwen3", layers=2, name="ok", tokenizer=False)
    assert reward_spec(ok).family == "qwen3"


def test_conversion_tool_sends_a_classifier_to_the_reward_checks(tmp_path, capsys):
    """tools/convert_hf_to_megatron.py given a two-label classifier: the reward converter's
    one-line error (exit 2), not the causal-LM path's complaint about a missing lm_head."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_hf2m", REPO_ROOT / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    two = make_tiny_hf_reward_model(tmp_path, "llama", layers=2, num_labels=2, name="two", tokenizer=False)
    assert tool.main(["--hf-dir", str(two), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "num_labels=2" in err and "lm_head" not in err, err
    assert not (tmp_path / "out").exists()
    one = make_tiny_hf_reward_model(tmp_path, "llama", layers=2, name="one", tokenizer=False)
    assert tool.main(["--hf-dir", str(one), "--out", str(tmp_path / "out"), "--ep", "2"]) == 2
    assert "a reward model has no virtual pipeline stages and no experts" in capsys.readouterr().err


def test_reward_tensor_problems_name_each_tensor(tmp_path):
    from megappo.models.spec import ModelSpec
    from megappo.weights.reward import expected_reward_shapes, tensor_problems

    spec = ModelSpec.from_hf_dir(make_tiny_hf_reward_model(tmp_path, "llama", layers=2, tokenizer=False))
    shapes = expected_reward_shapes(spec)
    assert shapes["score.weight"] == (1, 64) and "lm_head.weight" not in shapes
    bad = dict(shapes)
    del bad["score.weight"]
    bad["score.bias"] = (1,)
    bad["lm_head.weight"] = (103, 64)
    msg = "\n".join(tensor_problems(spec, bad))
    assert "missing tensor score.weight" in msg and "not a reward model" in msg
    assert "score.bias present" in msg and "unexpected tensor lm_head.weight" in msg


def test_export_config_is_a_one_label_classifier(tmp_path, char_tok):
    from hf_fixtures import read_config
    from megappo.rm_trainer import reward_hf_config

    lm = read_config(make_tiny_hf_model(tmp_path, "qwen2", layers=2, tie=True))
    cfg = reward_hf_config(lm, char_tok)
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["pad_token_id"] == char_tok.pad_token_id == 0
    from transformers import AutoConfig

    assert AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"}, model_type="qwen2").num_labels == 1


def test_pair_order_covers_each_epoch_once():
    from megappo.rm_trainer import step_pairs

    steps = [step_pairs(s, 10, 3, seed=7) for s in range(1, 7)]  # 3 steps per epoch, one pair dropped
    first, second = torch.cat(steps[:3]), torch.cat(steps[3:])
    assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9
    assert not torch.equal(first, second)  # reshuffled per epoch
    assert torch.equal(step_pairs(5, 10, 3, seed=7), steps[4])  # a function of the step only (resume)


# ---- the trainer's command line -------------------------------------------------------


def _train_rm(*args):
    return subprocess.run([sys.executable, "-m", "megappo.train_rm", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_train_rm_cli_user_errors(tmp_path):
    r = _train_rm("reward_train.batch_sise=4")
    assert r.returncode == 2 and "unknown key 'batch_sise'" in r.stderr and "batch_size" in r.stderr
    r = _train_rm(f"model.hf_path={tmp_path}")
    assert r.returncode == 2 and "reward_train.train_path is not set" in r.stderr
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1", "chosen": "2", "rejected": "3"}])
    r = _train_rm(f"model.hf_path={tmp_path}", f"reward_train.train_path={data}", "reward_train.batch_size=0")
    assert r.returncode == 2 and "reward_train.batch_size must be >= 1" in r.stderr
    r = _train_rm(f"model.hf_path={tmp_path}", f"reward_train.train_path={data}", "reward_train.epochs=0", "--dry-run")
    assert r.returncode == 2 and "reward_train.epochs must be >= 1" in r.stderr  # a bad value fails a dry run too
    r = _train_rm(f"model.hf_path={tmp_path}", f"reward_train.train_path={data}", "--dry-run")
    assert r.returncode == 0 and "reward_train:" in r.stdout and str(data) in r.stdout


# ---- the reward model in the loop: tokenizers and combining ---------------------------


def test_combine_rewards_weights_and_per_source_metrics():
    from megappo.rollout.reward_model import combine_rewards

    rule, model = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, -1.5, 2.0, 3.0])
    total, m = combine_rewards(rule, model, weight=2.0, rule_weight=0.5)
    assert torch.allclose(total, torch.tensor([1.5, -3.0, 4.5, 6.0]))
    assert m["reward/model/mean"] == pytest.approx(1.0)
    assert m["reward/model/std"] == pytest.approx(math.sqrt(((0.5 - 1) ** 2 + 2.5**2 + 1 + 4) / 4))
    assert m["reward/rule/mean"] == pytest.approx(0.5)
    only, m = combine_rewards(rule, model, weight=1.0, rule_weight=0.0)  # the model is the only reward
    assert torch.equal(only, model) and "reward/rule/mean" in m
    with pytest.raises(ValueError, match=r"non-finite scores for rows \[1\]"):
        combine_rewards(None, torch.tensor([0.0, float("nan")]), weight=1.0, rule_weight=0.0)


def test_reward_tokenizer_resolution_and_retokenization(tmp_path, char_tok):
    from transformers import AutoTokenizer

    policy = tmp_path / "policy-tok"
    write_char_tokenizer(policy, 103, fused_decode=True)
    char_tok = AutoTokenizer.from_pretrained(policy)
    assert char_tok.decode(char_tok("3+4=", add_special_tokens=False)["input_ids"]) == "3+4="

    from megappo.models.batch import TokenBatch
    from megappo.rollout.reward_model import resolve_reward_tokenizer, retokenize

    same = make_tiny_hf_reward_model(tmp_path, "llama", layers=2, name="same")
    assert resolve_reward_tokenizer(str(same), None, char_tok, 103) is None  # reads the policy's ids
    bare = make_tiny_hf_reward_model(tmp_path, "llama", layers=2, vocab=64, name="bare", tokenizer=False)
    with pytest.raises(ValueError, match=rf"vocabulary \(64\) is smaller than the policy tokenizer's \({len(char_tok)}\).*reward.model.tokenizer_path"):
        resolve_reward_tokenizer(str(bare), None, char_tok, 64)
    other = tmp_path / "other-tok"
    write_char_tokenizer(other, 103, reverse=True, fused_decode=True)
    rm_tok = resolve_reward_tokenizer(str(bare), str(other), char_tok, 103)
    assert rm_tok is not None
    rm_tok = AutoTokenizer.from_pretrained(other)
    p, r = char_tok("3+4=", add_special_tokens=False)["input_ids"], char_tok("7", add_special_tokens=False)["input_ids"]
    eos = char_tok.eos_token_id
    ids = torch.tensor([p + r + [eos], p + r + [0]])
    tokens = TokenBatch(ids, torch.tensor([4, 4]), torch.tensor([2, 1]))
    got = retokenize(tokens, torch.tensor([False, True]), char_tok, rm_tok)
    want = rm_tok("3+4=7", add_special_tokens=False)["input_ids"]
    assert got == [want + [rm_tok.eos_token_id], want] and want != p + r


def test_toy_preferences_reject_a_wrong_answer_and_keep_the_splits_apart(tmp_path):
    from megappo.toolkit.toy_preferences import make_toy_preferences

    train = [json.loads(x) for x in make_toy_preferences(tmp_path / "t.jsonl", 500, 1).read_text().splitlines()]
    held = [json.loads(x) for x in make_toy_preferences(tmp_path / "e.jsonl", 60, 1, split="eval").read_text().splitlines()]
    for row in train + held:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["chosen"] == row["answer"] == str(int(a) + int(b)) and row["rejected"] != row["chosen"]
        assert int(row["rejected"]) >= 0
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_rm_recipe_dry_runs():
    r = _train_rm("--config", str(REPO_ROOT / "recipes" / "toy_rm_cpu.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "reward_train:" in r.stdout and "preferences_train.jsonl" in r.stdout and "must be the HF directory" in r.stderr


def test_gsm8k_rm_recipe_is_ppo_with_only_the_reward_model_on_one_8_gpu_node():
    from megappo.config import load_config

    cfg = load_config(REPO_ROOT / "recipes" / "gsm8k_ppo_rm.yaml", world_size=8)
    assert cfg.algo.preset == "ppo" and cfg.rollout.engine == "sglang"
    rm = cfg.reward.model
    assert rm.hf_path.startswith("/path/to/") and (rm.weight, rm.rule_weight, rm.on_cpu) == (1.0, 0.0, True)


def test_reward_model_layout_defaults_to_the_actors_and_a_misfit_names_the_fields(tmp_path):
    """The reward model's TP x PP (reward.model.tensor_model_parallel_size /
    pipeline_model_parallel_size) defaults to the actor's; a layout that does not divide its
    heads or layers, or the world size, is a config error naming the fields that set it."""
    from megappo.config import ConfigError, load_config

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
                                                 "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 3}))
    base = ["algo.preset=grpo", "parallel.device=cpu", "rollout.engine=embedded", f"reward.model.hf_path={rm}"]
    with pytest.raises(ConfigError, match=r"parallel.tensor_model_parallel_size=2 does not divide num_key_value_heads=3 of reward.model.hf_path=.*defaults to the actor's"):
        load_config(None, [*base, "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"parallel.pipeline_model_parallel_size=2 does not divide num_hidden_layers=3 of reward.model.hf_path="):
        load_config(None, [*base, "parallel.pipeline_model_parallel_size=2"])
    assert load_config(None, [*base, "parallel.tensor_model_parallel_size=3"]).reward.model.hf_path == str(rm)
    # Its own layout: the actor's TP=2 would not divide the KV heads, the reward model's TP=3 does.
    own = load_config(None, [*base, "parallel.tensor_model_parallel_size=3", "reward.model.tensor_model_parallel_size=1",
                             "reward.model.pipeline_model_parallel_size=3"], world_size=3)
    assert (own.reward.model.tensor_model_parallel_size, own.reward.model.pipeline_model_parallel_size) == (1, 3)
    with pytest.raises(ConfigError, match=r"reward.model.tensor_model_parallel_size=2 does not divide num_key_value_heads=3 of reward.model.hf_path=\S+$"):
        load_config(None, [*base, "reward.model.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"reward.model.pipeline_model_parallel_size=2 does not divide num_hidden_layers=3"):
        load_config(None, [*base, "parallel.tensor_model_parallel_size=3", "reward.model.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"reward.model.tensor_model_parallel_size x reward.model.pipeline_model_parallel_size = 3 x 1 = 3 does not divide the world size 4"):
        load_config(None, [*base, "reward.model.tensor_model_parallel_size=3"], world_size=4)
    with pytest.raises(ConfigError, match=r"reward.model.pipeline_model_parallel_size must be >= 1, got 0"):
        load_config(None, [*base, "reward.model.pipeline_model_parallel_size=0"])
    # The actor's layout is named first, and without a reward model only the actor's is checked
    # (the reward model's fields default to the actor's, so its message had come first: CI stop 21).
    with pytest.raises(ConfigError, match=r"^world size 4 is not divisible by parallel.tensor_model_parallel_size"):
        load_config(None, [*base, "parallel.tensor_model_parallel_size=3"], world_size=4)
    no_rm = [b for b in base if not b.startswith("reward.model.hf_path")]
    with pytest.raises(ConfigError, match=r"^world size 3 is not divisible by parallel.tensor_model_parallel_size"):
        load_config(None, [*no_rm, "parallel.tensor_model_parallel_size=2", "reward.model.tensor_model_parallel_size=2"], world_size=3)


@pytest.mark.slow
def test_compare_reward_model_tool_prints_json_and_refuses_a_causal_lm(tmp_path):
    """One process (world 1); the tool's TP=2 / PP=2 runs are in test_reward_model_parallel.py."""
    rm = make_tiny_hf_reward_model(tmp_path, "qwen2", layers=2, tie=True, tokenizer=False)
    tool = str(REPO_ROOT / "tools" / "compare_reward_model.py")
    env_cmd = [sys.executable, tool, "--hf-dir", str(rm), "--num-seqs", "4", "--seq-len", "12"]
    r = subprocess.run(env_cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and len(rows) == 1, r.stderr[-2000:]
    assert rows[0]["compare"] == "megatron_rm_vs_transformers" and rows[0]["max_abs_diff"] < 1e-4 and rows[0]["num_seqs"] == 4
    lm = make_tiny_hf_model(tmp_path, "qwen2", layers=2)
    r = subprocess.run([sys.executable, tool, "--hf-dir", str(lm)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is a causal LM, not a reward model" in r.stderr


def test_sampled_preferences_pair_the_sum_with_the_policys_wrong_answers(tmp_path):
    from megappo.toolkit.toy_preferences import sampled_preferences

    lm = make_tiny_hf_model(tmp_path, "llama", layers=1, tokenizer=True)
    rows = [json.loads(x) for x in sampled_preferences(lm, tmp_path / "s.jsonl", samples=3, seed=0, kind="add1").read_text().splitlines()]
    assert rows  # a random model is wrong on almost every problem
    for row in rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["chosen"] == str(int(a) + int(b)) and row["rejected"].strip() != row["chosen"]


def test_ranking_preferences_cover_every_wrong_value_and_the_policys_mistakes(tmp_path):
    from megappo.toolkit.toy_preferences import hard_negatives, ranking_preferences

    assert hard_negatives("23") == {"13", "21", "22", "24", "25", "33", "32", "2", "3", "233", "223"}
    assert hard_negatives("7") == {"5", "6", "8", "9", "17", "77"}  # no negative values; "7" dropped to "" is skipped
    problems = [("11+12=", "23"), ("3+4=", "7")]
    path = ranking_preferences(tmp_path / "r.jsonl", problems, seed=0, max_value=38, extra={"3+4=": ["7", "x9", ""]})
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    by_prompt = {p: {r["rejected"] for r in rows if r["prompt"] == p} for p, _ in problems}
    assert by_prompt["11+12="] == ({str(v) for v in range(39)} | hard_negatives("23")) - {"23"}
    assert by_prompt["3+4="] == ({str(v) for v in range(39)} | hard_negatives("7") | {"x9"}) - {"7"}
    assert all(r["chosen"] == r["answer"] != r["rejected"] for r in rows)
    assert [r["prompt"] for r in rows] != sorted(r["prompt"] for r in rows)  # shuffled


def test_ranking_accuracy_is_the_argmax_of_transformers_scores(tmp_path):
    """Against scoring each candidate alone (no padding) with transformers: the candidate
    called the answer is the hand-found argmax for three prompts and the argmin for two."""
    from transformers import AutoTokenizer

    from hf_fixtures import hf_reward_scores
    from megappo.toolkit.toy_preferences import ranking_accuracy

    rm = make_tiny_hf_reward_model(tmp_path, "llama", layers=1, seed=3)
    tok = AutoTokenizer.from_pretrained(rm)
    texts = [str(v) for v in range(12)] + ["1x"]
    candidates = {}
    for i, prompt in enumerate(["1+2=", "3+4=", "5+5=", "0+9=", "7+1="]):
        seqs = [tok(prompt)["input_ids"] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        scores = [float(hf_reward_scores(rm, [s])[0]) for s in seqs]
        pick = max if i < 3 else min
        candidates[prompt] = (texts[scores.index(pick(scores))], texts)
    assert ranking_accuracy(rm, candidates, batch=7) == pytest.approx(3 / 5)
