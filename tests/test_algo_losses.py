"""Loss aggregation (split invariance), PPO policy loss, clipped value loss, KL loss.

Shape legend: B = responses, T = response tokens. References are python loops in float64.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megappo.algo import (
    LOSS_AGG_MODES,
    aggregate_loss,
    explained_variance,
    kl_loss,
    kl_penalty,
    policy_loss,
    tis_weights,
    value_loss,
)

SETTINGS = settings(max_examples=50, deadline=None, database=None)
NORM_LEN = 16


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def loop_aggregate(loss_BT, mask_BT, mode, norm_len):
    B, T = loss_BT.shape
    rows = [[float(loss_BT[b, t]) for t in range(T) if mask_BT[b, t] > 0] for b in range(B)]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / B
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / B
    return sum(sum(r) / norm_len for r in rows) / B


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_matches_loop(mode):
    g = torch.Generator().manual_seed(0)
    loss_BT = torch.randn(5, 7, generator=g)
    mask_BT = prefix_mask([7, 0, 3, 1, 6], 7)
    got = aggregate_loss(loss_BT, mask_BT, mode, norm_len=NORM_LEN)
    assert got.dim() == 0
    assert math.isclose(float(got), loop_aggregate(loss_BT, mask_BT, mode, NORM_LEN), rel_tol=1e-5, abs_tol=1e-6)


def test_aggregate_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="norm_len"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3), "seq-mean-token-sum-norm")


def _assert_split_invariant(piece_loss, x_BT, cuts):
    """Summing ``piece_loss(x, rows)`` over row slices cut at ``cuts`` gives the loss and
    gradient of the whole batch (the pieces use global denominators)."""
    B = x_BT.shape[0]

    def run(pieces):
        x = x_BT.clone().requires_grad_(True)
        total = sum(piece_loss(x, s) for s in pieces)
        total.backward()
        return total.detach(), x.grad

    bounds = sorted({min(c, B) for c in cuts} | {0, B})
    pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    full_loss, full_grad = run([slice(0, B)])
    split_loss, split_grad = run(pieces)
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(
    mode=st.sampled_from(LOSS_AGG_MODES),
    lengths=st.lists(st.integers(0, 12), min_size=2, max_size=9),
    cuts=st.lists(st.integers(1, 8), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_split_with_global_denominators_gives_same_loss_and_grad(mode, lengths, cuts, seed):
    """Micro-batches (or ranks) with global num_tokens / num_seqs sum to the full loss."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), 12
    mask_BT = prefix_mask(lengths, T)
    logits_BT = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv_BT = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_BT = logits_BT + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)

    def piece_loss(x, s):
        return policy_loss(x[s], old_BT[s], adv_BT[s], mask_BT[s], clip_low=0.2, clip_high=0.28, dual_clip_c=3.0,
                           loss_agg_mode=mode, num_tokens=mask_BT.sum(), num_seqs=B, norm_len=NORM_LEN)[0]

    _assert_split_invariant(piece_loss, logits_BT, cuts)


def loop_policy_token(lp, old, a, cl, ch, c):
    ratio = math.exp(lp - old)
    loss = max(-a * ratio, -a * min(max(ratio, 1 - cl), 1 + ch))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_matches_loop(dual):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 9
    mask_BT = prefix_mask([9, 4, 1, 7], T)
    old_BT = -torch.rand(B, T, generator=g) * 3
    lp_BT = old_BT + torch.randn(B, T, generator=g) * 0.8
    adv_BT = torch.randn(B, T, generator=g)
    loss, m = policy_loss(lp_BT, old_BT, adv_BT, mask_BT, clip_low=0.2, clip_high=0.28, dual_clip_c=dual)
    per_tok = [[loop_policy_token(float(lp_BT[b, t]), float(old_BT[b, t]), float(adv_BT[b, t]), 0.2, 0.28, dual)
                for t in range(T)] for b in range(B)]
    ref = sum(per_tok[b][t] for b in range(B) for t in range(T) if mask_BT[b, t]) / float(mask_BT.sum())
    assert math.isclose(float(loss), ref, rel_tol=1e-5, abs_tol=1e-6)
    valid = mask_BT.bool()
    ratio = torch.exp(lp_BT - old_BT)[valid]
    a = adv_BT[valid]
    lo, hi = ((a < 0) & (ratio < 0.8)).float().mean(), ((a > 0) & (ratio > 1.28)).float().mean()
    torch.testing.assert_close(m["pg_clipfrac_low"], lo)
    torch.testing.assert_close(m["pg_clipfrac_high"], hi)
    torch.testing.assert_close(m["pg_clipfrac"], lo + hi)
    torch.testing.assert_close(m["ratio_min"], ratio.min())
    torch.testing.assert_close(m["ratio_max"], ratio.max())
    torch.testing.assert_close(m["ratio_mean"], ratio.mean())
    torch.testing.assert_close(m["ppo_kl"], (old_BT - lp_BT)[valid].mean())
    expected_dual = ((a < 0) & (ratio > 3.0)).float().mean() if dual else torch.tensor(0.0)
    torch.testing.assert_close(m["dual_clip_frac"], expected_dual)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@SETTINGS
@given(log_ratio=st.floats(-8.0, 8.0), adv=st.floats(-10.0, -1e-3), c=st.floats(1.5, 10.0))
def test_dual_clip_bounds_loss_for_negative_advantages(log_ratio, adv, c):
    lp = torch.tensor([[log_ratio]], dtype=torch.float64)
    loss, m = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[adv]], dtype=torch.float64),
                          torch.ones(1, 1), clip_low=0.2, clip_high=0.2, dual_clip_c=c)
    assert float(loss) <= -adv * c + 1e-9
    plain, _ = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[adv]], dtype=torch.float64),
                           torch.ones(1, 1), clip_low=0.2, clip_high=0.2)
    assert float(loss) == pytest.approx(min(float(plain), -adv * c))
    assert float(m["dual_clip_frac"]) == float(math.exp(log_ratio) > c)


@SETTINGS
@given(
    log_ratio=st.floats(-0.15, 0.15),
    adv=st.floats(-5.0, 5.0).filter(lambda a: abs(a) > 1e-3),
    dual=st.sampled_from([None, 3.0]),
)
def test_policy_gradient_sign_matches_advantage_inside_clip(log_ratio, adv, dual):
    """Inside the clip range, gradient descent on the loss raises log-prob iff A > 0."""
    lp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[adv]], dtype=torch.float64),
                          torch.ones(1, 1), clip_low=0.2, clip_high=0.2, dual_clip_c=dual)
    loss.backward()
    assert math.copysign(1.0, -float(lp.grad)) == math.copysign(1.0, adv)
    assert float(lp.grad) == pytest.approx(-adv * math.exp(log_ratio))


def test_clipped_tokens_have_zero_gradient():
    lp = torch.tensor([[0.5, -0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, m = policy_loss(lp, torch.zeros(1, 3, dtype=torch.float64), adv, torch.ones(1, 3),
                          clip_low=0.2, clip_high=0.3, dual_clip_c=3.0)
    loss.backward()
    # ratio e^0.5 > 1.3 with A > 0: clipped; e^-0.5 < 0.8 with A < 0: clipped; e^2 > 3, A < 0: dual clip
    assert (lp.grad == 0).all()
    assert float(m["pg_clipfrac"]) == pytest.approx(2 / 3) and float(m["dual_clip_frac"]) == pytest.approx(1 / 3)


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(any),
    seed=st.integers(0, 2**16),
    clip_low=st.floats(0.0, 0.9),
    clip_high=st.floats(0.0, 5.0),
    dual=st.sampled_from([None, 1.5, 3.0]),
    mode=st.sampled_from(LOSS_AGG_MODES),
)
def test_ratio_one_gives_no_clipping(lengths, seed, clip_low, clip_high, dual, mode):
    """pi == pi_old (the first pass over a batch): nothing is clipped, the ratio is 1
    everywhere, and the loss is the aggregated -A."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), 6
    lp = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = prefix_mask(lengths, T)
    loss, m = policy_loss(lp, lp.clone(), adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual,
                          loss_agg_mode=mode, norm_len=NORM_LEN)
    for k in ("pg_clipfrac", "pg_clipfrac_low", "pg_clipfrac_high", "dual_clip_frac", "ppo_kl"):
        assert float(m[k]) == 0.0, k
    assert float(m["ratio_min"]) == float(m["ratio_max"]) == float(m["ratio_mean"]) == 1.0
    expected = aggregate_loss(-adv, mask, mode, norm_len=NORM_LEN)
    assert math.isclose(float(loss), float(expected), rel_tol=1e-6, abs_tol=1e-7)
    if mode == "token-mean":
        assert math.isclose(float(loss), -float(adv[mask.bool()].mean()), rel_tol=1e-6, abs_tol=1e-7)


def test_tis_weights_and_policy_loss_with_tis():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5]])
    w = tis_weights(old, rollout, tis_clip=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, math.exp(-1.0), 1.0]]))
    lp = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, -1.0]])
    loss, m = policy_loss(lp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.2,
                          rollout_logprobs=rollout, tis_clip=1.5)
    assert loss.item() == pytest.approx(-(1.5 * 1.0 + math.exp(-1.0) * 2.0 - 1.0) / 3, rel=1e-6)
    assert float(m["tis_clipfrac"]) == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, -(w * adv) / 3)  # weights are detached constants
    with pytest.raises(ValueError):
        policy_loss(lp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.2, tis_clip=2.0)


def test_entropy_bonus_and_bad_clip_values():
    lp = torch.zeros(2, 3)
    adv = torch.ones(2, 3)
    ent = torch.full((2, 3), 0.7, requires_grad=True)
    mask = prefix_mask([3, 1], 3)
    loss, m = policy_loss(lp, lp, adv, mask, clip_low=0.2, clip_high=0.2, entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-1.0 - 0.01 * 0.7)
    assert float(m["entropy"]) == pytest.approx(0.7) and float(m["pg_loss"]) == pytest.approx(-1.0)
    for kw in (dict(clip_low=1.0, clip_high=0.2), dict(clip_low=0.2, clip_high=-0.1),
               dict(clip_low=0.2, clip_high=0.2, dual_clip_c=1.0)):
        with pytest.raises(ValueError):
            policy_loss(lp, lp, adv, mask, **kw)


def test_value_loss_clipping_hand_computed():
    values = torch.tensor([[1.0, 0.0, 3.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 1.0, 9.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, value_clip=0.2)
    # token 0: v - old = 0.5 -> clipped 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69
    # token 1: v == old; (0-1)^2 = 1 both -> 1
    # token 2: v - old = 2 -> clipped 1.2; (3-0)^2 = 9, (1.2-0)^2 = 1.44 -> 9
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 9.0) / 3, rel=1e-6)
    assert float(m["vf_clipfrac"]) == pytest.approx(1 / 3)
    loss.backward()
    # token 0 takes the clipped branch (constant in v): zero gradient; token 2: (v - R) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0 / 3, 1.0, 0.0]]))
    plain, _ = value_loss(values, old, returns, mask)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 1.0 + 9.0) / 3, rel=1e-6)


@SETTINGS
@given(
    mode=st.sampled_from(LOSS_AGG_MODES),
    lengths=st.lists(st.integers(0, 12), min_size=2, max_size=9),
    cuts=st.lists(st.integers(1, 8), max_size=4),
    seed=st.integers(0, 2**16),
    clip=st.sampled_from([None, 0.1, 1.0]),
)
def test_value_loss_split_with_global_denominators_gives_same_loss_and_grad(mode, lengths, cuts, seed, clip):
    """Critic micro-batches (or ranks) with global num_tokens / num_seqs sum to the full loss."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), 12
    mask_BT = prefix_mask(lengths, T)
    values_BT = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_BT = values_BT + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns_BT = torch.randn(B, T, generator=g, dtype=torch.float64)

    def piece_loss(v, s):
        return value_loss(v[s], old_BT[s], returns_BT[s], mask_BT[s], value_clip=clip, loss_agg_mode=mode,
                          num_tokens=mask_BT.sum(), num_seqs=B, norm_len=NORM_LEN)[0]

    _assert_split_invariant(piece_loss, values_BT, cuts)


def test_explained_variance():
    g = torch.Generator().manual_seed(3)
    returns = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = prefix_mask([6, 3, 4], 6).double()
    r, v = returns[mask.bool()], values[mask.bool()]
    torch.testing.assert_close(explained_variance(values, returns, mask).double(), 1 - (r - v).var() / r.var())
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert math.isnan(float(explained_variance(values, torch.ones_like(returns), mask)))


def test_kl_loss_aggregates_estimator():
    g = torch.Generator().manual_seed(4)
    lp, ref = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    mask = prefix_mask([4, 2], 4)
    loss, m = kl_loss(lp, ref, mask, kind="low_var_kl", loss_agg_mode="seq-mean-token-mean")
    torch.testing.assert_close(loss, aggregate_loss(kl_penalty(lp, ref, "k3"), mask, "seq-mean-token-mean"))
    assert float(m["kl_loss"]) == float(loss)
