"""The Bradley-Terry preference loss of reward-model training. Pure torch.

Shape legend: P = preference pairs (of one micro-batch).

Bradley and Terry (1952) model P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)); the
reward model maximizes its log-likelihood over human preference pairs (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", eq. 1, with one
pair per comparison rather than all K-choose-2 of a prompt):

    loss = -1/N * sum_i log sigmoid(r_c_i - r_r_i)

N is the *global* number of pairs of the optimizer step (all micro-batches, all
data-parallel ranks), passed in, so that the batch loss is the plain sum of the
micro-batch values (the convention of ``megappo.models``' loss functions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen_P: Tensor, rejected_P: Tensor, *, num_pairs: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, metrics)`` of these pairs' share of the batch loss (see the module doc).

    ``logsigmoid`` keeps large margins finite (no log(0)). Metrics, over these pairs:
    ``accuracy`` (the fraction with r_c > r_r strictly; a tie counts as wrong, so a model
    that scores everything alike starts at 0), ``margin`` (mean r_c - r_r), ``chosen`` and
    ``rejected`` (mean scores).
    """
    if chosen_P.shape != rejected_P.shape or chosen_P.dim() != 1:
        raise ValueError(f"chosen_P and rejected_P must be [P] alike, got {tuple(chosen_P.shape)} and {tuple(rejected_P.shape)}")
    if num_pairs <= 0:
        raise ValueError(f"num_pairs must be > 0, got {num_pairs}")
    diff_P = chosen_P - rejected_P
    loss = -F.logsigmoid(diff_P).sum() / num_pairs
    with torch.no_grad():
        metrics = {
            "accuracy": (diff_P > 0).float().mean(),
            "margin": diff_P.mean(),
            "chosen": chosen_P.mean(),
            "rejected": rejected_P.mean(),
        }
    return loss, metrics
