"""The objective: reward tracker updates, the exact KL loss wiring, global statistics.

Shape legend: B = responses of one rank, T = response positions. Configs come from the
loader (as a run's do); `reduce_sums` is the identity for one rank, or a thread barrier
that sums the moment vectors of two ranks run side by side (an all-reduce SUM).
"""

from __future__ import annotations

import statistics
import threading
from types import SimpleNamespace

import pytest
import torch

from megappo import algo
from megappo.config import load_config
from megappo.rollout.batch import RolloutBatch
from megappo.models.batch import TokenBatch
from megappo.metrics import progress
from megappo.objective import Objective
from megappo.trainer import Trainer

EPS = 1e-6  # shape_rewards' default eps


def config(*overrides: str):
    return load_config(overrides=["rollout.num_return_sequences_in_group=2", *overrides])


def identity(sums: torch.Tensor) -> torch.Tensor:
    return sums


def experience(scores: list[float], lengths: list[int], *, truncated: list[bool] | None = None, seed: int = 0) -> RolloutBatch:
    """B responses in groups of two, prompts of 2 tokens, old/ref log-probs filled in."""
    B, T = len(scores), max(lengths)
    g = torch.Generator().manual_seed(seed)
    batch = TokenBatch(
        input_ids_BS=torch.ones(B, 2 + T, dtype=torch.long),
        prompt_lens_B=torch.full((B,), 2),
        response_lens_B=torch.tensor(lengths),
    )
    mask_BT = batch.response_mask_BT.float()
    exp = RolloutBatch(
        tokens=batch,
        rollout_logprobs_BT=torch.zeros(B, T),
        scores_B=torch.tensor(scores),
        correct_B=torch.zeros(B, dtype=torch.bool),
        truncated_B=torch.tensor(truncated or [False] * B),
        group_ids_B=torch.arange(B) // 2,
        policy_version_B=torch.zeros(B, dtype=torch.long),
    )
    exp.old_logprobs_BT = -torch.rand(B, T, generator=g) * mask_BT
    exp.ref_logprobs_BT = (exp.old_logprobs_BT - 0.1 * torch.rand(B, T, generator=g)) * mask_BT
    return exp


def normalized(values: list[float], seen: list[float]) -> torch.Tensor:
    mean, std = statistics.fmean(seen), statistics.stdev(seen)
    return torch.tensor([(v - mean) / (std + EPS) for v in values], dtype=torch.float64)


def test_running_reward_norm_updates_the_tracker_once_per_step() -> None:
    """One merge per step, of the scores the normalization is defined on (after the
    overlong penalty), and the shaped scores are (r - mean_all) / (std_all + eps)."""
    cfg = config("algo.reward_norm=running", "algo.overlong_buffer_len=2", "rollout.response_length=4",
                 "algo.adv_estimator=grpo", "algo.adv_norm.mean_level=none", "algo.adv_norm.std_level=none")
    obj = Objective(cfg, reduce_sums=identity)
    # Lengths 4 and 3 fall in the overlong buffer (limit 4, buffer 2): penalties -1 and -0.5.
    first = experience([1.0, 0.0, 0.0, 1.0], [1, 4, 2, 3])
    penalised1 = [1.0, -1.0, 0.0, 0.5]
    obj.compute_advantages(first)
    assert obj.reward_tracker.count == 4
    assert obj.reward_tracker.mean == pytest.approx(statistics.fmean(penalised1))
    assert obj.reward_tracker.std == pytest.approx(statistics.stdev(penalised1))
    # Outcome advantages with mean / std level none are the shaped scores themselves.
    torch.testing.assert_close(first.advantages_BT[:, 0].double(), normalized(penalised1, penalised1), rtol=1e-5, atol=1e-6)

    second = experience([1.0, 1.0], [1, 1], seed=1)
    obj.compute_advantages(second)
    assert obj.reward_tracker.count == 6
    torch.testing.assert_close(
        second.advantages_BT[:, 0].double(), normalized([1.0, 1.0], penalised1 + [1.0, 1.0]), rtol=1e-5, atol=1e-6
    )


class ThreadAllReduce:
    """`reduce_sums` for ``n`` ranks run as threads: every call is a SUM over the ranks'
    tensors (the ranks make the same calls in the same order, as under torchrun)."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * n

    def reducer(self, rank: int):
        def reduce(sums: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = sums.clone()
            self.barrier.wait()
            out = torch.stack(self.slots).sum(dim=0)
            self.barrier.wait()
            return out

        return reduce


def test_running_reward_norm_uses_global_statistics_over_ranks() -> None:
    cfg = config("algo.reward_norm=running", "algo.adv_norm.mean_level=none", "algo.adv_norm.std_level=none")
    scores = [[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 3.0, 2.0, 2.0]]  # ranks may hold different counts
    exps = [experience(s, [2] * len(s), seed=r) for r, s in enumerate(scores)]
    allreduce = ThreadAllReduce(2)
    objs = [Objective(cfg, reduce_sums=allreduce.reducer(r)) for r in range(2)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            objs[rank].compute_advantages(exps[rank])
        except BaseException as err:  # surfaced below
            errors.append(err)
            allreduce.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    everything = scores[0] + scores[1]
    for obj, exp, local in zip(objs, exps, scores):
        assert obj.reward_tracker.count == len(everything)  # the global batch, once
        assert obj.reward_tracker.state_dict() == pytest.approx(objs[0].reward_tracker.state_dict())
        torch.testing.assert_close(exp.advantages_BT[:, 0].double(), normalized(local, everything), rtol=1e-5, atol=1e-6)


def fake_outputs(exp: RolloutBatch, *, with_kl: bool):
    g = torch.Generator().manual_seed(5)
    B, T = exp.mask_BT.shape
    mask_BT = exp.mask_BT.float()
    outputs = {"logprobs_BT": (exp.old_logprobs_BT + 0.05 * torch.randn(B, T, generator=g) * mask_BT).requires_grad_(True)}
    if with_kl:
        outputs["kl_BT"] = (torch.rand(B, T, generator=g) * mask_BT).requires_grad_(True)
    return outputs


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_exact_kl_loss_uses_the_model_layer_kl(agg: str) -> None:
    cfg = config("algo.preset=grpo", "algo.kl_penalty=full", "algo.kl_loss_coef=0.5", f"algo.loss_agg_mode={agg}")
    obj = Objective(cfg, reduce_sums=identity)
    assert obj.exact_kl_loss and obj.sampled_kl_kind == "kl"
    reference = object()
    assert obj.actor_loss_reference(reference) is reference
    exp = experience([1.0, 0.0, 0.0, 1.0], [3, 1, 2, 3])
    obj.compute_advantages(exp)
    den = obj.denominators(exp)
    rows = torch.arange(len(exp))
    outputs = fake_outputs(exp, with_kl=True)
    loss, metrics = obj.actor_loss_fn(exp, den)(outputs, rows)
    mask_BT = exp.loss_mask_BT
    agg_kw = dict(num_tokens=den.num_tokens, num_seqs=den.num_seqs, norm_len=cfg.rollout.response_length)
    kl = algo.aggregate_loss(outputs["kl_BT"].detach(), mask_BT, agg, **agg_kw)
    pg, _ = algo.policy_loss(outputs["logprobs_BT"].detach(), exp.old_logprobs_BT, exp.advantages_BT, mask_BT,
                             clip_low=0.2, clip_high=0.2, loss_agg_mode=agg, **agg_kw)
    torch.testing.assert_close(metrics["kl_loss"], kl)
    torch.testing.assert_close(loss.detach(), pg + 0.5 * kl)
    loss.backward()
    expected_grad = torch.autograd.grad(0.5 * algo.aggregate_loss(
        outputs["kl_BT"], mask_BT, agg, **agg_kw), outputs["kl_BT"])[0]
    torch.testing.assert_close(outputs["kl_BT"].grad, expected_grad)
    with pytest.raises(AssertionError, match="ref="):
        obj.actor_loss_fn(exp, den)(fake_outputs(exp, with_kl=False), rows)


def test_sampled_kl_loss_and_metric_use_the_configured_estimator() -> None:
    cfg = config("algo.preset=grpo")  # low_var_kl (k3) in the loss
    obj = Objective(cfg, reduce_sums=identity)
    assert not obj.exact_kl_loss and obj.actor_loss_reference(object()) is None
    exp = experience([1.0, 0.0, 0.0, 1.0], [3, 1, 2, 3])
    metrics = obj.compute_advantages(exp)
    mask_BT = exp.mask_BT.float()
    k3 = algo.kl_penalty(exp.old_logprobs_BT, exp.ref_logprobs_BT, "low_var_kl")
    assert metrics["actor/kl_ref"] == pytest.approx(float(algo.masked_mean(k3, mask_BT)), rel=1e-6)
    den = obj.denominators(exp)
    outputs = fake_outputs(exp, with_kl=False)
    _, m = obj.actor_loss_fn(exp, den)(outputs, torch.arange(len(exp)))
    k3_now = algo.kl_penalty(outputs["logprobs_BT"].detach(), exp.ref_logprobs_BT, "low_var_kl")
    expected = algo.aggregate_loss(k3_now, exp.loss_mask_BT, "seq-mean-token-mean", num_seqs=den.num_seqs)
    torch.testing.assert_close(m["kl_loss"], expected)


def test_full_kl_metric_is_the_sampled_k1_estimate() -> None:
    obj = Objective(config("algo.preset=grpo", "algo.kl_penalty=full"), reduce_sums=identity)
    exp = experience([1.0, 0.0, 0.0, 1.0], [3, 1, 2, 3])
    metrics = obj.compute_advantages(exp)
    k1 = exp.old_logprobs_BT - exp.ref_logprobs_BT
    assert metrics["actor/kl_ref"] == pytest.approx(float(algo.masked_mean(k1, exp.mask_BT.float())), rel=1e-6)


def test_trainer_update_passes_the_reference_to_the_actor_step() -> None:
    """The loop hands `Objective.actor_loss_reference` to `train_step` unchanged."""
    seen = []

    class FakePolicy:
        def train_step(self, batch, loss_fn, *, temperature, ref=None, entropy_grad=True):
            seen.append(ref)
            return {"loss": 0.0}

    cfg = config("algo.preset=grpo", "algo.kl_penalty=full")
    trainer = Trainer.__new__(Trainer)  # no models: only the update phase is exercised
    trainer.cfg = cfg
    trainer.objective = Objective(cfg, reduce_sums=identity)
    trainer.run = SimpleNamespace(layout=SimpleNamespace(dp=1, dp_rank=0))
    trainer.rollout = SimpleNamespace(progress=lambda total, desc, leave=True: progress(total, desc, enabled=False))
    exp = experience([1.0, 0.0], [2, 1])
    trainer.objective.compute_advantages(exp)
    reference = object()
    ref = trainer.objective.actor_loss_reference(reference)
    out = trainer.update(FakePolicy(), exp, trainer.objective.actor_loss_fn, "actor", step=1, ref=ref)
    assert seen == [reference] and out["actor/optimizer_steps"] == 1.0


def test_shuffled_minibatches_cover_every_row_once_and_replay_per_step() -> None:
    """With train.shuffle_minibatches each (step, epoch) draws its own permutation, the same
    on a resumed run (a function of the seed, step, epoch and rank only); without it the
    mini-batches are contiguous runs of whole groups."""
    def trainer_for(*overrides):
        trainer = Trainer.__new__(Trainer)
        trainer.cfg = config("train.mini_batch_size=2", *overrides)
        trainer.run = SimpleNamespace(layout=SimpleNamespace(dp=1, dp_rank=0))
        return trainer

    plain = trainer_for("train.shuffle_minibatches=false").minibatches(8, step=3, epoch=0)
    assert [r.tolist() for r in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shuffled = trainer_for("train.shuffle_minibatches=true")
    a = shuffled.minibatches(8, step=3, epoch=0)
    assert sorted(torch.cat(a).tolist()) == list(range(8)) and [len(r) for r in a] == [4, 4]
    assert [r.tolist() for r in a] == [r.tolist() for r in trainer_for("train.shuffle_minibatches=true").minibatches(8, step=3, epoch=0)]
    assert torch.cat(a).tolist() != torch.cat(shuffled.minibatches(8, step=3, epoch=1)).tolist()
    assert torch.cat(a).tolist() != torch.cat(shuffled.minibatches(8, step=4, epoch=0)).tolist()


def test_a_non_finite_loss_or_grad_norm_stops_the_run_naming_the_step() -> None:
    from megappo.trainer import NonFiniteError, check_finite

    check_finite(3, {"actor/pg_loss": 0.1, "actor/grad_norm": 2.0, "reward/std": float("nan")})  # a metric, not a loss
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite actor/grad_norm=nan"):
        check_finite(4, {"actor/pg_loss": 0.1, "actor/grad_norm": float("nan")})
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite critic/vf_loss=inf"):
        check_finite(5, {"critic/vf_loss": float("inf")})
