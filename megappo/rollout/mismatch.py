"""How far the engine's log-probs are from the trainer's, logged every step.

Shape legend: B = sequences of this data-parallel rank, T = response positions.

With ``d = logp_trainer - logp_rollout`` on the sampled tokens (which the rollout policy
drew), over the valid tokens of ``mask_BT``:
  - ``rollout/logp_diff_mean`` = mean |d|, ``rollout/logp_diff_max`` = max |d|;
  - ``rollout/kl_k1`` = mean(-d), the k1 estimator of KL(pi_rollout || pi_trainer);
  - ``rollout/kl_k3`` = mean(exp(d) - 1 - d), the k3 estimator of the same KL (Schulman,
    "Approximating KL Divergence", 2020: with r = pi_trainer / pi_rollout evaluated on
    samples of pi_rollout, k3 = (r - 1) - log r; unbiased and never negative).
Computed in float64 over this rank's tokens (no reduction across ranks); 0 when no token
is valid. Right after a weight sync all four are ~0 (the engine holds the trainer's weights).
"""

from __future__ import annotations

import torch
from torch import Tensor


def mismatch_metrics(trainer_logprobs_BT: Tensor, rollout_logprobs_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    """The four ``rollout/*`` metrics of the module docstring, as Python floats."""
    if trainer_logprobs_BT.shape != rollout_logprobs_BT.shape or trainer_logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"mismatch_metrics: shapes differ: trainer {tuple(trainer_logprobs_BT.shape)}, "
            f"rollout {tuple(rollout_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )
    valid_BT = mask_BT.bool()
    d_N = (trainer_logprobs_BT.double() - rollout_logprobs_BT.double().to(trainer_logprobs_BT.device))[valid_BT]
    if d_N.numel() == 0:
        return {"rollout/logp_diff_mean": 0.0, "rollout/logp_diff_max": 0.0, "rollout/kl_k1": 0.0, "rollout/kl_k3": 0.0}
    abs_N = d_N.abs()
    return {
        "rollout/logp_diff_mean": float(abs_N.mean()),
        "rollout/logp_diff_max": float(abs_N.max()),
        "rollout/kl_k1": float((-d_N).mean()),
        "rollout/kl_k3": float((torch.expm1(d_N) - d_N).mean()),
    }
