"""KL to the reference policy: per-token estimators, exact KL, and the KL coefficient.

Shape legend: B = responses, T = response tokens (right padded), V = vocabulary.
`logprobs_BT` are the sampled tokens' log-probs under the policy, `ref_logprobs_BT` under
the frozen reference. All estimators estimate KL(pi || pi_ref) from tokens sampled from
pi (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full")
"""`kl`=`k1`, `mse`=`k2`, `low_var_kl`=`k3` are aliases (ROLL / verl / blog names)."""

K3_LOG_RATIO_CLAMP = 20.0
"""log(pi_ref/pi) is clamped to +-20 before exp, so k3 cannot overflow."""
K3_CLAMP = 10.0
"""k3 values are clamped to at most 10, as verl does."""


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate, same shape as the inputs (no masking, no reduction).

    kinds, with logr = logprobs - ref_logprobs = log(pi / pi_ref):
      - "kl" / "k1": logr. Unbiased, can be negative per token.
      - "abs": |logr|.
      - "mse" / "k2": 0.5 * logr^2. Non-negative; biased, low variance.
      - "low_var_kl" / "k3": (pi_ref/pi) - log(pi_ref/pi) - 1. Unbiased and
        non-negative; the log-ratio is clamped to +-20 and the result to [0, 10] (verl
        clamps to [-10, 10]; k3 >= 0, so the lower bound only removes rounding error),
        which biases it only for extreme ratios. Computed with expm1 for accuracy
        near 0.
      - "full": exact KL over the vocabulary; `logprobs` / `ref_logprobs` must then be
        full log-distributions [B, T, V] (see `full_kl`). A model layer that already
        computed the exact KL (e.g. vocab-parallel) passes that tensor on directly.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind {kind!r} is not one of {', '.join(map(repr, KL_KINDS))}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    if kind == "full":
        if logprobs.dim() != 3:
            raise ValueError(
                'kind="full" needs full log-distributions [B, T, V]; got shape '
                f"{tuple(logprobs.shape)}. Pass the model layer's exact KL directly instead."
            )
        return full_kl(logprobs, ref_logprobs)
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    logr = logprobs.to(dt) - ref_logprobs.to(dt)
    if kind in ("kl", "k1"):
        return logr
    if kind == "abs":
        return logr.abs()
    if kind in ("mse", "k2"):
        return 0.5 * logr.square()
    neg_logr = (-logr).clamp(min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP)
    # expm1(x) - x, not exp(x) - x - 1: the latter cancels to small negative values for
    # |x| < ~1e-3 in fp32, exactly the regime of a policy close to its reference.
    return (torch.expm1(neg_logr) - neg_logr).clamp(min=0.0, max=K3_CLAMP)


def full_kl(logprobs_BTV: Tensor, ref_logprobs_BTV: Tensor) -> Tensor:
    """Exact KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)) per token, [B, T].

    Inputs are normalized log-probabilities over the whole vocabulary (log_softmax).
    Terms with pi(v) = 0 contribute 0 (also where log pi(v) = -inf). Under tensor
    parallelism each rank holds a vocabulary shard: the parallel layer sums this
    function's per-shard result over the tensor-parallel group.
    """
    if logprobs_BTV.shape != ref_logprobs_BTV.shape:
        raise ValueError(
            f"full_kl: shapes differ, {tuple(logprobs_BTV.shape)} vs {tuple(ref_logprobs_BTV.shape)}"
        )
    dt = torch.promote_types(logprobs_BTV.dtype, torch.float32)
    lp_BTV = logprobs_BTV.to(dt)
    p_BTV = lp_BTV.exp()
    support_BTV = p_BTV > 0
    # Select before multiplying: 0 * (-inf) would be NaN, also in the gradient.
    diff_BTV = torch.where(support_BTV, lp_BTV - ref_logprobs_BTV.to(dt), torch.zeros_like(lp_BTV))
    return (p_BTV * diff_BTV).sum(dim=-1)


def add_token_level_kl(
    token_rewards_BT: Tensor, kl_BT: Tensor, kl_coef: float, mask_BT: Tensor
) -> Tensor:
    """KL in the reward (ROLL `add_token_level_kl`, InstructGPT eq. 2):
    r'_t = r_t - kl_coef * KL_t on valid tokens, 0 on padding."""
    if not (token_rewards_BT.shape == kl_BT.shape == mask_BT.shape):
        raise ValueError("token rewards, kl and mask must share one [B, T] shape")
    return (token_rewards_BT - kl_coef * kl_BT) * mask_BT


class FixedKLController:
    """A constant KL coefficient (`init_kl_coef`, no `target_kl`)."""

    def __init__(self, init_kl_coef: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593).

    After each batch: e = clip(KL / target_kl - 1, -0.2, 0.2);
    coef <- coef * (1 + e * n_steps / kl_horizon), where KL is the batch's measured KL
    (the caller chooses the estimator and the averaging; ROLL uses the mean over
    sequences of the per-sequence token mean) and n_steps the number of samples in it.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, kl_horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if kl_horizon <= 0:
            raise ValueError(f"kl_horizon must be > 0, got {kl_horizon}")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.kl_horizon = float(kl_horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one controller step; returns the new coefficient."""
        err = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.kl_horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state only (the current coefficient). `target_kl` and `kl_horizon`
        are config: the resumed run's config wins, and a fixed-KL run's state (or an older
        checkpoint that also stored the config) loads the same way."""
        self.value = float(state["value"])


def make_kl_controller(
    init_kl_coef: float, target_kl: Optional[float] = None, kl_horizon: float = 10000.0
) -> FixedKLController | AdaptiveKLController:
    """Adaptive when `target_kl` is set, fixed otherwise (ROLL's knobs and defaults)."""
    if target_kl is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target_kl, kl_horizon)
