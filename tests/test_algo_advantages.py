"""Outcome advantages (GRPO / LitePPO / RLOO), whitening, and the estimator registry.

Shape legend: B = responses, T = response tokens. References are python loops in float64.
"""

import math
import statistics
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megappo.algo import (
    AdvantageParams,
    advantage_estimator_names,
    broadcast_to_tokens,
    clip_advantages,
    estimate_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    moment_sums,
    moments_from_sums,
    outcome_advantages,
    postprocess_advantages,
    rloo_advantages,
    scores_to_token_rewards,
)

SETTINGS = settings(max_examples=50, deadline=None, database=None)
LEVELS = ("group", "batch", "none")


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def ref_outcome(scores, gids, mean_level, std_level, eps, batch_std_of="raw"):
    """Plain-python reference; statistics.stdev is Bessel-corrected like torch.std."""
    scores, gids = [float(s) for s in scores], [int(g) for g in gids]
    groups = {g: [s for s, h in zip(scores, gids) if h == g] for g in set(gids)}
    gmean = {g: statistics.fmean(v) for g, v in groups.items()}
    gstd = {g: statistics.stdev(v) if len(v) > 1 else 1.0 for g, v in groups.items()}
    if batch_std_of == "raw":
        bstd = statistics.stdev(scores) if len(scores) > 1 else 1.0
    else:
        bstd = statistics.stdev([s - gmean[g] for s, g in zip(scores, gids)]) if len(scores) > 1 else 1.0
    out = []
    for s, g in zip(scores, gids):
        m = {"group": gmean[g], "batch": statistics.fmean(scores), "none": 0.0}[mean_level]
        if std_level == "none":
            out.append(s - m)
        else:
            sd = gstd[g] if std_level == "group" else bstd
            out.append((s - m) / (sd + eps))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mean_level", LEVELS)
@pytest.mark.parametrize("std_level", LEVELS)
@pytest.mark.parametrize("batch_std_of", ["raw", "group_centered"])
def test_outcome_advantages_match_reference(mean_level, std_level, batch_std_of):
    g = torch.Generator().manual_seed(0)
    scores_B = torch.randn(13, generator=g)
    group_ids_B = torch.tensor([5, 5, 5, 9, 9, 2, 2, 2, 2, 7, 11, 11, 11])
    got = outcome_advantages(scores_B, group_ids_B, mean_level, std_level, 1e-6, batch_std_of=batch_std_of)
    ref = ref_outcome(scores_B, group_ids_B, mean_level, std_level, 1e-6, batch_std_of)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_liteppo_hand_computed_example():
    """Two prompts x 3 responses, binary rewards: A = (r - mean_group) / (std_batch + eps)."""
    scores_B = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group_ids_B = torch.tensor([0, 0, 0, 1, 1, 1])
    # raw batch: mean 2/3, Bessel var = sum((r - 2/3)^2) / 5 = (4 * 1/9 + 2 * 4/9) / 5 = 4/15
    std_batch = math.sqrt(4.0 / 15.0)
    eps = 1e-6
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0], dtype=torch.float64) / (std_batch + eps)
    got = outcome_advantages(scores_B, group_ids_B, "group", "batch", eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    # AReaL's variant: std of the group-centred residuals [2/3, -1/3, -1/3, 0, 0, 0] (mean 0):
    # Bessel var = (4/9 + 1/9 + 1/9) / 5 = 2/15
    got_areal = outcome_advantages(scores_B, group_ids_B, "group", "batch", eps, batch_std_of="group_centered")
    resid = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], dtype=torch.float64)
    expected_areal = resid / (math.sqrt(2 / 15) + eps)
    torch.testing.assert_close(got_areal.double(), expected_areal, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(
    group_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    values=st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5]), min_size=6, max_size=6),
)
def test_liteppo_equal_rewards_within_groups_give_zero(group_sizes, values):
    scores, gids = [], []
    for g, n in enumerate(group_sizes):
        scores += [values[g]] * n
        gids += [g] * n
    adv = outcome_advantages(torch.tensor(scores), torch.tensor(gids), "group", "batch")
    assert torch.isfinite(adv).all()
    assert (adv == 0).all()


@SETTINGS
@given(
    group_sizes=st.lists(st.integers(1, 8), min_size=1, max_size=8),
    std_level=st.sampled_from(LEVELS),
    seed=st.integers(0, 2**16),
)
def test_group_mean_normalization_zeroes_group_means(group_sizes, std_level, seed):
    g = torch.Generator().manual_seed(seed)
    gids = torch.cat([torch.full((n,), i) for i, n in enumerate(group_sizes)])
    perm = torch.randperm(gids.numel(), generator=g)
    gids = gids[perm]
    scores = torch.randint(0, 3, (gids.numel(),), generator=g).float() * torch.rand(1, generator=g)
    adv = outcome_advantages(scores, gids, "group", std_level)
    assert torch.isfinite(adv).all()
    for i in range(len(group_sizes)):
        assert abs(float(adv[gids == i].double().mean())) < 1e-5


def test_precomputed_batch_stats_equal_whole_batch():
    """Two 'ranks' with groups kept whole: batch stats from the reduced moment sums."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(12, generator=g)
    gids = torch.arange(12) // 3
    whole = outcome_advantages(scores, gids, "batch", "batch")
    sums = moment_sums(scores[:6]) + moment_sums(scores[6:])
    mean, var = moments_from_sums(sums)
    parts = [outcome_advantages(scores[s], gids[s], "batch", "batch", batch_mean=mean, batch_std=var.sqrt())
             for s in (slice(0, 6), slice(6, 12))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)


def test_outcome_advantages_rejects_bad_input():
    s, gid = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="mean_level"):
        outcome_advantages(s, gid, "prompt", "batch")
    with pytest.raises(ValueError, match="std_level"):
        outcome_advantages(s, gid, "group", "global")
    with pytest.raises(ValueError, match="group_ids"):
        outcome_advantages(s, None, "group", "batch")
    with pytest.raises(ValueError, match="integer"):
        outcome_advantages(s, gid.float(), "group", "batch")


def test_rloo_matches_loop():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(10, generator=g)
    gids = torch.tensor([0, 1, 0, 1, 0, 2, 3, 3, 3, 3])
    got = rloo_advantages(scores, gids)
    ref = []
    for i in range(10):
        others = [float(scores[j]) for j in range(10) if j != i and gids[j] == gids[i]]
        ref.append(float(scores[i]) - sum(others) / len(others) if others else 0.0)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_broadcast_and_clip():
    mask_BT = prefix_mask([2, 0, 3], 3)
    out = broadcast_to_tokens(torch.tensor([1.5, 2.0, -3.0]), mask_BT)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.5, 0], [0, 0, 0], [-3.0, -3.0, -3.0]]))
    torch.testing.assert_close(clip_advantages(out, 2.0), out.clamp(-2, 2))
    assert clip_advantages(out, None) is out
    with pytest.raises(ValueError):
        clip_advantages(out, 0.0)


def test_masked_stats_and_whiten():
    g = torch.Generator().manual_seed(6)
    x_BT = torch.randn(4, 9, generator=g)
    mask_BT = prefix_mask([9, 2, 0, 5], 9)
    valid = x_BT[mask_BT.bool()]
    torch.testing.assert_close(masked_mean(x_BT, mask_BT), valid.mean())
    torch.testing.assert_close(masked_var(x_BT, mask_BT), valid.var())
    w = masked_whiten(x_BT, mask_BT)
    torch.testing.assert_close(w[mask_BT.bool()], (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8))
    assert (w[mask_BT == 0] == 0).all()
    # global statistics passed in, as mean/var or as sums: the two pieces whiten as one
    sums = moment_sums(x_BT[:2], mask_BT[:2]) + moment_sums(x_BT[2:], mask_BT[2:])
    pieces = torch.cat([masked_whiten(x_BT[s], mask_BT[s], sums=sums) for s in (slice(0, 2), slice(2, 4))])
    torch.testing.assert_close(pieces, w, rtol=1e-5, atol=1e-6)
    mean, var = moments_from_sums(sums)
    torch.testing.assert_close(masked_whiten(x_BT, mask_BT, mean=mean, var=var), w, rtol=1e-5, atol=1e-6)
    unshifted = masked_whiten(x_BT, mask_BT, shift_mean=False)
    torch.testing.assert_close(unshifted[mask_BT.bool()], w[mask_BT.bool()] + valid.mean())
    with pytest.raises(ValueError):
        masked_whiten(x_BT, mask_BT, mean=0.0)
    assert masked_var(x_BT, prefix_mask([1, 0, 0, 0], 9)) == 0


def loop_reinforce_pp(scores, mask_BT, kl_BT, gamma, coef):
    B, T = mask_BT.shape
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask_BT[b].sum())
        run = 0.0
        for t in reversed(range(n)):
            r = (float(scores[b]) if t == n - 1 else 0.0) - coef * float(kl_BT[b, t])
            run = r + gamma * run
            ret[b, t] = run
    valid = ret[mask_BT.bool()]
    adv = (ret - valid.mean()) / math.sqrt(float(valid.var()) + 1e-8)
    return adv * mask_BT.double(), ret


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_estimators_match_loop(baseline):
    g = torch.Generator().manual_seed(7)
    B, T = 8, 30
    mask_BT = prefix_mask([30, 5, 17, 1, 30, 22, 9, 14], T)
    scores = torch.randint(0, 2, (B,), generator=g).float()
    gids = torch.arange(B) // 4
    kl_BT = torch.rand(B, T, generator=g) * 0.1
    name = "reinforce_pp_baseline" if baseline else "reinforce_pp"
    adv, ret = estimate_advantages(name, scores_B=scores, mask_BT=mask_BT, group_ids_B=gids, kl_BT=kl_BT,
                                   gamma=0.99, kl_coef=0.2)
    ref_scores = scores.double()
    if baseline:
        group_mean = [float(scores[gids == gids[i]].double().mean()) for i in range(B)]
        ref_scores = torch.tensor([float(scores[i]) - group_mean[i] for i in range(B)])
    ref_adv, ref_ret = loop_reinforce_pp(ref_scores, mask_BT, kl_BT, 0.99, 0.2)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-5)


def test_registry_grpo_and_rloo_match_functions():
    mask_BT = prefix_mask([3, 2, 4, 1], 4)
    scores, gids = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    adv, ret = estimate_advantages("grpo", scores_B=scores, mask_BT=mask_BT, group_ids_B=gids,
                                   mean_level="group", std_level="batch")
    assert ret is None
    expected = broadcast_to_tokens(outcome_advantages(scores, gids, "group", "batch"), mask_BT)
    torch.testing.assert_close(adv, expected)
    adv, _ = estimate_advantages("rloo", scores_B=scores, mask_BT=mask_BT, group_ids_B=gids)
    torch.testing.assert_close(adv, broadcast_to_tokens(rloo_advantages(scores, gids), mask_BT))


def test_registry_gae_uses_scores_dense_rewards_and_kl():
    from megappo.algo import compute_gae

    g = torch.Generator().manual_seed(8)
    mask_BT = prefix_mask([5, 3], 5)
    scores, values = torch.randn(2, generator=g), torch.randn(2, 5, generator=g)
    kl, dense = torch.rand(2, 5, generator=g), torch.randn(2, 5, generator=g)
    params = AdvantageParams(gamma=0.9, lambd=0.8, kl_coef=0.1)
    adv, ret = estimate_advantages("gae", scores_B=scores, mask_BT=mask_BT, values_BT=values, kl_BT=kl,
                                   token_rewards_BT=dense, params=params)
    rewards = (scores_to_token_rewards(scores, mask_BT) + dense - 0.1 * kl) * mask_BT
    ref_adv, ref_ret = compute_gae(rewards, values, mask_BT, 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_registry_rejects_bad_input():
    mask_BT, scores, gids = torch.ones(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="'gae'"):
        estimate_advantages("ppo", scores_B=scores, mask_BT=mask_BT)
    with pytest.raises(ValueError, match="unknown"):
        estimate_advantages("grpo", scores_B=scores, mask_BT=mask_BT, group_ids_B=gids, lamda=0.9)
    with pytest.raises(ValueError, match="KL"):
        estimate_advantages("grpo", scores_B=scores, mask_BT=mask_BT, group_ids_B=gids, kl_coef=0.1,
                            kl_BT=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="values"):
        estimate_advantages("gae", scores_B=scores, mask_BT=mask_BT)
    with pytest.raises(ValueError, match="mean_level"):
        AdvantageParams(mean_level="prompt")
    assert set(advantage_estimator_names()) >= {"gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}


class FakeAllReduce:
    """Threads standing in for data-parallel ranks; reduce_sums sums every rank's tensor."""

    def __init__(self, world):
        self.buf = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank):
        def reduce_sums(t):
            self.buf[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack(self.buf).sum(0)
            self.barrier.wait()
            return out

        return reduce_sums


@pytest.mark.parametrize(
    "name,knobs",
    [
        ("grpo", dict(mean_level="group", std_level="batch")),
        ("grpo", dict(mean_level="batch", std_level="batch")),
        ("grpo", dict(mean_level="group", std_level="batch", batch_std_of="group_centered")),
        ("reinforce_pp", dict(gamma=0.95, kl_coef=0.1)),
        ("reinforce_pp_baseline", dict(gamma=1.0)),
    ],
)
def test_registry_two_ranks_equal_one_rank(name, knobs):
    g = torch.Generator().manual_seed(9)
    B, T = 12, 10
    mask_BT = prefix_mask(torch.randint(1, T + 1, (B,), generator=g), T)
    scores, gids, kl = torch.randn(B, generator=g), torch.arange(B) // 3, torch.rand(B, T, generator=g)
    whole, _ = estimate_advantages(name, scores_B=scores, mask_BT=mask_BT, group_ids_B=gids, kl_BT=kl, **knobs)
    post_whole = postprocess_advantages(whole, mask_BT, whiten=True, clip=1.5)
    comm, out, post = FakeAllReduce(2), [None, None], [None, None]

    def rank(r):
        s = slice(0, 6) if r == 0 else slice(6, 12)
        red = comm.for_rank(r)
        out[r], _ = estimate_advantages(name, scores_B=scores[s], mask_BT=mask_BT[s], group_ids_B=gids[s],
                                        kl_BT=kl[s], reduce_sums=red, **knobs)
        post[r] = postprocess_advantages(out[r], mask_BT[s], whiten=True, clip=1.5, reduce_sums=red)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    torch.testing.assert_close(torch.cat(out), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(post), post_whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0, 1e3])
def test_moment_sums_float32_matches_float64(offset):
    """moment_sums runs two float32 passes (issue 15 item 10: whitening cost 3.5x GAE with
    float64 passes); its mean, variance and the whitened tensor agree with float64 ones,
    also at an offset of 1e3 standard deviations, where a float32 one-pass sum of squares
    (what a naive speed-up would do) gets the variance wrong by orders of magnitude."""
    g = torch.Generator().manual_seed(3)
    B, T = 64, 3000
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask_BT = (torch.arange(T)[None, :] < lengths[:, None]).float()
    x_BT = torch.randn(B, T, generator=g) + offset
    x64, m64 = x_BT.double(), mask_BT.double()
    n = m64.sum()
    mean64 = (x64 * m64).sum() / n
    var64 = (((x64 - mean64) * m64) ** 2).sum() / (n - 1)
    sums = moment_sums(x_BT[:40], mask_BT[:40]) + moment_sums(x_BT[40:], mask_BT[40:])  # two "ranks"
    assert sums.dtype == torch.float64 and float(sums[0]) == float(n)
    mean, var = moments_from_sums(sums)
    assert abs(float(mean - mean64)) <= 1e-7 * max(1.0, offset)
    assert abs(float(var / var64 - 1)) < 1e-5
    whitened = masked_whiten(x_BT, mask_BT, sums=sums)
    ref = ((x64 - mean64) / torch.sqrt(var64 + 1e-8)) * m64
    # float32 output: the error is that of rounding x - mean in float32 (|x| ~ offset).
    assert float((whitened.double() - ref).abs().max()) < 2e-6 * max(1.0, offset)
    naive_sumsq = (x_BT * x_BT * mask_BT).sum()  # float32 one pass: the control
    naive_var = (float(naive_sumsq) - float(sums[1]) ** 2 / float(n)) / (float(n) - 1)
    if offset >= 1e3:
        assert abs(naive_var / float(var64) - 1) > 1e-2
