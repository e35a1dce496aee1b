"""The step's rollout metrics reduced over data-parallel ranks (``loop.rollout_metrics``
and ``rollout.mismatch``): simulated ranks in one process, whose metrics must equal those
of the whole batch on one rank (per-token means from global sums, max of maxima)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megappo.algo import explained_variance
from megappo.loop.rollout_metrics import rollout_metrics
from megappo.rollout import Sample
from megappo.rollout.batch import RolloutBatch, RolloutStats
from megappo.rollout.mismatch import mismatch_from_sums, mismatch_sums


def mismatch_metrics(trainer_BT, rollout_BT, mask_BT):
    """The four mismatch metrics over one rank's tokens."""
    return mismatch_from_sums(*mismatch_sums(trainer_BT, rollout_BT, mask_BT))


def pad_right(rows, width, value, dtype):
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def fake_ranks(fn, shards):
    """``fn(shard, reduce)`` on each simulated rank, where ``reduce(x, op)`` returns the
    reduction over all ranks of that call's inputs: each rank is run once to record its
    inputs, then again with the reductions. The outputs of the second runs."""
    recorded = [[] for _ in shards]
    for i, shard in enumerate(shards):
        fn(shard, lambda x, op="sum", i=i: recorded[i].append(x.clone()) or x.clone())
    outputs = []
    for i, shard in enumerate(shards):
        calls = iter(range(1000))

        def reduce(x, op="sum", i=i, calls=calls):
            k = next(calls)
            stacked = torch.stack([recorded[r][k] for r in range(len(shards))])
            assert torch.equal(stacked[i], x), "a rank's inputs must not depend on earlier reductions"
            return stacked.sum(0) if op == "sum" else stacked.max(0).values

        outputs.append(fn(shard, reduce))
    return outputs


def local(x, op="sum"):
    return x.clone()


def make_rows(n, seed, max_len):
    """Per-response lists: lengths vary, so ranks have different token counts."""
    rnd = random.Random(seed)
    rows = []
    for b in range(n):
        T = rnd.randint(1, max_len)
        rows.append(dict(
            prompt=[1, 2, 3][: rnd.randint(1, 3)], response=[rnd.randint(3, 50) for _ in range(T)],
            rollout=[-rnd.random() * 3 for _ in range(T)], trainer=[-rnd.random() * 3 for _ in range(T)],
            values=[rnd.gauss(0, 1) for _ in range(T)], returns=[rnd.gauss(0.5, 2) for _ in range(T)],
            score=float(rnd.random() < 0.4), truncated=T == max_len,
        ))
    return rows


def experience(rows, reward_seconds):
    samples = [[Sample(r["response"], r["rollout"], "length" if r["truncated"] else "stop")] for r in rows]
    exp = RolloutBatch.from_samples(
        [r["prompt"] for r in rows], samples, scores=[r["score"] for r in rows], correct=[r["score"] > 0 for r in rows],
        prompt_texts=[""] * len(rows), response_texts=[""] * len(rows), first_group_id=0, policy_version=0,
        stats=RolloutStats(reward_errors=1, reward_timeouts=0, reward_seconds=reward_seconds),
    )
    T = exp.mask_BT.shape[1]
    exp.old_logprobs_BT = pad_right([r["trainer"] for r in rows], T, 0.0, torch.float32)
    exp.values_BT = pad_right([r["values"] for r in rows], T, 0.0, torch.float32)
    exp.returns_BT = pad_right([r["returns"] for r in rows], T, 0.0, torch.float32)
    return exp


def test_metrics_over_ranks_equal_the_whole_batch():
    rows = make_rows(11, seed=0, max_len=9)
    cuts = [rows[:2], rows[2:9], rows[9:]]  # 2, 7 and 2 responses of different lengths
    shards = [experience(c, reward_seconds=s) for c, s in zip(cuts, (0.5, 2.0, 1.0))]
    whole = rollout_metrics(experience(rows, reward_seconds=2.0), reduce=local, dynamic_sampling=False)
    whole["reward/errors"] = 3.0  # one per rank
    per_rank = fake_ranks(lambda exp, reduce: rollout_metrics(exp, reduce=reduce, dynamic_sampling=False), shards)
    for got in per_rank:
        assert set(got) == set(whole)
        for key, value in whole.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # The old reduction (an unweighted mean of per-rank metrics) differs: the test can fail.
    naive = sum(mismatch_metrics(s.old_logprobs_BT, s.rollout_logprobs_BT, s.mask_BT)["rollout/logp_diff_mean"] for s in shards) / 3
    assert abs(naive - whole["rollout/logp_diff_mean"]) > 1e-3
    naive_max = sum(mismatch_metrics(s.old_logprobs_BT, s.rollout_logprobs_BT, s.mask_BT)["rollout/logp_diff_max"] for s in shards) / 3
    assert naive_max < whole["rollout/logp_diff_max"]

    # One rank's values equal the single-rank references.
    exp = experience(rows, reward_seconds=2.0)
    ref = mismatch_metrics(exp.old_logprobs_BT, exp.rollout_logprobs_BT, exp.mask_BT)
    for key, value in ref.items():
        assert whole[key] == pytest.approx(value, rel=1e-12)
    ev = float(explained_variance(exp.values_BT.double(), exp.returns_BT.double(), exp.mask_BT.double()))
    assert whole["critic/explained_variance"] == pytest.approx(ev, rel=1e-9)
    lens = [len(r["response"]) for r in rows]
    assert whole["response_length/max"] == max(lens) and whole["response_length/mean"] == pytest.approx(sum(lens) / len(lens))
    assert whole["time/reward"] == 2.0


def test_a_rank_without_valid_tokens_and_constant_returns():
    def mismatch(shard, reduce):
        sums, top = mismatch_sums(*shard)
        return mismatch_from_sums(reduce(sums, "sum"), reduce(top, "max"))

    g = torch.Generator().manual_seed(3)
    t, r = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    shards = [(t, r + 5.0, torch.zeros_like(mask)), (t, r, mask)]  # rank 0: no valid token
    for out in fake_ranks(mismatch, shards):
        assert out == pytest.approx(mismatch_metrics(t, r, mask), rel=1e-12)

    rows = make_rows(4, seed=1, max_len=5)
    for row in rows:
        row["returns"] = [1.0] * len(row["response"])
    got = fake_ranks(lambda exp, reduce: rollout_metrics(exp, reduce=reduce, dynamic_sampling=True),
                     [experience(rows[:2], 0.0), experience(rows[2:], 0.0)])
    for out in got:
        assert math.isnan(out["critic/explained_variance"])  # the returns do not vary
        assert out["rollout/sampling_rounds"] == 1.0


def test_global_tokens_single_process():
    from megappo.trainer import _global_tokens

    exp = experience(make_rows(3, seed=2, max_len=4), reward_seconds=0.0)
    assert _global_tokens(exp) == int(exp.tokens.prompt_lens_B.sum() + exp.tokens.response_lens_B.sum())
