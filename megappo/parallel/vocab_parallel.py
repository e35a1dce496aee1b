"""Log-probabilities, entropy and exact KL from vocabulary-sharded logits, without
gathering the vocabulary.

Shape legend: N = tokens (any leading shape, flattened inside), V = this rank's shard of
the TP-padded vocabulary. Rank r of the tensor-parallel group holds ids
[r * V, (r + 1) * V) (Megatron's ``VocabParallelEmbedding`` / column-parallel LM head).

What is computed, per token, with z = logits / temperature (how the rollout engine
applies temperature, so trainer and engine report the same log-prob; CONTRACTS.md):
  log p(target) = z_target - logsumexp(z)
  H            = logsumexp(z) - sum_v p_v z_v
  KL(p || q)   = sum_v p_v (log p_v - log q_v)    (q from the reference's logits)
Ids at or above the true ``vocab_size`` (TP padding) are set to -inf before the softmax,
so they have probability 0 and receive zero gradient.

Communication: the max, the sums and the target logit are all-reduced over the TP group
(two all-reduces per call). Autograd: each function is one ``torch.autograd.Function``
whose backward is local: under Megatron's convention the loss is replicated on every TP
rank, so the gradient of a shard's logits is d(loss)/d(shard), with no communication
(as Megatron's ``vocab_parallel_cross_entropy``). Saved for backward: the shard's
softmax p in float32 ([N, V]); the KL saves one more [N, V] tensor.

Gradients (per token, u a vocabulary id, 1_t the target indicator):
  d log p_t / d z_u = 1_t(u) - p_u
  d H / d z_u       = -p_u (log p_u + H)
  d KL / d z_u      = p_u (log p_u - log q_u - KL)       (q is not differentiated)
and d/d logits = (d/d z) / temperature.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def tp_group():
    """Megatron's tensor-parallel group, or None (one rank) before ``init_parallel``."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group() if mpu.model_parallel_is_initialized() else None


def _rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_(x: Tensor, op, group) -> Tensor:
    if _rank_size(group)[1] > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _scaled_masked(logits_NV: Tensor, vocab_start: int, vocab_size: int, temperature: float) -> Tensor:
    """z = logits / temperature (float32, or float64 for float64 logits) with padded ids
    at -inf (a new tensor)."""
    z_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)) / temperature
    local_v = z_NV.shape[-1]
    num_pad = vocab_start + local_v - vocab_size
    if num_pad > 0:
        z_NV[:, max(0, local_v - num_pad):] = float("-inf")
    return z_NV


def _shifted_exp(z_NV: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """(z - max, exp(z - max), local sum of exp) with the max taken over the whole vocabulary."""
    max_N = z_NV.max(dim=-1).values
    _all_reduce_(max_N, dist.ReduceOp.MAX, group)
    zs_NV = z_NV - max_N.unsqueeze(-1)
    e_NV = zs_NV.exp()
    return zs_NV, e_NV, e_NV.sum(dim=-1)


def _finite(x_NV: Tensor) -> Tensor:
    """-inf (padded ids) -> 0, so that 0 * x is 0 rather than NaN."""
    return torch.where(torch.isneginf(x_NV), torch.zeros_like(x_NV), x_NV)


class _LogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, target_N, vocab_start, vocab_size, temperature, with_entropy, group):
        z_NV = _scaled_masked(logits_NV, vocab_start, vocab_size, temperature)
        zs_NV, e_NV, sum_N = _shifted_exp(z_NV, group)
        del z_NV
        local_v = zs_NV.shape[-1]
        in_shard_N = (target_N >= vocab_start) & (target_N < vocab_start + local_v)
        local_t_N = (target_N - vocab_start).clamp(0, local_v - 1)
        zt_N = zs_NV.gather(-1, local_t_N.unsqueeze(-1)).squeeze(-1)
        zt_N = torch.where(in_shard_N, zt_N, torch.zeros_like(zt_N))
        parts = [sum_N, zt_N]
        if with_entropy:
            parts.append((e_NV * _finite(zs_NV)).sum(dim=-1))
        del zs_NV
        red = _all_reduce_(torch.stack(parts), dist.ReduceOp.SUM, group)
        log_sum_N = red[0].log()
        logprob_N = red[1] - log_sum_N
        entropy_N = log_sum_N - red[2] / red[0] if with_entropy else torch.zeros_like(logprob_N)
        p_NV = e_NV.div_(red[0].unsqueeze(-1))
        ctx.save_for_backward(p_NV, local_t_N, in_shard_N, entropy_N)
        ctx.temperature, ctx.with_entropy, ctx.dtype = temperature, with_entropy, logits_NV.dtype
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return logprob_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprob_N, grad_entropy_N):
        p_NV, local_t_N, in_shard_N, entropy_N = ctx.saved_tensors
        g_lp_N = grad_logprob_N if grad_logprob_N is not None else torch.zeros_like(entropy_N)
        coef_N = g_lp_N
        use_entropy = ctx.with_entropy and grad_entropy_N is not None
        if use_entropy:
            coef_N = coef_N + grad_entropy_N * entropy_N
        grad_NV = p_NV * (-coef_N).unsqueeze(-1)
        if use_entropy:
            grad_NV -= grad_entropy_N.unsqueeze(-1) * torch.xlogy(p_NV, p_NV)
        onehot_N = torch.where(in_shard_N, g_lp_N, torch.zeros_like(g_lp_N))
        grad_NV.scatter_add_(-1, local_t_N.unsqueeze(-1), onehot_N.unsqueeze(-1))
        grad_NV /= ctx.temperature
        return grad_NV.to(ctx.dtype), None, None, None, None, None, None


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, ref_logits_NV, vocab_start, vocab_size, temperature, group):
        z_NV = _scaled_masked(logits_NV, vocab_start, vocab_size, temperature)
        zr_NV = _scaled_masked(ref_logits_NV, vocab_start, vocab_size, temperature)
        max_2N = _all_reduce_(torch.stack([z_NV.max(-1).values, zr_NV.max(-1).values]), dist.ReduceOp.MAX, group)
        z_NV -= max_2N[0].unsqueeze(-1)
        zr_NV -= max_2N[1].unsqueeze(-1)
        sums_2N = _all_reduce_(torch.stack([z_NV.exp().sum(-1), zr_NV.exp().sum(-1)]), dist.ReduceOp.SUM, group)
        logp_NV = z_NV.sub_(sums_2N[0].log().unsqueeze(-1))
        logq_NV = zr_NV.sub_(sums_2N[1].log().unsqueeze(-1))
        p_NV = logp_NV.exp()
        diff_NV = torch.where(p_NV > 0, logp_NV - logq_NV, torch.zeros_like(p_NV))
        del logp_NV, logq_NV, z_NV, zr_NV
        kl_N = _all_reduce_((p_NV * diff_NV).sum(-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(p_NV, diff_NV, kl_N)
        ctx.temperature, ctx.dtype = temperature, logits_NV.dtype
        return kl_N

    @staticmethod
    def backward(ctx, grad_kl_N):
        p_NV, diff_NV, kl_N = ctx.saved_tensors
        grad_NV = p_NV * (diff_NV - kl_N.unsqueeze(-1)) * (grad_kl_N / ctx.temperature).unsqueeze(-1)
        return grad_NV.to(ctx.dtype), None, None, None, None, None


def _check(logits: Tensor, vocab_size: int, temperature: float, group) -> tuple[int, int]:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy decoding has no log-probs); got {temperature}")
    rank, size = _rank_size(group)
    local_v = logits.shape[-1]
    if not (local_v * (size - 1) < vocab_size <= local_v * size):
        raise ValueError(
            f"vocab_size {vocab_size} does not fit a vocabulary of {size} shard(s) of {local_v} ids "
            f"(padded size {local_v * size})"
        )
    return rank * local_v, local_v


def vocab_parallel_logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group=None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-prob of ``target`` and (if ``with_entropy``) the entropy per token.

    ``logits`` [..., V] is this rank's vocabulary shard (any float dtype; computed in
    float32, or float64 for float64 logits), ``target`` [...] global token ids <
    ``vocab_size`` (the true vocabulary; ids of the TP padding are masked out). ``group``
    defaults to Megatron's TP group. Returns tensors shaped like ``target`` in the compute
    dtype, identical on every TP rank; the entropy is None without ``with_entropy``.
    """
    group = tp_group() if group is None else group
    vocab_start, local_v = _check(logits, vocab_size, temperature, group)
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree in leading shape")
    lead = target.shape
    lp_N, ent_N = _LogProbEntropy.apply(
        logits.reshape(-1, local_v), target.reshape(-1).long(), vocab_start, vocab_size, float(temperature),
        with_entropy, group,
    )
    return lp_N.view(lead), (ent_N.view(lead) if with_entropy else None)


def vocab_parallel_full_kl(
    logits: Tensor, ref_logits: Tensor, *, vocab_size: int, temperature: float = 1.0, group=None
) -> Tensor:
    """Exact KL(softmax(logits / T) || softmax(ref_logits / T)) per token over the whole
    true vocabulary, from two vocabulary shards [..., V]; float32 [...], differentiable in
    ``logits`` only (the reference is a constant)."""
    group = tp_group() if group is None else group
    vocab_start, local_v = _check(logits, vocab_size, temperature, group)
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    lead = logits.shape[:-1]
    kl_N = _FullKL.apply(
        logits.reshape(-1, local_v), ref_logits.detach().reshape(-1, local_v), vocab_start, vocab_size,
        float(temperature), group,
    )
    return kl_N.view(lead)
