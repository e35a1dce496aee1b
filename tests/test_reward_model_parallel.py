"""The reward model on real Megatron models at world 1, TP=2, PP=2 and DP=2: scores against
transformers (fp32, 1e-4), bit-exact export and conversion, the compare tool, and the
reward-model trainer (each layout's run equal to one rank's; export -> from_pretrained ->
the same scores; resume equal to an uninterrupted run).

The work runs in two shared launches of tests/mp/reward_model_checks.py (``python`` for
world 1, one ``torchrun x2`` for the rest); these tests assert on the JSON they wrote.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hf_fixtures import (
    hf_reward_scores,
    make_tiny_hf_model,
    make_tiny_hf_reward_model,
    read_hf_state,
    run_mp,
    write_char_tokenizer,
)

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "mp" / "reward_model_checks.py"
RM_KEYS = ("rm-llama-untied", "rm-llama-tied", "rm-qwen2-untied", "rm-qwen2-tied")
PHASES = ("world1", "tp2", "pp2", "dp2")
TOL = 1e-4


def _pairs(path: Path, n: int, seed: int) -> str:
    """Toy preferences: the chosen answer is the sum, the rejected one is off by 1 or 2."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            wrong = a + b + rng.choice([-2, -1, 1, 2])
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-mp")
    zoo = {}
    for family in ("llama", "qwen2"):
        for tie in (False, True):
            p = make_tiny_hf_reward_model(root, family, tie=tie, seed=11 if tie else 12)
            zoo[p.name] = str(p)
    other = make_tiny_hf_reward_model(root, "llama", seed=13, name="rm-llama-othertok", tokenizer=False)
    write_char_tokenizer(other, 103, reverse=True, fused_decode=True)
    zoo[other.name] = str(other)
    write_char_tokenizer(root / "policy-tok", 103, fused_decode=True)
    lm = make_tiny_hf_model(root, "qwen2", layers=4, vocab=103, tokenizer=True, name="lm-qwen2", seed=4)
    work, out = root / "work", root / "out"
    work.mkdir()
    out.mkdir()
    ctx = dict(zoo=zoo, lm=str(lm), policy_tok=str(root / "policy-tok"), pairs=_pairs(root / "pairs.jsonl", 24, 0), eval_pairs=_pairs(root / "eval.jsonl", 10, 1),
               work=str(work))
    errors = {}
    for nproc, phases in ((1, ["world1"]), (2, ["tp2", "pp2", "dp2"])):
        try:
            run_mp(SCRIPT, nproc, ["--ctx", json.dumps(ctx), "--out", str(out), *phases], timeout=900)
        except AssertionError as e:
            errors[nproc] = str(e)

    def read(phase: str) -> list[dict]:
        files = sorted(out.glob(f"{phase}-rank*.json"))
        if not files:
            pytest.fail(f"phase {phase} wrote nothing: {errors}")
        return [json.loads(f.read_text()) for f in files]

    return read, errors


def _rank0(runs, phase):
    return runs[0](phase)[0]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("key", RM_KEYS)
def test_scores_match_transformers(runs, phase, key):
    diffs = [r[f"{key}/score_diff"] for r in runs[0](phase)]
    assert max(diffs) < TOL, diffs


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("key", RM_KEYS)
def test_export_is_bit_exact_and_transformers_scores_it_the_same(runs, phase, key):
    rows = runs[0](phase)
    assert all(r[f"{key}/iter_mismatch"] == [] for r in rows)
    if phase == "pp2":  # each stage yields its own tensors
        names = sorted(rows[0][f"{key}/iter_names"] + rows[1][f"{key}/iter_names"])
    else:
        names = rows[0][f"{key}/iter_names"]
    assert names == rows[0][f"{key}/hf_names"] and "score.weight" in names and "lm_head.weight" not in names
    assert rows[0][f"{key}/save_hf_mismatch"] == []
    assert rows[0][f"{key}/save_hf_score_diff"] < TOL


@pytest.mark.parametrize("phase", PHASES)
def test_compare_tool_rows(runs, phase):
    (row,) = _rank0(runs, phase)["compare"]
    assert row["compare"] == "megatron_rm_vs_transformers" and row["max_abs_diff"] < TOL
    tp, pp = {"world1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}[phase]
    assert (row["tp"], row["pp"]) == (tp, pp) and len(set(row["lengths"])) == row["num_seqs"]


def test_conversion_tools_dispatch_to_the_reward_converter_bit_exact(runs):
    """tools/convert_hf_to_megatron.py at TP=2 and tools/convert_megatron_to_hf.py at PP=2,
    given a reward model, keep its score head: HF -> Megatron -> HF is bit-exact, and a
    train_rm checkpoint (started from a causal LM) exports what that run exported itself."""
    assert all(r["convert/hf2m_rc"] == 0 for r in runs[0]("tp2"))
    res = _rank0(runs, "pp2")
    assert res["convert/m2hf_rc"] == 0 and res["convert/train_m2hf_rc"] == 0
    assert res["convert/mismatch"] == [] and res["convert/train_mismatch"] == []
    assert res["convert/architectures"] == ["Qwen2ForSequenceClassification"]
    assert res["convert/train_architectures"] == ["Qwen2ForSequenceClassification"]


@pytest.mark.parametrize("phase", ["tp2", "pp2", "dp2"])
def test_trainer_layouts_equal_one_rank(runs, phase):
    ref, got = _rank0(runs, "world1"), _rank0(runs, phase)
    m_ref, m_got = ref["train/metrics"], got["train/metrics"]
    assert [r["step"] for r in m_got] == [1, 2, 3]
    for a, b in zip(m_ref, m_got):
        for key in ("rm/loss", "rm/accuracy", "rm/margin", "rm/grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=2e-5), (phase, a["step"], key)
    assert m_got[-1]["eval/rm_accuracy"] == m_ref[-1]["eval/rm_accuracy"]
    a, b = read_hf_state(ref["train/hf"]), read_hf_state(got["train/hf"])
    assert sorted(a) == sorted(b) and "score.weight" in a
    # Adam divides by sqrt(v): on near-zero gradients float noise moves a weight by a few
    # percent of one step (lr 3e-3), about 2e-5 here; a wrong gradient moves it by ~lr.
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-4


def test_trainer_learns_and_its_export_scores_the_same_in_transformers(runs):
    res = _rank0(runs, "world1")
    m = res["train/metrics"]
    assert m[0]["rm/loss"] == pytest.approx(0.693147, abs=1e-5)  # a zero score head: log 2
    assert m[-1]["rm/loss"] < m[0]["rm/loss"]
    assert "eval/rm_accuracy" in m[1] and "eval/rm_margin" in m[-1] and m[-1]["eval/rm_pairs"] == 10
    # export -> from_pretrained -> the same scores as the trained Megatron model reported:
    # the held-out margin recomputed with transformers on the exported directory.
    hf = res["train/hf"]
    from transformers import AutoTokenizer

    from megappo.data.preferences import load_preference_pairs

    tok = AutoTokenizer.from_pretrained(hf)
    pairs = load_preference_pairs(Path(hf).parent.parent.parent / "eval.jsonl", tok, use_template=False, max_length=64).pairs
    chosen = hf_reward_scores(hf, [p.chosen_seq for p in pairs])
    rejected = hf_reward_scores(hf, [p.rejected_seq for p in pairs])
    assert float((chosen - rejected).mean()) == pytest.approx(m[-1]["eval/rm_margin"], abs=1e-5)
    assert float((chosen > rejected).double().mean()) == pytest.approx(m[-1]["eval/rm_accuracy"])


def test_trainer_resume_equals_uninterrupted(runs):
    res = _rank0(runs, "world1")
    assert res["resume/steps_saved"] == ["step_4", "step_6"]
    assert res["resume/steps"] == [1, 2, 3, 4, 5, 6]
    assert res["resume/metrics_equal"] is True
    assert res["resume/weights_max_diff"] == 0.0


@pytest.mark.parametrize("phase", PHASES)
def test_loop_reward_model_with_the_policy_or_another_tokenizer(runs, phase):
    for res in runs[0](phase):
        assert res["loop/same/retokenized"] is False and res["loop/other/retokenized"] is True
        assert res["loop/same/ids_equal"] and res["loop/other/ids_equal"]
        assert res["loop/same/score_diff"] < TOL and res["loop/other/score_diff"] < TOL


def test_launches_succeeded(runs):
    assert runs[1] == {}
