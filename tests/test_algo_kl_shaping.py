"""KL estimators and controllers; reward shaping (normalization, running stats, overlong).

Shape legend: B = responses, T = response tokens, V = vocabulary.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megappo.algo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    add_token_level_kl,
    clip_rewards,
    full_kl,
    groups_with_signal,
    kl_penalty,
    make_kl_controller,
    moment_sums,
    normalize_rewards,
    overlong_filter,
    overlong_penalty,
    shape_rewards,
)

SETTINGS = settings(max_examples=50, deadline=None, database=None)


def test_kl_estimators_match_formulas():
    lp = torch.tensor([-1.0, -0.2, -3.0, -0.7])
    ref = torch.tensor([-1.5, -0.2, -1.0, -0.1])
    for kind, fn in [
        ("kl", lambda a, b: a - b),
        ("k1", lambda a, b: a - b),
        ("abs", lambda a, b: abs(a - b)),
        ("mse", lambda a, b: 0.5 * (a - b) ** 2),
        ("k2", lambda a, b: 0.5 * (a - b) ** 2),
        ("low_var_kl", lambda a, b: math.exp(b - a) - (b - a) - 1),
        ("k3", lambda a, b: math.exp(b - a) - (b - a) - 1),
    ]:
        expected = torch.tensor([fn(float(a), float(b)) for a, b in zip(lp, ref)])
        torch.testing.assert_close(kl_penalty(lp, ref, kind), expected, rtol=1e-6, atol=1e-6, msg=kind)


def test_k3_is_accurate_near_zero():
    """k3 ~ x^2 / 2 for a small log-ratio x; exp(x) - x - 1 in fp32 would cancel to ~1e-8 noise."""
    x = torch.tensor([1e-3, -1e-3, 1e-4])
    got = kl_penalty(torch.zeros(3), x, "k3")
    expected = torch.tensor([math.expm1(v) - v for v in x.double().tolist()], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0.0)
    assert float(kl_penalty(torch.zeros(1), torch.zeros(1), "k3")) == 0.0


def test_k3_is_clamped():
    out = kl_penalty(torch.tensor([-50.0, 0.0]), torch.tensor([0.0, -50.0]), "low_var_kl")
    assert torch.isfinite(out).all() and float(out.max()) == 10.0


@SETTINGS
@given(
    lp=st.lists(st.floats(-30.0, 0.0), min_size=1, max_size=16),
    shift=st.lists(st.floats(-30.0, 30.0), min_size=16, max_size=16),
)
def test_k2_and_k3_are_non_negative(lp, shift):
    lp_t = torch.tensor(lp)
    ref_t = lp_t + torch.tensor(shift[: len(lp)])
    assert (kl_penalty(lp_t, ref_t, "k2") >= 0).all()
    assert (kl_penalty(lp_t, ref_t, "k3") >= 0).all()


def test_full_kl_matches_loop_and_torch():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 3, 11, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(2, 3, 11, generator=g, dtype=torch.float64), -1)
    got = full_kl(lp, ref)
    loop = torch.tensor([[sum(math.exp(lp[b, t, v]) * (lp[b, t, v] - ref[b, t, v]) for v in range(11))
                          for t in range(3)] for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, loop)
    torch.testing.assert_close(got, F.kl_div(ref, lp, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(kl_penalty(lp, ref, "full"), got)
    # zero-probability entries (log p = -inf) contribute 0, also to the gradient
    lp0 = torch.log(torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64)).requires_grad_(True)
    ref0 = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64))
    out = full_kl(lp0, ref0)
    assert out.item() == pytest.approx(math.log(2.0))
    out.sum().backward()
    assert torch.isfinite(lp0.grad).all()


def test_kl_penalty_rejects_bad_input():
    with pytest.raises(ValueError, match="'low_var_kl'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="full"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), "full")


def test_add_token_level_kl():
    r = torch.tensor([[0.0, 1.0, 5.0]])
    kl = torch.tensor([[0.5, 0.2, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(add_token_level_kl(r, kl, 0.1, m), torch.tensor([[-0.05, 0.98, 0.0]]))


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target_kl=0.1, kl_horizon=10000)
    coef = 0.2
    for kl, n in [(0.3, 512), (0.05, 256), (0.1, 1000), (0.0, 512), (0.11, 64)]:
        err = min(max(kl / 0.1 - 1, -0.2), 0.2)
        coef *= 1 + err * n / 10000
        assert ctl.update(kl, n) == pytest.approx(coef, rel=1e-12)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    other = AdaptiveKLController(1.0, 0.1, 10000)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.update(0.5, 100) == ctl.update(0.5, 100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, 0.0, 10)


def test_kl_controller_resume_keeps_the_new_config():
    """Resuming restores the state (the coefficient), never the config: a new `algo.target_kl`
    / `kl_horizon` takes effect, and a fixed-KL run's state resumes into an adaptive controller."""
    old = AdaptiveKLController(init_kl_coef=0.2, target_kl=0.1, kl_horizon=10000)
    old.update(0.3, 512)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, kl_horizon=500)
    resumed.load_state_dict(old.state_dict())
    assert resumed.value == old.value
    assert (resumed.target_kl, resumed.kl_horizon) == (6.0, 500.0)
    coef = old.value
    assert resumed.update(5.4, 100) == pytest.approx(coef * (1 + (5.4 / 6.0 - 1) * 100 / 500), rel=1e-12)

    fixed = FixedKLController(0.05)
    adaptive = AdaptiveKLController(init_kl_coef=0.2, target_kl=0.1, kl_horizon=10000)
    adaptive.load_state_dict(fixed.state_dict())
    assert adaptive.value == 0.05 and adaptive.target_kl == 0.1
    # and back: an adaptive run's state (old checkpoints carried the config too) into a fixed one
    legacy = {"value": 0.3, "target_kl": 9.0, "kl_horizon": 7.0}
    back = FixedKLController(0.0)
    back.load_state_dict(legacy)
    assert back.value == 0.3
    adaptive.load_state_dict(legacy)
    assert (adaptive.target_kl, adaptive.kl_horizon, adaptive.value) == (0.1, 10000.0, 0.3)
    with pytest.raises(KeyError, match="value"):
        adaptive.load_state_dict({"target_kl": 0.1})


def test_fixed_kl_controller_and_factory():
    ctl = make_kl_controller(0.05)
    assert isinstance(ctl, FixedKLController) and ctl.update(10.0, 100) == 0.05
    restored = FixedKLController(0.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05
    assert isinstance(make_kl_controller(0.2, target_kl=6.0, kl_horizon=10000), AdaptiveKLController)


def test_running_mean_std_matches_concatenation_and_roundtrips():
    g = torch.Generator().manual_seed(1)
    # float64 data: this checks the merge algebra to 1e-9; moment_sums' float32 precision
    # has its own test (test_algo_advantages.py::test_moment_sums_float32_matches_float64).
    batches = [(torch.randn(n, generator=g) * 3 + 1).double() for n in (5, 1, 17, 2)]
    rms = RunningMeanStd()
    assert rms.mean == 0.0 and rms.std == 1.0
    for b in batches:
        rms.update(b)
    allx = torch.cat(batches).double()
    assert rms.count == allx.numel()
    assert rms.mean == pytest.approx(float(allx.mean()), rel=1e-9)
    assert rms.std == pytest.approx(float(allx.std()), rel=1e-9)
    state = rms.state_dict()
    assert isinstance(state["count"], int) and isinstance(state["mean"], float) and isinstance(state["m2"], float)
    fresh = RunningMeanStd()
    fresh.load_state_dict(state)
    nxt = torch.randn(4, generator=g)
    rms.update(nxt)
    fresh.update_from_sums(moment_sums(nxt))
    assert fresh.state_dict() == pytest.approx(rms.state_dict())


def test_normalize_rewards_modes():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 3.0])
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    mean, std = statistics.fmean(scores.tolist()), statistics.stdev(scores.tolist())
    eps = 1e-6
    torch.testing.assert_close(normalize_rewards(scores, "batch"), (scores - mean) / (std + eps))
    torch.testing.assert_close(normalize_rewards(scores, "batch", reward_shift=True), scores - mean)
    torch.testing.assert_close(normalize_rewards(scores, "batch", reward_scale=True), scores / (std + eps))
    g0, g1 = scores[:3], scores[3:]
    expected = torch.cat([(g0 - g0.mean()) / (g0.std() + eps), (g1 - g1.mean()) / (g1.std() + eps)])
    torch.testing.assert_close(normalize_rewards(scores, "group", group_ids_B=gids), expected)
    assert normalize_rewards(scores, "none") is scores
    tracker = RunningMeanStd()
    tracker.update(torch.tensor([10.0, 12.0]))
    out = normalize_rewards(scores, "running", tracker=tracker)
    allx = torch.tensor([10.0, 12.0] + scores.tolist(), dtype=torch.float64)
    torch.testing.assert_close(out.double(), (scores.double() - allx.mean()) / (allx.std() + eps))
    for kw in (dict(mode="global"), dict(mode="batch", reward_shift=True, reward_scale=True),
               dict(mode="group"), dict(mode="running")):
        with pytest.raises(ValueError):
            normalize_rewards(scores, **kw)


def test_overlong_penalty_matches_dapo_eq13():
    max_len, buf = 20, 8
    lengths = torch.arange(0, 26)
    got = overlong_penalty(lengths, max_len, buf)
    for y in lengths.tolist():
        if y <= max_len - buf:
            ref = 0.0
        elif y <= max_len:
            ref = ((max_len - buf) - y) / buf
        else:
            ref = -1.0
        assert float(got[y]) == pytest.approx(ref), y
    torch.testing.assert_close(overlong_penalty(lengths, max_len, buf, penalty_factor=0.5), 0.5 * got)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 10, 0)


def test_overlong_filter_and_shape_rewards():
    mask = torch.ones(3, 4)
    filtered = overlong_filter(mask, torch.tensor([False, True, False]))
    torch.testing.assert_close(filtered, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]))
    scores = torch.tensor([1.0, 1.0, 0.0, 4.0])
    lengths = torch.tensor([10, 18, 5, 30])
    out = shape_rewards(scores, lengths_B=lengths, overlong_max_len=20, overlong_buffer_len=4,
                        reward_norm="batch", reward_shift=True, reward_clip=1.0)
    penalised = scores + torch.tensor([0.0, -0.5, 0.0, -1.0])
    torch.testing.assert_close(out, clip_rewards(penalised - penalised.mean(), 1.0))
    with pytest.raises(ValueError):
        clip_rewards(scores, -1.0)


def test_groups_with_signal_matches_a_loop():
    """Dynamic sampling's filter keeps exactly the responses of groups whose raw scores are
    not all equal (a plain loop over groups is the reference); groups may be interleaved."""
    g = torch.Generator().manual_seed(5)
    group_ids_B = torch.randint(0, 7, (40,), generator=g)
    scores_B = torch.randint(0, 2, (40,), generator=g).float()
    scores_B[group_ids_B == 3] = 1.0  # an all-correct group
    keep_B = groups_with_signal(scores_B, group_ids_B)
    for gid in group_ids_B.unique().tolist():
        members = group_ids_B == gid
        varied = len(set(scores_B[members].tolist())) > 1
        assert keep_B[members].tolist() == [varied] * int(members.sum())
    assert not keep_B[group_ids_B == 3].any() and keep_B.any()
