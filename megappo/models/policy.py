"""``MegatronPolicy``: one class for the actor, the critic and the frozen reference.

Shape legend: B = sequences of this data-parallel rank, S = positions, T = response
positions (``TokenBatch.T``), b = sequences of one micro-batch, V = vocabulary shard.

It holds this rank's model chunks (one, or ``vpp`` with interleaved pipelining) and runs
them through Megatron's pipeline schedules (``get_forward_backward_func``) over
micro-batches cut by a token budget (``megappo.models.batch``), right-padded or, with
``packed_sequences``, packed into one row each (``megappo.models.model_inputs``; the
[B, T] results are the same either way):
  - ``forward_logprobs`` / ``forward_values``: forward only, no grad; the [B, T] results
    are broadcast from the last pipeline stage, so every rank of the model-parallel group
    has them (TP ranks already agree).
  - ``train_step``: zero grads, forward/backward of ``loss_fn`` over all micro-batches,
    DP gradient reduction (Megatron DDP), optimizer and LR-scheduler step.

The trainer's loss function:
    loss_fn(outputs: dict[str, Tensor [b, T]], mb_index: LongTensor [b]) -> (loss, metrics)
``outputs`` holds ``logprobs_BT`` and ``entropy_BT`` (actor; ``kl_BT`` too when a
reference is passed) or ``values_BT`` (critic), zero on padding; ``mb_index`` are the rows
of the batch in this micro-batch, so the trainer indexes its own [B, T] tensors with it.
``entropy_BT`` is differentiable only with ``entropy_grad=True`` (an entropy bonus in the
loss); otherwise it is a detached metric, so the backward never builds the
[tokens x vocab-shard] entropy gradient (gigabytes of fp32 at 16k tokens).
``loss`` must already be divided by the *global* token / sequence counts: the batch loss
is the sum of ``loss`` over all micro-batches and DP ranks. The factor Megatron needs on
top is applied in one place (``optimizer.loss_scale_factor``).

Full-vocabulary KL (``kl_penalty: full``): pass ``ref=`` another ``MegatronPolicy``
(role reference, same layout); per micro-batch both models run and the exact
KL(actor || reference) per token is computed from the two sharded logits. Needs
pipeline size 1 (the two models' stages would have to run in lockstep); with PP > 1
it is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megappo.models.batch import TokenBatch, microbatch_rows
from megappo.models.builder import BuildOptions, Role, build_model_chunks
from megappo.models.model_inputs import ModelInputs, check_packing, model_inputs, packing_mode, pad_multiple
from megappo.models.routing import RoutingReplay
from megappo.models.optimizer import (
    OptimizerSettings,
    build_optimizer,
    build_scheduler,
    current_lr,
    loss_scale_factor,
    wrap_ddp,
)
from megappo.models.spec import ModelSpec
from megappo.parallel import collectives
from megappo.parallel.state import get_layout
from megappo.parallel.vocab_parallel import vocab_parallel_full_kl, vocab_parallel_logprobs

log = logging.getLogger("megappo")

LossFn = Callable[[dict, Tensor], tuple]


@dataclass(frozen=True)
class _MicroBatch:
    rows: Tensor
    """Rows of the rank's batch in this micro-batch (CPU LongTensor)."""
    batch: TokenBatch
    """Those rows, cut to their longest sequence, on the device."""
    inputs: ModelInputs


@dataclass
class _Pass:
    """What one schedule run computes (shared by forward-only and training passes)."""

    T: int
    temperature: float = 1.0
    with_entropy: bool = False
    entropy_grad: bool = False
    """Keep ``entropy_BT`` in the autograd graph (an entropy bonus); else it is detached."""
    ref: Optional["MegatronPolicy"] = None
    loss_fn: Optional[LossFn] = None
    scale: float = 1.0
    routing: Optional[str] = None
    """MoE routing replay: ``record`` (the actor's forward-only passes), ``replay`` (training)."""


class MegatronPolicy:
    """An actor, critic or reference model of this rank, with its optimizer if trainable.

    ``spec`` and ``opts`` describe the model (``builder.BuildOptions``); ``optim`` is
    required for the trainable roles (actor, critic) and ignored for the reference.
    ``max_tokens_per_microbatch`` is the token budget of a micro-batch: padded tokens, or
    real tokens with ``packed_sequences`` (padding removed; ``megappo.models.model_inputs``).
    ``offload_to_cpu`` (reference only) keeps the weights on the CPU between uses; on a
    CPU device it changes nothing.
    """

    def __init__(
        self,
        spec: ModelSpec,
        role: Role,
        opts: BuildOptions,
        optim: Optional[OptimizerSettings] = None,
        *,
        max_tokens_per_microbatch: int = 8192,
        offload_to_cpu: bool = False,
        packed_sequences: bool = False,
    ):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.transformer.module import Float16Module
        from megatron.core.utils import get_model_config

        self.packing = packing_mode(packed_sequences, opts.transformer_impl)
        check_packing(self.packing, spec.sliding_window)
        self._pad_multiple = pad_multiple(opts.tp, opts.sequence_parallel, opts.fp8_recipe if opts.fp8_format else None)
        if max_tokens_per_microbatch < 1:
            raise ValueError(f"train.max_tokens_per_microbatch must be >= 1, got {max_tokens_per_microbatch}")
        self.layout = get_layout()
        if (opts.tp, opts.pp, opts.vpp) != (self.layout.tp, self.layout.pp, self.layout.vpp):
            raise ValueError(
                f"BuildOptions TP={opts.tp} PP={opts.pp} VPP={opts.vpp} differ from the initialized layout "
                f"TP={self.layout.tp} PP={self.layout.pp} VPP={self.layout.vpp}"
            )
        self.spec, self.role, self.opts = spec, role, opts
        self.trainable = role != "reference"
        if self.trainable and optim is None:
            raise ValueError(f"role {role} is trainable and needs OptimizerSettings")
        if offload_to_cpu and self.trainable:
            raise ValueError("offload_to_cpu is only for the frozen reference model")
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        self.device = self.layout.device
        self._offload = offload_to_cpu and self.device.type == "cuda"

        chunks = build_model_chunks(spec, role, opts)
        if self.device.type == "cuda":
            chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
        self._models = list(chunks)
        if opts.dtype == torch.bfloat16:
            chunks = [Float16Module(c.config, c) for c in chunks]
        self.optimizer = self.scheduler = None
        if self.trainable:
            chunks = wrap_ddp(chunks, self._models[0].config, optim)
            self.optimizer = build_optimizer(chunks, optim, opts.dtype)
            self.scheduler = build_scheduler(self.optimizer, optim)
            config = get_model_config(chunks[0])
            config.finalize_model_grads_func = finalize_model_grads
            config.grad_scale_func = self.optimizer.scale_loss
            if optim.overlap_grad_reduce:
                sync = [c.no_sync for c in chunks]
                config.no_sync_func = sync[0] if len(sync) == 1 else sync
        self.chunks = chunks
        self.routing = (RoutingReplay(self._models, opts.routing_replay, opts.routing_replay_source, spec.moe_layers)
                        if spec.is_moe and role == "actor" else None)
        if opts.routing_replay and self.routing is not None and self.packing != "padded":
            raise ValueError("algo.routing_replay needs train.packed_sequences=false (replay follows right-padded rows)")
        # (PP, micro-batches per virtual-stage group) of the interleaved schedule, whose count rule
        # the micro-batch split must meet (batch.interleaved_schedule_accepts).
        self._interleave = None
        if opts.vpp is not None:
            self._interleave = (opts.pp, get_model_config(chunks[0]).microbatch_group_size_per_vp_stage)
        if self._offload:
            self.offload()

    # ------------------------------------------------------------------ accessors

    @property
    def models(self) -> list:
        """The unwrapped ``GPTModel`` chunks of this rank (for weights and checkpoints)."""
        return self._models

    def model_sharded_state_dict(self, prefix: str = "") -> dict:
        """``{"model": ...}`` (or ``model0``, ``model1``, ... with virtual pipelining) of
        the chunks' ``sharded_state_dict``, as Megatron-LM lays out its checkpoints."""
        if len(self._models) == 1:
            return {"model": self._models[0].sharded_state_dict(prefix=prefix)}
        return {f"model{i}": m.sharded_state_dict(prefix=prefix) for i, m in enumerate(self._models)}

    def offload(self) -> None:
        """Move the reference's weights to the CPU (no-op on CPU devices)."""
        if self._offload:
            for m in self._models:
                m.to("cpu")

    def onload(self) -> None:
        if self._offload:
            for m in self._models:
                m.to(self.device)

    # ------------------------------------------------------------------ forward only

    @torch.no_grad()
    def forward_logprobs(
        self,
        batch: TokenBatch,
        *,
        temperature: float,
        with_entropy: bool = False,
        ref: Optional["MegatronPolicy"] = None,
        min_microbatches: Optional[int] = None,
    ) -> dict[str, Tensor]:
        """``logprobs_BT`` (and ``entropy_BT``; ``kl_BT`` = exact KL to ``ref``) of the
        response tokens at ``temperature``, float32 [B, T] on this device, zero on padding,
        on every rank of the model-parallel group."""
        if self.role == "critic":
            raise ValueError("forward_logprobs needs an actor or reference model, not the critic")
        ctx = _Pass(T=batch.T, temperature=temperature, with_entropy=with_entropy, ref=self._check_ref(ref), routing="record")
        if self.routing is not None:
            self.routing.check_batch(batch.routed_experts_BSLK)
        names = ["logprobs_BT"] + (["entropy_BT"] if with_entropy else []) + (["kl_BT"] if ref is not None else [])
        return self._forward(batch, ctx, names, min_microbatches)

    @torch.no_grad()
    def forward_values(self, batch: TokenBatch, *, min_microbatches: Optional[int] = None) -> Tensor:
        """``values_BT``: the critic's value before each response token, float32 [B, T]."""
        if self.role != "critic":
            raise ValueError(f"forward_values needs the critic, this is the {self.role}")
        return self._forward(batch, _Pass(T=batch.T), ["values_BT"], min_microbatches)["values_BT"]

    def _forward(self, batch, ctx, names, min_mb) -> dict[str, Tensor]:
        mbs = self._microbatches(batch, min_mb)
        self._set_train(False)
        self.onload()
        if ctx.ref is not None:
            ctx.ref.onload()
        try:
            with self._routing(ctx.routing):
                store = self._schedule(mbs, ctx, forward_only=True)
        finally:
            self.offload()
            if ctx.ref is not None:
                ctx.ref.offload()
            self._set_train(True)
        shapes = {n: (batch.B, batch.T) for n in names}
        full = None
        if self.layout.is_last_stage:
            full = {n: torch.zeros(batch.B, batch.T, device=self.device) for n in names}
            for out in store:
                rows = out["rows"].to(self.device)
                for n in names:
                    full[n][rows] = out[n].float()
        return collectives.broadcast_from_last_stage(full, shapes, device=self.device)

    # ------------------------------------------------------------------ training

    def train_step(
        self,
        batch: TokenBatch,
        loss_fn: LossFn,
        *,
        temperature: float = 1.0,
        num_microbatches_hint: Optional[int] = None,
        ref: Optional["MegatronPolicy"] = None,
        entropy_grad: bool = True,
    ) -> dict[str, float]:
        """One optimizer step on ``batch`` (``forward_backward`` then ``optimizer_step``).
        ``entropy_grad``: whether ``loss_fn`` back-propagates through ``entropy_BT``; pass
        ``algo.entropy_coef != 0`` (False leaves it a detached metric: see the module doc).

        Returns, on every rank: ``loss`` (the batch loss: sum over micro-batches and DP
        ranks), ``grad_norm`` (before clipping), ``lr`` (used by this step),
        ``num_microbatches`` (this rank's), and the ``loss_fn`` metrics reduced over
        micro-batches and DP ranks by ``collectives.reduce_metrics``: ``num_tokens_local``
        and ``*loss`` keys summed (the global count; shares of the batch loss add up),
        ``*_min`` / ``*_max`` by min / max, every other key averaged, weighted by the
        micro-batch's ``num_tokens_local`` when the metrics carry it (a global token
        mean), else with equal weights.
        """
        metrics = self.forward_backward(
            batch, loss_fn, temperature=temperature, num_microbatches_hint=num_microbatches_hint, ref=ref,
            entropy_grad=entropy_grad,
        )
        metrics.update(self.optimizer_step())
        return metrics

    def forward_backward(
        self,
        batch: TokenBatch,
        loss_fn: LossFn,
        *,
        temperature: float = 1.0,
        num_microbatches_hint: Optional[int] = None,
        ref: Optional["MegatronPolicy"] = None,
        entropy_grad: bool = True,
    ) -> dict[str, float]:
        """Zero the gradients, then accumulate d(batch loss)/d(params) over all
        micro-batches, reduced over DP ranks (``param.main_grad``); no optimizer step.
        ``num_microbatches_hint`` is a minimum number of micro-batches (default: the
        pipeline size, so stages overlap)."""
        if not self.trainable:
            raise ValueError("the reference model is frozen: it has no train_step")
        mbs = self._microbatches(batch, num_microbatches_hint)
        ctx = _Pass(
            T=batch.T,
            temperature=temperature,
            with_entropy=self.role == "actor",
            entropy_grad=entropy_grad,
            ref=self._check_ref(ref),
            loss_fn=loss_fn,
            scale=loss_scale_factor(len(mbs), self.layout.dp),
            routing="replay",
        )
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if ref is not None:
            ref.onload()
        try:
            with self._routing(ctx.routing):
                store = self._schedule(mbs, ctx, forward_only=False)
        finally:
            if ref is not None:
                ref.offload()
        metrics = collectives.reduce_metrics(store) if self.layout.is_last_stage else None
        metrics = collectives.broadcast_object_from_last_stage(metrics)
        metrics["num_microbatches"] = len(mbs)
        metrics.update(self.routing.metrics(len(mbs)) if self.routing is not None else {})
        return metrics

    def optimizer_step(self) -> dict[str, float]:
        """Advance the LR schedule to this step, then clip and apply the gradients."""
        self.scheduler.step(increment=1)
        lr = current_lr(self.optimizer)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            log.warning("%s: optimizer step skipped (non-finite gradients)", self.role)
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr}

    # ------------------------------------------------------------------ internals

    def _check_ref(self, ref: Optional["MegatronPolicy"]) -> Optional["MegatronPolicy"]:
        if ref is None:
            return None
        if self.role == "critic" or ref.role == "critic":
            raise ValueError("full KL needs an actor and a reference model, not the critic")
        if self.layout.pp > 1:
            raise ValueError(
                "algo.kl_penalty=full (exact KL over the vocabulary) needs pipeline_model_parallel_size=1; "
                "use kl, low_var_kl, mse or abs with pipeline parallelism"
            )
        if ref.spec.padded_vocab_size(ref.opts.tp) != self.spec.padded_vocab_size(self.opts.tp):
            raise ValueError("actor and reference vocabularies differ")
        return ref

    def _routing(self, mode: Optional[str]):
        return self.routing.pass_(mode) if self.routing is not None else contextlib.nullcontext()

    def _set_train(self, mode: bool) -> None:
        for c in self.chunks:
            c.train(mode and self.trainable)

    def _microbatches(self, batch: TokenBatch, min_mb: Optional[int]) -> list[_MicroBatch]:
        if batch.B == 0:
            raise ValueError("empty batch: this data-parallel rank has no sequences")
        groups = microbatch_rows(
            batch.seq_lens_B.cpu(),
            self.max_tokens_per_microbatch,
            min_microbatches=min_mb or self.layout.pp,
            packed=self.packing != "padded",
            interleave=self._interleave,
        )
        mbs = []
        for rows in groups:
            mb = batch.select(rows).to(self.device)
            mbs.append(_MicroBatch(rows, mb, model_inputs(mb, self.packing, self._pad_multiple)))
        return mbs

    def _schedule(self, mbs: list, ctx: _Pass, *, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        data = iter(mbs) if len(self.chunks) == 1 else [iter(mbs) for _ in self.chunks]
        return get_forward_backward_func()(
            forward_step_func=functools.partial(self._forward_step, ctx),
            data_iterator=data,
            model=self.chunks,
            num_microbatches=len(mbs),
            # Shapes vary per micro-batch: variable_seq_lengths makes the p2p exchange them.
            seq_length=max(m.inputs.seq_length for m in mbs),
            micro_batch_size=max(m.inputs.micro_batch_size for m in mbs),
            forward_only=forward_only,
        )

    def _forward_step(self, ctx: _Pass, data_iterator, model):
        mbatch = next(data_iterator)
        args, kwargs = mbatch.inputs.forward_args()
        lens_b = mbatch.batch.prompt_lens_B + mbatch.batch.response_lens_B
        if self.routing is not None:
            self.routing.before(model, args[0], lens_b, mbatch.batch.routed_experts_BSLK)
        out = model(*args, **kwargs)
        if self.routing is not None:
            self.routing.after(model, args[0], lens_b)
        ref_logits = None
        if ctx.ref is not None:
            with torch.no_grad():
                ref_logits = ctx.ref.chunks[0](*args, **kwargs)
        return out, functools.partial(self._loss_func, ctx, mbatch, ref_logits)

    def _loss_func(self, ctx: _Pass, mbatch: _MicroBatch, ref_logits, output: Tensor):
        rows = mbatch.rows
        outputs = self._token_outputs(output, mbatch, ctx, ref_logits)
        if ctx.loss_fn is None:
            detached = {k: v.detach() for k, v in outputs.items()}
            return output.new_zeros((), dtype=torch.float32), {"rows": rows, **detached}
        loss, metrics = ctx.loss_fn(outputs, rows)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a 0-dim loss, got shape {tuple(loss.shape)}")
        return loss * ctx.scale, {"loss": loss.detach(), **metrics}

    def _token_outputs(self, output: Tensor, mbatch: _MicroBatch, ctx: _Pass, ref_logits) -> dict[str, Tensor]:
        """[b, S, V] or packed [1, N, V] logits (or values, V = 1) -> [b, T] per-token
        outputs, padded to ctx.T."""
        mb, at_response = mbatch.batch, mbatch.inputs.gather
        valid_bT = mb.response_mask_BT.bool()
        pad = (0, ctx.T - mb.T)

        def finish(x_bT: Tensor) -> Tensor:
            return F.pad(torch.where(valid_bT, x_bT, torch.zeros_like(x_bT)), pad)

        if self.role == "critic":
            return {"values_BT": finish(at_response(output).squeeze(-1).float())}

        logits_bTV = at_response(output)
        lp_bT, ent_bT = vocab_parallel_logprobs(
            logits_bTV,
            mb.response_ids_BT,
            vocab_size=self.spec.vocab_size,
            temperature=ctx.temperature,
            with_entropy=ctx.with_entropy,
        )
        out = {"logprobs_BT": finish(lp_bT)}
        if ent_bT is not None:
            # Detached, the entropy output of the log-prob node gets no gradient (None), so
            # its backward skips the [b*T, V] entropy term; the forward value is the same.
            out["entropy_BT"] = finish(ent_bT if ctx.entropy_grad else ent_bT.detach())
        if ref_logits is not None:
            kl_bT = vocab_parallel_full_kl(
                logits_bTV, at_response(ref_logits), vocab_size=self.spec.vocab_size, temperature=ctx.temperature
            )
            out["kl_BT"] = finish(kl_bT)
        return out
