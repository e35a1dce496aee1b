"""Start-up self-check of the loss-scaling contract with Megatron (``optimizer.loss_scale_factor``).

Our ``loss_fn`` returns each micro-batch's share of the *global* batch loss, and
``loss_scale_factor`` undoes what megatron-core 0.16 does to it: the schedule divides every
micro-batch loss by the number of micro-batches, and DDP scales gradients by 1 / DP before
the all-reduce. Both are internals: megatron-core above 0.16.1 is allowed on Python 3.12,
and a release that changes either (e.g. a per-token-loss default) would scale every gradient
by the micro-batch count or the DP size without any error. This check catches that before
the first step:

  1. The same small batch (identical on every data-parallel rank) is run through
     ``forward_backward`` with M and with 2M micro-batches (M: the smallest count the
     pipeline schedule accepts). With correct scaling the gradients agree to rounding; a
     per-micro-batch scaling error shows as a factor of 2.
  2. With one pipeline stage, the gradient is also compared with plain autograd on this
     rank's unwrapped model (no schedule, no DDP). The batch is the same on every DP rank
     and its loss is the mean over DP ranks of identical losses, so the reduced gradient
     must equal the local one: a missing or doubled 1/DP shows as a factor of DP. Skipped
     (``rel_diff_autograd`` None) where a rank's ``main_grad`` is not the whole reduced
     gradient: sequence parallelism (layer-norm gradients are all-reduced by
     ``finalize_model_grads``, not autograd) and the distributed optimizer at DP > 1 (a
     reduce-scatter leaves each rank only its shard). At TP > 1 the parameters whose
     gradients ``finalize_model_grads`` all-reduces over TP (QK-norm weights, those marked
     ``average_gradients_across_tp_domain``) are left out of this comparison: autograd on
     one rank sees only its heads' share of them.

The loss is a weighted token sum of log-probs (or values for the critic) with fixed random
weights, divided by the token count and the DP size as ``algo.aggregate_loss`` would.
Everything a check touches is restored: the gradient buffers are zeroed, the RNG states
(CPU and CUDA) put back, no optimizer or scheduler step is taken.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from megappo.models.batch import TokenBatch, microbatch_rows
from megappo.models.model_inputs import model_inputs
from megappo.models.policy import _MicroBatch, _Pass
from megappo.parallel.collectives import all_reduce

if TYPE_CHECKING:
    from megappo.models.policy import MegatronPolicy

log = logging.getLogger("megappo")


class LossScalingError(RuntimeError):
    """Megatron scales the loss differently from what ``loss_scale_factor`` assumes."""


@dataclass(frozen=True)
class LossScalingReport:
    """Relative gradient differences ``|g_a - g_b| / |g_b|`` (global 2-norms over this
    rank's parameters, all ranks agreeing after a max-reduce)."""

    microbatch_counts: tuple[int, int]
    rel_diff_microbatches: float
    """M vs 2M micro-batches."""
    rel_diff_autograd: Optional[float]
    """Megatron (2M micro-batches, DDP-reduced) vs plain autograd; None where skipped (module doc)."""
    grad_norm: float
    tolerance: float


def default_tolerance(dtype: torch.dtype) -> float:
    """Rounding-level agreement: a scaling error is a factor of >= 2 (a relative difference
    of >= 0.5), so the check is far from flaky at either precision."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def probe_batch(vocab_size: int, rows: int, *, prompt: int = 3, response: int = 5, seed: int = 1234) -> TokenBatch:
    """A fixed random batch (CPU; the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, prompt + response), generator=g)
    # Different response lengths, so that padding and masking are exercised too.
    resp = torch.tensor([response - (i % 3) for i in range(rows)])
    return TokenBatch(ids, torch.full((rows,), prompt), resp)


def check_loss_scaling(policy: "MegatronPolicy", *, tolerance: Optional[float] = None, raise_on_error: bool = True) -> LossScalingReport:
    """Run the check on a trainable ``policy`` (actor or critic), collectively on every rank
    of the run, before its first ``train_step``; raises ``LossScalingError`` (or only logs
    it with ``raise_on_error=False``) when a gradient differs beyond ``tolerance``."""
    if not policy.trainable:
        raise ValueError("check_loss_scaling needs a trainable policy (actor or critic)")
    tol = default_tolerance(policy.opts.dtype) if tolerance is None else tolerance
    layout = policy.layout
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if policy.device.type == "cuda" else None
    # A mixture-of-experts model's router losses are statistics of each micro-batch's tokens,
    # so they change with the split by design: the check runs without them.
    configs = {id(m.config): m.config for c in policy.chunks for m in c.modules() if getattr(m, "config", None) is not None
               and getattr(m.config, "num_moe_experts", None)}
    saved = {k: (c.moe_aux_loss_coeff, c.moe_z_loss_coeff) for k, c in configs.items()}
    try:
        for c in configs.values():
            c.moe_aux_loss_coeff, c.moe_z_loss_coeff = 0.0, None
        report = _run(policy, layout, tol)
    finally:
        for k, c in configs.items():
            c.moe_aux_loss_coeff, c.moe_z_loss_coeff = saved[k]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        for chunk in policy.chunks:
            chunk.zero_grad_buffer()
        policy.optimizer.zero_grad()
    worst = max(report.rel_diff_microbatches, report.rel_diff_autograd or 0.0)
    msg = (
        f"loss-scaling self-check ({policy.role}): micro-batches {report.microbatch_counts[0]} vs "
        f"{report.microbatch_counts[1]} differ by {report.rel_diff_microbatches:.2e}"
        + (f", Megatron vs autograd by {report.rel_diff_autograd:.2e}" if report.rel_diff_autograd is not None else "")
        + f" (relative; tolerance {tol:g})"
    )
    if not math.isfinite(worst) or worst > tol:
        text = (
            msg + ": this megatron-core scales micro-batch losses or DP gradients differently from what "
            "megappo.models.optimizer.loss_scale_factor assumes (written against 0.16.1); pin megatron-core==0.16.1"
        )
        if raise_on_error:
            raise LossScalingError(text)
        log.error(text)
    else:
        log.info(msg)
    return report


def _run(policy: "MegatronPolicy", layout, tol: float) -> LossScalingReport:

    pp = layout.pp
    first = max(pp, 1)
    counts = []
    # Enough rows for 2M micro-batches under any count rule (interleaving raises M to a multiple of PP).
    rows = 4 * first
    batch = probe_batch(policy.spec.vocab_size, rows)
    for hint in (first, 2 * first):
        got = microbatch_rows(batch.seq_lens_B, policy.max_tokens_per_microbatch, min_microbatches=hint,
                              packed=policy.packing != "padded", interleave=policy._interleave)
        counts.append(len(got))
    if counts[0] == counts[1]:
        raise ValueError(
            f"loss-scaling self-check: train.max_tokens_per_microbatch={policy.max_tokens_per_microbatch} "
            f"splits the probe batch ({rows} rows of {batch.S} tokens) into {counts[0]} micro-batches either way"
        )
    weights_BT = torch.randn(batch.B, batch.T, generator=torch.Generator().manual_seed(4321))
    mask_BT = batch.response_mask_BT
    num_tokens = float(mask_BT.sum())
    dp = layout.dp
    key = "values_BT" if policy.role == "critic" else "logprobs_BT"

    def loss_fn(outputs, mb_rows):
        x_bT = outputs[key]
        w_bT = (weights_BT * mask_BT)[mb_rows.cpu()].to(x_bT.device)
        return (x_bT * w_bT).sum() / (num_tokens * dp), {}

    grads = []
    for hint in (first, 2 * first):
        policy.forward_backward(batch, loss_fn, num_microbatches_hint=hint, entropy_grad=False)
        grads.append(_flat_main_grads(policy, _trained(policy)))
    ref_grad = None
    ddp_config = getattr(policy.chunks[0], "ddp_config", None)
    sharded = dp > 1 and bool(getattr(ddp_config, "use_distributed_optimizer", False))
    if pp == 1 and len(policy.models) == 1 and not policy.opts.sequence_parallel and not sharded and layout.ep == 1:
        # The batch loss is the mean over DP ranks of identical local losses: the local loss.
        # (Not with EP: a rank's experts take tokens of every rank of its EP group.)
        ref_grad = _autograd_grads(policy, batch, weights_BT * mask_BT, num_tokens, key)
    reduce = _max_over_world
    norm = reduce(float(grads[1].norm()))
    if norm == 0.0:
        raise LossScalingError(f"loss-scaling self-check ({policy.role}): the probe gradient is zero")
    rel_mb = reduce(float((grads[0] - grads[1]).norm()) / norm)
    rel_ag = None
    if ref_grad is not None:
        local = _flat_main_grads(policy, _local_to_tp_rank(policy))  # the 2M run's
        rel_ag = reduce(float((local - ref_grad).norm()) / max(float(ref_grad.norm()), 1e-30))
    return LossScalingReport((counts[0], counts[1]), rel_mb, rel_ag, norm, tol)


def _trained(policy: "MegatronPolicy") -> list:
    return [p for m in policy.models for p in m.parameters() if p.requires_grad]


def _local_to_tp_rank(policy: "MegatronPolicy") -> list:
    """Trained parameters whose gradient autograd on one rank gets whole (see the module doc)."""
    if policy.layout.tp == 1:
        return _trained(policy)
    qk_norm = bool(getattr(policy.models[0].config, "qk_layernorm", False))
    return [
        p for m in policy.models for name, p in m.named_parameters()
        if p.requires_grad and not getattr(p, "average_gradients_across_tp_domain", False)
        and not (qk_norm and ("q_layernorm" in name or "k_layernorm" in name))
    ]


def _flat_main_grads(policy: "MegatronPolicy", params: list) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().float().reshape(-1).cpu() for p in params]).double()


def _autograd_grads(policy: "MegatronPolicy", batch: TokenBatch, w_BT: torch.Tensor, denom: float, key: str) -> torch.Tensor:
    """The local gradient by plain autograd on the unwrapped model: one micro-batch, no
    schedule, no DDP (``torch.autograd.grad`` leaves ``main_grad`` untouched)."""

    model = policy.models[0]
    params = _local_to_tp_rank(policy)
    mb = batch.to(policy.device)
    inputs = model_inputs(mb, policy.packing, policy._pad_multiple)
    args, kwargs = inputs.forward_args()
    mbatch = _MicroBatch(torch.arange(batch.B), mb, inputs)
    out = model(*args, **kwargs)
    outputs = policy._token_outputs(out, mbatch, _Pass(T=batch.T), None)
    loss = (outputs[key] * w_BT.to(out.device)).sum() / denom
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1).cpu() for g, p in zip(got, params)]).double()


def _max_over_world(x: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x

    return float(all_reduce(torch.tensor([x], dtype=torch.float64), "max", dist.group.WORLD).item())
