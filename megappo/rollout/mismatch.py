"""How far the engine's log-probs are from the trainer's, logged every step.

Shape legend: B = sequences of this data-parallel rank, T = response positions.

With ``d = logp_trainer - logp_rollout`` on the sampled tokens (which the rollout policy
drew), over the valid tokens of ``mask_BT`` of the whole batch (all data-parallel ranks):
  - ``rollout/logp_diff_mean`` = mean |d|, ``rollout/logp_diff_max`` = max |d|;
  - ``rollout/kl_k1`` = mean(-d), the k1 estimator of KL(pi_rollout || pi_trainer);
  - ``rollout/kl_k3`` = mean(exp(d) - 1 - d), the k3 estimator of the same KL (Schulman,
    "Approximating KL Divergence", 2020: with r = pi_trainer / pi_rollout evaluated on
    samples of pi_rollout, k3 = (r - 1) - log r; unbiased and never negative).
Every mean is a per-token mean over the global batch: ``mismatch_sums`` gives this rank's
float64 ``[tokens, sum |d|, sum -d, sum k3]`` (all-reduce with SUM) and ``[max |d|]``
(all-reduce with MAX); ``mismatch_from_sums`` turns the reduced pair into the metrics.
0 when no token is valid. Right
after a weight sync all four are ~0 (the engine holds the trainer's weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

KEYS = ("rollout/logp_diff_mean", "rollout/logp_diff_max", "rollout/kl_k1", "rollout/kl_k3")


def mismatch_sums(trainer_logprobs_BT: Tensor, rollout_logprobs_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's float64 ``[tokens, sum |d|, sum -d, sum k3]`` and ``[max |d|]`` (0 when
    no token is valid: |d| >= 0, so 0 is neutral for the MAX reduction)."""
    if trainer_logprobs_BT.shape != rollout_logprobs_BT.shape or trainer_logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"mismatch_sums: shapes differ: trainer {tuple(trainer_logprobs_BT.shape)}, "
            f"rollout {tuple(rollout_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )
    valid_BT = mask_BT.bool()
    d_N = (trainer_logprobs_BT.double() - rollout_logprobs_BT.double().to(trainer_logprobs_BT.device))[valid_BT].cpu()
    abs_N = d_N.abs()
    sums = torch.stack([torch.tensor(float(d_N.numel()), dtype=torch.float64), abs_N.sum(), (-d_N).sum(), (torch.expm1(d_N) - d_N).sum()])
    top = abs_N.max().reshape(1) if d_N.numel() else torch.zeros(1, dtype=torch.float64)
    return sums, top


def mismatch_from_sums(sums: Tensor, top: Tensor) -> dict[str, float]:
    """The four ``rollout/*`` metrics from (reduced) ``mismatch_sums``."""
    tokens, abs_sum, k1_sum, k3_sum = sums.tolist()
    if tokens == 0:
        return dict.fromkeys(KEYS, 0.0)
    return {
        "rollout/logp_diff_mean": abs_sum / tokens,
        "rollout/logp_diff_max": float(top[0]),
        "rollout/kl_k1": k1_sum / tokens,
        "rollout/kl_k3": k3_sum / tokens,
    }
