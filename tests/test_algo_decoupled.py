"""The decoupled PPO loss (AReaL, arXiv 2505.24298, eq. 5) against a plain loop over tokens,
and its reduction to the PPO loss on policy."""

import math

import pytest
import torch

from megappo.algo import decoupled_policy_loss, policy_loss, stale_token_mask


def _loop_reference(logp, prox, behav, adv, mask, clip_low, clip_high, cap, dual_c, mode, norm_len=None):
    """Per-token Python floats, written from the paper's formula, aggregated by hand."""
    B, T = logp.shape
    per_seq, total, count = [], 0.0, 0.0
    for b in range(B):
        s, n = 0.0, 0.0
        for t in range(T):
            if mask[b, t] == 0:
                continue
            r = math.exp(float(logp[b, t]) - float(prox[b, t]))
            w = min(math.exp(float(prox[b, t]) - float(behav[b, t])), cap)
            a = float(adv[b, t])
            rc = min(max(r, 1 - clip_low), 1 + clip_high)
            term = -min(r * a, rc * a)  # the PPO objective's pessimistic bound, negated
            if dual_c is not None and a < 0:
                term = min(term, -a * dual_c)
            s += w * term
            n += 1
        per_seq.append((s, n))
        total += s
        count += n
    if mode == "token-mean":
        return total / count
    if mode == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in per_seq) / B
    if mode == "seq-mean-token-sum-norm":
        return sum(s / norm_len for s, n in per_seq) / B
    return sum(s for s, n in per_seq) / B


def _inputs(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    prox = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    behav = prox + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)  # some weights above the cap
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lens = torch.tensor([7, 3, 5, 1, 6])[:B]
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(torch.float64)
    return logp, prox, behav, adv, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dual_c", [None, 3.0])
def test_matches_token_loop(mode, dual_c):
    logp, prox, behav, adv, mask = _inputs()
    cap = 2.0
    loss, metrics = decoupled_policy_loss(logp, prox, behav, adv, mask, clip_low=0.2, clip_high=0.28, behav_weight_cap=cap,
                                          dual_clip_c=dual_c, loss_agg_mode=mode, norm_len=10.0)
    expected = _loop_reference(logp, prox, behav, adv, mask, 0.2, 0.28, cap, dual_c, mode, norm_len=10.0)
    assert float(loss) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    raw_w = torch.exp(prox - behav)
    assert 0 < float(metrics["behav_weight_clipfrac"]) < 1  # the inputs exercise the truncation
    assert float(metrics["behav_weight_clipfrac"]) == pytest.approx(float(((raw_w > cap).double() * mask).sum() / mask.sum()))
    assert float(metrics["behav_prox_kl"]) == pytest.approx(float(((behav - prox) * mask).sum() / mask.sum()))


def test_gradient_matches_token_loop():
    """d loss / d logp_t = w * (-A r) where the unclipped branch is active, else 0."""
    logp, prox, behav, adv, mask = _inputs(seed=3)
    logp = logp.clone().requires_grad_(True)
    loss, _ = decoupled_policy_loss(logp, prox, behav, adv, mask, clip_low=0.2, clip_high=0.2, behav_weight_cap=3.0)
    loss.backward()
    n, lp = float(mask.sum()), logp.detach()
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(float(lp[b, t]) - float(prox[b, t]))
            w = min(math.exp(float(prox[b, t]) - float(behav[b, t])), 3.0)
            a = float(adv[b, t])
            active = mask[b, t] > 0 and not ((a > 0 and r > 1.2) or (a < 0 and r < 0.8))
            want = -w * a * r / n if active else 0.0
            assert float(logp.grad[b, t]) == pytest.approx(want, abs=1e-12)


def test_on_policy_equals_ppo_loss():
    """behav = prox: every weight is 1 and the loss and gradient are policy_loss's exactly."""
    logp, prox, _, adv, mask = _inputs(seed=1)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    la, ma = decoupled_policy_loss(a, prox, prox, adv, mask, clip_low=0.2, clip_high=0.28, behav_weight_cap=5.0)
    lb, mb = policy_loss(b, prox, adv, mask, clip_low=0.2, clip_high=0.28)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    assert float(ma["behav_weight_mean"]) == 1.0 and float(ma["pg_clipfrac"]) == float(mb["pg_clipfrac"])


def test_bad_cap_rejected():
    logp, prox, behav, adv, mask = _inputs()
    with pytest.raises(ValueError, match="behav_weight_cap"):
        decoupled_policy_loss(logp, prox, behav, adv, mask, clip_low=0.2, clip_high=0.2, behav_weight_cap=0.5)


def test_stale_token_mask():
    mask = torch.ones(3, 4)
    versions = torch.tensor([[5, 5, 5, 5], [3, 3, 4, 4], [2, 5, 5, 5]])
    out = stale_token_mask(mask, versions, trained_version=5, max_lag=1)
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert stale_token_mask(mask, versions, 5, 0).sum() == 7
