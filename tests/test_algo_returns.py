"""GAE, REINFORCE++ returns and the blocked reverse discounted cumsum, against float64 loops.

Shape legend: B = responses, T = response tokens.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megappo.algo import compute_gae, reinforce_pp_returns, reverse_discounted_cumsum, scores_to_token_rewards

SETTINGS = settings(max_examples=50, deadline=None, database=None)


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def loop_discounted_cumsum(x_BT, d):
    x = x_BT.double()
    out = torch.zeros_like(x)
    run = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in reversed(range(x.shape[1])):
        run = x[:, t] + d * run
        out[:, t] = run
    return out


def loop_gae(rewards_BT, values_BT, mask_BT, gamma, lambd):
    """Textbook per-row GAE in float64 over the valid prefix of each row."""
    B, T = rewards_BT.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask_BT[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            v_next = float(values_BT[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards_BT[b, t]) + gamma * v_next - float(values_BT[b, t])
            last = delta + gamma * lambd * last
            adv[b, t] = last
    ret = adv + values_BT.double() * mask_BT.double()
    return adv, ret


@pytest.mark.parametrize("T", [1, 2, 7, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("d", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("block", [2, 8, 64])
def test_reverse_discounted_cumsum_matches_loop(T, d, block):
    g = torch.Generator().manual_seed(T * 7 + block)
    x_BT = torch.randn(3, T, generator=g)
    got = reverse_discounted_cumsum(x_BT, d, block=block)
    assert got.dtype == torch.float32 and got.shape == x_BT.shape
    torch.testing.assert_close(got.double(), loop_discounted_cumsum(x_BT, d), rtol=1e-5, atol=1e-4)


def test_reverse_discounted_cumsum_long_fp32_accuracy():
    """fp32 blocked scan vs a float64 loop at a long T (three recursion levels at K=16)."""
    g = torch.Generator().manual_seed(0)
    x_BT = torch.randn(4, 5000, generator=g)
    for d in (0.95, 0.999, 1.0):
        ref = loop_discounted_cumsum(x_BT, d)
        got = reverse_discounted_cumsum(x_BT, d, block=16).double()
        scale = ref.abs().max().clamp(min=1.0)
        assert ((got - ref).abs().max() / scale) < 1e-5


def test_reverse_discounted_cumsum_rejects_bad_input():
    with pytest.raises(ValueError):
        reverse_discounted_cumsum(torch.zeros(3), 0.9)
    with pytest.raises(ValueError):
        reverse_discounted_cumsum(torch.zeros(2, 3), 0.9, block=1)


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_float64_loop(gamma, lambd):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 150
    lengths = [150, 1, 0, 37, 149, 80]
    mask_BT = prefix_mask(lengths, T)
    rewards_BT = torch.randn(B, T, generator=g)
    values_BT = torch.randn(B, T, generator=g)
    adv_BT, ret_BT = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)
    ref_adv, ref_ret = loop_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)
    torch.testing.assert_close(adv_BT.double(), ref_adv, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ret_BT.double(), ref_ret, rtol=1e-5, atol=2e-5)
    assert (adv_BT[mask_BT == 0] == 0).all() and (ret_BT[mask_BT == 0] == 0).all()


def test_gae_ignores_padding_content():
    """Garbage in padded rewards / values must not leak into valid positions."""
    mask_BT = prefix_mask([3, 5], 6)
    r = torch.randn(2, 6)
    v = torch.randn(2, 6)
    r2, v2 = r.clone(), v.clone()
    r2[mask_BT == 0] = 1e6
    v2[mask_BT == 0] = -1e6
    a1, ret1 = compute_gae(r, v, mask_BT, 0.99, 0.95)
    a2, ret2 = compute_gae(r2, v2, mask_BT, 0.99, 0.95)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(ret1, ret2)


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_gae_gamma_lambda_one_zero_values_is_reward_to_go(lengths, seed):
    T = 40
    g = torch.Generator().manual_seed(seed)
    mask_BT = prefix_mask(lengths, T)
    rewards_BT = torch.randn(len(lengths), T, generator=g) * mask_BT
    adv_BT, ret_BT = compute_gae(rewards_BT, torch.zeros_like(rewards_BT), mask_BT, 1.0, 1.0)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(rewards_BT.double(), [1]), 1), [1]) * mask_BT
    torch.testing.assert_close(adv_BT.double(), reward_to_go, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ret_BT, adv_BT)


def test_gae_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)


def test_scores_to_token_rewards_puts_score_on_last_token():
    mask_BT = prefix_mask([3, 1, 0, 4], 4)
    out = scores_to_token_rewards(torch.tensor([1.0, -2.0, 5.0, 0.5]), mask_BT)
    expected = torch.tensor(
        [[0, 0, 1.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.5]], dtype=torch.float32
    )
    torch.testing.assert_close(out, expected)


def test_reinforce_pp_returns_matches_loop_with_kl():
    g = torch.Generator().manual_seed(3)
    B, T = 5, 90
    mask_BT = prefix_mask([90, 10, 0, 45, 1], T)
    rewards_BT = scores_to_token_rewards(torch.randn(B, generator=g), mask_BT)
    kl_BT = torch.rand(B, T, generator=g)
    gamma, coef = 0.97, 0.05
    got = reinforce_pp_returns(rewards_BT, mask_BT, gamma, kl=kl_BT, kl_coef=coef)
    ref = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        run = 0.0
        for t in reversed(range(int(mask_BT[b].sum()))):
            run = float(rewards_BT[b, t]) - coef * float(kl_BT[b, t]) + gamma * run
            ref[b, t] = run
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
