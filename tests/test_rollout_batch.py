"""``RolloutBatch.from_samples``: which responses count as truncated.

A response that ended without a stop token is truncated, whether it hit the length limit
(``finish_reason == "length"``) or was cut off by ``abort_requests`` / ``pause_generation("abort")``
(``"abort"``, a partial rollout): its last token is no end of sequence, so overlong filtering,
the reward model's EOS rule and the truncation metric must treat it like a length cut."""

from __future__ import annotations

import torch

from megappo.algo import overlong_filter
from megappo.loop.rollout_metrics import rollout_metrics
from megappo.rollout import Sample
from megappo.rollout.batch import RolloutBatch, RolloutStats


def batch_of(samples: list[Sample]) -> RolloutBatch:
    batch = RolloutBatch.from_samples(
        [[1, 2]] * len(samples), [[s] for s in samples], scores=[0.0] * len(samples), correct=[False] * len(samples),
        prompt_texts=[""] * len(samples), response_texts=[""] * len(samples), first_group_id=0, policy_version=0,
        stats=RolloutStats(),
    )
    batch.old_logprobs_BT = batch.rollout_logprobs_BT.clone()
    return batch


def test_aborted_samples_count_as_truncated():
    samples = [
        Sample([5, 6, 0], [-0.1, -0.2, -0.3], "stop"),
        Sample([5, 6, 7], [-0.1, -0.2, -0.3], "length"),
        Sample([5], [-0.4], "abort"),  # cut off by an abort after one token
        Sample([], [], "abort"),  # aborted before its first token
    ]
    batch = batch_of(samples)
    assert batch.truncated_B.tolist() == [False, True, True, True]

    kept_BT = overlong_filter(batch.mask_BT, batch.truncated_B)
    assert kept_BT.sum(1).tolist() == [3.0, 0.0, 0.0, 0.0]

    metrics = rollout_metrics(batch, reduce=lambda x, op="sum": x.clone(), dynamic_sampling=False)
    assert metrics["response_length/truncated_frac"] == 0.75


def test_truncation_survives_selection_and_concatenation():
    a = batch_of([Sample([5], [-0.1], "abort"), Sample([5, 0], [-0.1, -0.2], "stop")])
    b = batch_of([Sample([5, 6], [-0.1, -0.2], "length")])
    for part in (a, b):
        part.old_logprobs_BT = None
    whole = RolloutBatch.concat([a, b], stats=RolloutStats())
    assert whole.truncated_B.tolist() == [True, False, True]
    assert whole.select(torch.tensor([2, 0])).truncated_B.tolist() == [True, True]
