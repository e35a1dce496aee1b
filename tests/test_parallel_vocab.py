"""Single-process tests of the parallel layer's math: vocab-parallel log-prob / entropy /
exact KL on one shard (the whole vocabulary) against torch.log_softmax, gradients
included, with temperature and TP-padding; metric reduction rules. The two-rank versions
run in tests/test_models_parallel.py."""

from __future__ import annotations

import math

import pytest
import torch

from megappo.parallel.collectives import all_reduce, dp_all_reduce, reduce_metrics
from megappo.parallel.vocab_parallel import vocab_parallel_full_kl, vocab_parallel_logprobs

V_TRUE, V_PADDED = 11, 12


def _reference(logits, ref_logits, target, temperature):
    ls = torch.log_softmax(logits[..., :V_TRUE] / temperature, -1)
    lq = torch.log_softmax(ref_logits[..., :V_TRUE] / temperature, -1)
    lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return lp, -(ls.exp() * ls).sum(-1), (ls.exp() * (ls - lq)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_log_softmax_with_padding_and_temperature(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, V_PADDED, generator=g, dtype=torch.float64) * 4
    ref_logits = torch.randn(2, 5, V_PADDED, generator=g, dtype=torch.float64)
    target = torch.randint(0, V_TRUE, (2, 5), generator=g)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, target, vocab_size=V_TRUE, temperature=temperature, with_entropy=True)
    kl = vocab_parallel_full_kl(x, ref_logits, vocab_size=V_TRUE, temperature=temperature)
    w = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    ((w[0] * lp).sum() + (w[1] * ent).sum() + (w[2] * kl).sum()).backward()

    y = logits.clone().requires_grad_()
    lp2, ent2, kl2 = _reference(y, ref_logits, target, temperature)
    ((w[0] * lp2).sum() + (w[1] * ent2).sum() + (w[2] * kl2).sum()).backward()
    for a, b in ((lp, lp2), (ent, ent2), (kl, kl2), (x.grad, y.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert x.grad[..., V_TRUE:].abs().max() == 0  # padded ids get no gradient


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, V_PADDED, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, V_PADDED, generator=g, dtype=torch.float64)
    t = torch.randint(0, V_TRUE, (4,), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprobs(z, t, vocab_size=V_TRUE, temperature=0.7, with_entropy=True), (x,)
    )
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_full_kl(z, r, vocab_size=V_TRUE, temperature=0.7), (x,))


def test_entropy_only_unused_logprob_and_no_entropy():
    x = torch.randn(3, V_PADDED, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, 10])
    lp, ent = vocab_parallel_logprobs(x, t, vocab_size=V_TRUE, with_entropy=True)
    ent.sum().backward()  # only the entropy feeds the loss
    y = x.detach().clone().requires_grad_()
    _, ent2, _ = _reference(y, y.detach(), t, 1.0)
    ent2.sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    lp, ent = vocab_parallel_logprobs(x, t, vocab_size=V_TRUE)
    assert ent is None and lp.dtype == torch.float64


def test_bf16_logits_get_bf16_gradients_and_fp32_results():
    x = torch.randn(3, V_PADDED).bfloat16().requires_grad_()
    lp, _ = vocab_parallel_logprobs(x, torch.tensor([1, 2, 3]), vocab_size=V_TRUE)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_identical_logits_give_exactly_zero_kl():
    x = torch.randn(6, V_PADDED)
    assert vocab_parallel_full_kl(x, x.clone(), vocab_size=V_TRUE).abs().max() == 0


def test_bad_arguments():
    x = torch.randn(3, V_PADDED)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(x, torch.zeros(3, dtype=torch.long), vocab_size=V_TRUE, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs(x, torch.zeros(3, dtype=torch.long), vocab_size=V_PADDED + 1)
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_logprobs(x, torch.zeros(4, dtype=torch.long), vocab_size=V_TRUE)


def test_reduce_metrics_rules_on_one_rank():
    mbs = [
        {"num_tokens_local": torch.tensor(1.0), "pg_loss": 0.25, "clipfrac": 0.5, "ratio_min": 0.9, "ratio_max": float("nan")},
        {"num_tokens_local": 3.0, "pg_loss": 0.5, "clipfrac": 0.1, "ratio_min": float("nan"), "ratio_max": 1.2},
        {"num_tokens_local": 0.0, "pg_loss": 0.0, "clipfrac": 0.0, "ratio_min": float("nan"), "ratio_max": float("nan")},
    ]
    out = reduce_metrics(mbs, group=None)
    assert out["num_tokens_local"] == 4.0 and out["pg_loss"] == 0.75  # counts and loss shares add up
    assert math.isclose(out["clipfrac"], (0.5 * 1 + 0.1 * 3) / 4)  # token-weighted mean
    assert out["ratio_min"] == 0.9 and out["ratio_max"] == 1.2  # NaN (empty masks) ignored
    assert math.isnan(reduce_metrics([{"x_max": float("nan")}], group=None)["x_max"])
    assert reduce_metrics([{"a": 1.0}, {"a": 2.0}], group=None)["a"] == 1.5  # no weights: plain mean


def test_single_process_collectives_communicate_nothing():
    x = torch.tensor([1.0, 2.0])
    assert all_reduce(x, "max", None).tolist() == [1.0, 2.0]
    assert float(dp_all_reduce(torch.ones(2, 3).sum())) == 6.0
