"""Token-level returns: GAE and REINFORCE++ discounted returns, vectorized over T.

Shape legend: B = responses, T = response tokens (right padded), N = blocks of K tokens.
`mask_BT` is 1 on a prefix of each row (the response) and 0 on the padding.

Every function here is autograd-agnostic; callers run them under `torch.no_grad()`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BLOCK = 32
"""Block length K of `reverse_discounted_cumsum`: the K x K decay matrix is tiny and a
block's matmul is B*T*K multiply-adds; 16-32 were the fastest on CPU at T in 4k..16k
(B=512, tools/bench_algo.py), where the scan is bound by memory traffic."""


def _decay_matrix(discount: float, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """M[j, i] = discount**(j - i) for j >= i else 0, so (x @ M)[i] = sum_j>=i d^(j-i) x_j.

    Powers are taken in float64 and rounded once, so the fp32 matrix is exact to 1 ulp.
    """
    idx = torch.arange(k, device=device)
    expo_KK = idx[:, None] - idx[None, :]  # row j (source), column i (target)
    base = torch.tensor(discount, dtype=torch.float64, device=device)
    powers_KK = torch.pow(base, expo_KK.clamp(min=0).to(torch.float64))
    return torch.where(expo_KK >= 0, powers_KK, torch.zeros_like(powers_KK)).to(dtype)


def reverse_discounted_cumsum(x_BT: Tensor, discount: float, *, block: int = DEFAULT_BLOCK) -> Tensor:
    """y[:, t] = sum_{k >= 0} discount**k * x[:, t + k], without a Python loop over T.

    Blocked scan: T is cut into N blocks of K tokens. Inside a block the sum is one
    matmul with the K x K decay matrix. The value at each block's first token, seen from
    the previous block, is itself a reverse discounted cumsum over the N block heads with
    discount**K, solved by the same function (recursion depth log_K T); each token then
    adds discount**(K - i) times the next block's head. Cost O(B*T*K), memory O(B*T).
    Computed in float32 at least (bf16 inputs are upcast).
    """
    if x_BT.dim() != 2:
        raise ValueError(f"expected a [B, T] tensor, got shape {tuple(x_BT.shape)}")
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    dtype = torch.promote_types(x_BT.dtype, torch.float32)
    x_BT = x_BT.to(dtype)
    B, T = x_BT.shape
    if T == 0:
        return x_BT.clone()
    k = min(block, T)
    num_blocks = -(-T // k)
    if num_blocks * k != T:
        x_BT = F.pad(x_BT, (0, num_blocks * k - T))
    x_BNK = x_BT.reshape(B, num_blocks, k)
    local_BNK = x_BNK @ _decay_matrix(discount, k, dtype, x_BT.device)
    if num_blocks > 1:
        heads_BN = reverse_discounted_cumsum(local_BNK[:, :, 0], discount**k, block=block)
        next_head_BN = F.pad(heads_BN[:, 1:], (0, 1))
        idx = torch.arange(k, device=x_BT.device, dtype=torch.float64)
        base = torch.tensor(discount, dtype=torch.float64, device=x_BT.device)
        tail_decay_K = torch.pow(base, k - idx).to(dtype)
        local_BNK.addcmul_(next_head_BN[:, :, None], tail_decay_K)  # in place: no [B, N, K] temporary
    return local_BNK.view(B, num_blocks * k)[:, :T]


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lambd: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = sum_k (gamma * lambd)^k delta_{t+k},
    over the valid tokens of each response; the value after the last valid token is 0
    (the episode ends with the response), rewards and values on padding are ignored.
    Returns (advantages_BT, returns_BT) with returns = advantages + values (the critic's
    regression target, the TD(lambda) return), both 0 on padding. No whitening here:
    that is `masked_whiten`, applied by the caller if configured (verl whitens inside its
    GAE; we keep it a separate, global-statistics-aware step).

    Args: rewards, values, mask: [B, T]; gamma, lambd: floats in [0, 1].
    """
    rewards_BT, values_BT, mask_BT = rewards, values, mask
    if not (rewards_BT.shape == values_BT.shape == mask_BT.shape) or rewards_BT.dim() != 2:
        raise ValueError(
            "compute_gae: rewards, values and mask must share one [B, T] shape, got "
            f"{tuple(rewards_BT.shape)}, {tuple(values_BT.shape)}, {tuple(mask_BT.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(rewards_BT.dtype, values_BT.dtype), torch.float32)
    m_BT = mask_BT.to(dtype)
    v_BT = values_BT.to(dtype) * m_BT
    # delta = r + gamma * V_next - V, built in place in one fresh buffer (memory-bound at
    # long T). V_next is 0 past the last valid token because V is masked and the mask is
    # a prefix; for the same reason delta (and so A) is exactly 0 on the padding.
    delta_BT = rewards_BT.to(dtype) * m_BT
    delta_BT.sub_(v_BT)
    delta_BT[:, :-1].add_(v_BT[:, 1:], alpha=gamma)
    adv_BT = reverse_discounted_cumsum(delta_BT, gamma * lambd).mul_(m_BT)
    return adv_BT, adv_BT + v_BT


def scores_to_token_rewards(scores_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Place each response's scalar score on its last valid token; 0 elsewhere.

    A row whose mask is all zero (an empty or filtered response) gets no reward.
    """
    if scores_B.dim() != 1 or mask_BT.dim() != 2 or scores_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(
            f"scores [B] and mask [B, T] disagree: {tuple(scores_B.shape)} vs {tuple(mask_BT.shape)}"
        )
    dtype = torch.promote_types(scores_B.dtype, torch.float32)
    lengths_B = mask_BT.sum(dim=-1).long()
    last_B = (lengths_B - 1).clamp(min=0)
    out_BT = torch.zeros(mask_BT.shape, dtype=dtype, device=mask_BT.device)
    out_BT.scatter_(1, last_B[:, None], scores_B.to(dtype)[:, None])
    return out_BT * (lengths_B > 0).to(dtype)[:, None]


def reinforce_pp_returns(
    token_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    *,
    kl: Optional[Tensor] = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """REINFORCE++ token-level returns (Hu et al. 2025, arXiv 2501.03262).

    G_t = sum_{s >= t} gamma^(s - t) (r_s - kl_coef * KL_s) over the valid tokens, where
    r is the per-token reward (the outcome score on the last token, plus any dense
    reward) and KL_s the per-token KL penalty to the reference policy (`kl_penalty`).
    The paper then whitens G over the global batch of tokens; that is a separate step
    (`masked_whiten`, done by the `reinforce_pp` estimator) so the statistics can be
    global. Returns G_BT, 0 on padding.
    """
    token_rewards_BT, mask_BT = token_rewards, mask
    if token_rewards_BT.shape != mask_BT.shape or token_rewards_BT.dim() != 2:
        raise ValueError(
            f"token_rewards and mask must share one [B, T] shape, got "
            f"{tuple(token_rewards_BT.shape)} and {tuple(mask_BT.shape)}"
        )
    dtype = torch.promote_types(token_rewards_BT.dtype, torch.float32)
    m_BT = mask_BT.to(dtype)
    r_BT = token_rewards_BT.to(dtype)
    if kl is not None and kl_coef != 0.0:
        if kl.shape != mask_BT.shape:
            raise ValueError(f"kl must be [B, T] like mask, got {tuple(kl.shape)}")
        r_BT = r_BT - kl_coef * kl.to(dtype)
    return reverse_discounted_cumsum(r_BT * m_BT, gamma) * m_BT
