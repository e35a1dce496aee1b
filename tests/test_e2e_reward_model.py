"""End-to-end RL with a reward model (``reward.model``) under torchrun (2 CPU processes, gloo).

The policy is the demo's warmed-up tiny model (``megappo.demo.prepare``); the reward model is
that model's trunk as a ``LlamaForSequenceClassification`` with a random one-label ``score``
head, built in the test (same tokenizer, so the rollouts' token ids pass through). Two launches:

- PPO (critic and GAE) at TP=2 with the reward model as the only reward, at the actor's layout
  and at its own TP=1 (``reward.model.tensor_model_parallel_size``): step 1's PPO ratio is
  exactly 1, every metric is finite, ``reward/mean`` is the model's mean, and that mean equals
  transformers' ``AutoModelForSequenceClassification`` on the step's logged responses
  (an independent scorer of the same text; to 1e-4 unless the policy sampled a special token
  that the logged text drops, then to 0.1);
- GRPO at PP=2 with rule and model combined (``rule_weight`` 1, ``weight`` 0.5) and the
  reward model kept on CPU between uses: ``reward/mean`` is the weighted sum of the
  per-source means, the first ratio is 1 and the first KL to the reference 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_e2e import _train

pytestmark = pytest.mark.slow

RESPONSE_LENGTH = 4  # the toy recipe's rollout.response_length
SMALL = ["train.steps=2", "train.rollout_batch_size=16", "rollout.num_return_sequences_in_group=4", "train.mini_batch_size=null",
         "algo.ppo_epochs=1", "train.eval_every=0", "logging.samples_every=1", "logging.num_samples=64"]
RM_METRICS = ("reward/model/mean", "reward/model/std", "reward/rule/mean", "time/reward_model")


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory):
    """The warmed-up policy (seed 7, as tests/test_e2e.py) and a reward model made from it."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from megappo.demo import prepare

    out = tmp_path_factory.mktemp("toy_rm")
    paths = prepare(out, seed=7, sft_steps=100)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification.from_pretrained(paths["model"], num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # a head that spreads the scores (the default init gives ~1e-2)
        rm.score.weight.normal_(0.0, 1.0)
    rm.config.architectures = ["LlamaForSequenceClassification"]
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    return {**paths, "rm": str(out / "rm")}


def _finite(rows: list[dict]) -> None:
    bad = [(r["step"], k, v) for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    assert not bad, bad


def _transformers_mean_score(rm_dir: str, samples: list[dict]) -> float:
    """transformers' score of each logged (prompt, response), tokenized as the rollout was:
    the prompt with the tokenizer's special tokens, the response's characters, then EOS when the
    response finished (shorter than rollout.response_length)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    scores = []
    for s in samples:
        ids = tok(s["prompt"])["input_ids"] + tok(s["response"], add_special_tokens=False)["input_ids"]
        if len(s["response"]) < RESPONSE_LENGTH:
            ids.append(tok.eos_token_id)
        with torch.no_grad():
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("rm_layout", [[], ["reward.model.tensor_model_parallel_size=1"]], ids=["rm-actor-layout", "rm-tp1"])
def test_ppo_with_the_reward_model_as_the_only_reward_tp2(toy_rm, tmp_path, rm_layout):
    """``rm-tp1``: the reward model at its own layout, a full replica on each rank (DP 2 under the
    actor's TP=2): the batch is dealt to both replicas and their scores handed back."""
    rows = _train(toy_rm, tmp_path, [
        "algo.preset=ppo", "parallel.tensor_model_parallel_size=2", f"reward.model.hf_path={toy_rm['rm']}",
        "reward.model.rule_weight=0.0", *rm_layout, *SMALL,
    ])
    assert [r["step"] for r in rows] == [1, 2]
    _finite(rows)
    first = rows[0]
    assert first["actor/ratio_min"] == 1.0 and first["actor/ratio_max"] == 1.0, first
    for row in rows:
        missing = [k for k in (*RM_METRICS, "critic/vf_loss", "actor/pg_loss") if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["reward/mean"] == pytest.approx(row["reward/model/mean"], rel=1e-5, abs=1e-6)
        assert row["reward/model/std"] > 0.0  # the random head tells responses apart
    # The whole batch is on rank 0 (TP=2, DP=1) and every response of step 1 was logged.
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines() if line.strip()]
    step1 = [s for s in samples if s["step"] == 1]
    assert len(step1) == 64
    # The logged text drops special tokens; a response in which the policy sampled one (BOS or
    # pad) before its EOS was scored on ids the text does not show. Tight when there is none.
    hidden = round(len(step1) * first["response_length/mean"]) - sum(len(s["response"]) + 1 for s in step1)
    assert hidden >= 0
    ours = _transformers_mean_score(toy_rm["rm"], step1)
    assert ours == pytest.approx(first["reward/model/mean"], abs=1e-4 if hidden == 0 else 0.1), hidden


def test_grpo_with_rule_and_model_combined_pp2(toy_rm, tmp_path):
    rows = _train(toy_rm, tmp_path, [
        "algo.preset=grpo", "parallel.pipeline_model_parallel_size=2", f"reward.model.hf_path={toy_rm['rm']}",
        "reward.model.rule_weight=1.0", "reward.model.weight=0.5", "reward.model.on_cpu=true", *SMALL,
    ])
    assert [r["step"] for r in rows] == [1, 2]
    _finite(rows)
    first = rows[0]
    assert first["actor/ratio_min"] == 1.0 and first["actor/ratio_max"] == 1.0, first
    assert first["actor/kl_ref"] == 0.0
    for row in rows:
        missing = [k for k in RM_METRICS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        want = 1.0 * row["reward/rule/mean"] + 0.5 * row["reward/model/mean"]
        assert row["reward/mean"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert 0.0 <= row["reward/rule/mean"] <= 1.0
