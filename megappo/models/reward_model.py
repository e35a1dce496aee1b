"""The reward model r_phi on Megatron-core: an HF ``*ForSequenceClassification`` (one label,
bias-free ``score`` head) with its own TP x PP, scoring each sequence at its last token.

Shape legend: B = sequences of this data-parallel rank, S = right-padded positions,
b = sequences of one micro-batch, P = preference pairs of this rank, p = pairs of one
micro-batch.

The model is the critic's build (``builder.build_model`` with the role ``critic``: the
backbone without an LM head and without tied embeddings) whose value head is replaced by
``ScoreHead`` (the value head without its bias, as transformers' ``score``); its role is
``reward``, which the weight mapping reads (``megappo.weights.reward``).

Where the score is read. transformers' ``*ForSequenceClassification`` pools the logit of
the last token that is not ``pad_token_id``; with right padding that is position
``len - 1``, which is where ``score`` reads it: lengths are explicit here, so a pad id that
also occurs inside the text (e.g. pad = eos) cannot move the read position.

``RewardModel.score``: forward only, micro-batches cut by the same token budget as the
policies' forward passes (``batch.microbatch_rows``), the [B] scores on every rank of the
model-parallel group. ``RewardModel.train_step`` (the reward-model trainer): pairs are
never split across micro-batches, since the Bradley-Terry loss couples a pair's two scores.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megappo.models.batch import microbatch_rows
from megappo.models.builder import BuildOptions, ValueHead, build_model_chunks
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
from megappo.parallel.model_groups import ModelGroups, deal_rows, model_groups, return_results
from megappo.parallel.state import get_layout

log = logging.getLogger("megappo")

PairLossFn = Callable[[Tensor, Tensor, Tensor], tuple]
"""``loss_fn(chosen_p, rejected_p, pair_rows_p) -> (loss, metrics)``: the micro-batch's share of
the batch loss (already divided by the global pair count) and its metrics."""


class ScoreHead(ValueHead):
    """transformers' ``score``: ``Linear(hidden, 1, bias=False)``, replicated on TP ranks.
    hidden [S, b, H] -> scores [S, b, 1]; called the way GPTModel calls its output layer."""

    def __init__(self, hidden_size: int, init_std: float, dtype: torch.dtype, sequence_parallel: bool = False):
        super().__init__(hidden_size, init_std, dtype, sequence_parallel)
        self.bias = None  # unregisters the value head's bias parameter


def build_reward_chunks(spec: ModelSpec, opts: BuildOptions, *, head_init_std: float = 0.0,
                        groups: Optional[ModelGroups] = None) -> list:
    """This rank's reward-model chunks (random weights; ``head_init_std``: N(0, std) score
    head, 0 gives zeros). Load an HF reward model with
    ``megappo.weights.reward.load_hf_into_reward_model``. ``groups``: its own layout
    (``megappo.parallel.model_groups``); None: the actor's."""
    chunks = build_model_chunks(spec, "critic", opts, groups=groups)
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer = ScoreHead(spec.hidden_size, head_init_std, opts.dtype, opts.sequence_parallel)
        chunk.megappo_role = "reward"
    return chunks


@dataclass(frozen=True)
class SequenceBatch:
    """Whole sequences to score: right-padded ids and their lengths."""

    input_ids_BS: Tensor
    lens_B: Tensor
    """Tokens of each row (>= 1); the score is read at ``lens_B - 1``."""

    def __post_init__(self):
        ids, lens = self.input_ids_BS, self.lens_B
        if ids.dim() != 2 or lens.shape != (ids.shape[0],):
            raise ValueError(f"input_ids_BS must be [B, S] and lens_B [B]; got {tuple(ids.shape)} and {tuple(lens.shape)}")
        if ids.is_floating_point() or lens.is_floating_point():
            raise ValueError("input_ids_BS and lens_B must be integer tensors")
        if ids.shape[0] and (int(lens.min()) < 1 or int(lens.max()) > ids.shape[1]):
            raise ValueError(f"lens_B must lie in [1, S={ids.shape[1]}]")

    @property
    def B(self) -> int:
        return self.input_ids_BS.shape[0]

    @classmethod
    def from_lists(cls, seqs: list[list[int]], pad_id: int = 0) -> "SequenceBatch":
        """Right-pad token lists into a batch."""
        width = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return cls(ids, torch.tensor([len(s) for s in seqs], dtype=torch.long))

    def select(self, rows: Tensor) -> "SequenceBatch":
        """Rows ``rows``, cut to their longest sequence."""
        lens = self.lens_B[rows]
        return SequenceBatch(self.input_ids_BS[rows, : int(lens.max())], lens)


@dataclass(frozen=True)
class PairBatch:
    """Preference pairs: row i of ``chosen`` is preferred to row i of ``rejected``."""

    chosen: SequenceBatch
    rejected: SequenceBatch

    def __post_init__(self):
        if self.chosen.B != self.rejected.B:
            raise ValueError(f"{self.chosen.B} chosen but {self.rejected.B} rejected sequences")

    @property
    def P(self) -> int:
        return self.chosen.B

    def joint(self, pairs: Tensor) -> SequenceBatch:
        """The pairs ``pairs`` as one batch: their chosen rows, then their rejected rows."""
        c, r = self.chosen.select(pairs), self.rejected.select(pairs)
        width = max(c.input_ids_BS.shape[1], r.input_ids_BS.shape[1])
        ids = torch.cat([F.pad(c.input_ids_BS, (0, width - c.input_ids_BS.shape[1])),
                         F.pad(r.input_ids_BS, (0, width - r.input_ids_BS.shape[1]))])
        return SequenceBatch(ids, torch.cat([c.lens_B, r.lens_B]))


class RewardModel:
    """This rank's reward model: frozen (``optim`` None; ``score`` only) or trainable.

    ``max_tokens_per_microbatch``: padded tokens of a micro-batch, as for the policies.
    ``offload_to_cpu`` (frozen only): weights on the CPU between uses (as the reference).
    ``opts.tp`` x ``opts.pp``: its layout; one other than the actor's (frozen only) gets its own
    process groups (``megappo.parallel.model_groups``), and ``score`` deals the rows of every
    data-parallel shard to its replicas and hands the scores back.
    """

    def __init__(
        self,
        spec: ModelSpec,
        opts: BuildOptions,
        optim: Optional[OptimizerSettings] = None,
        *,
        max_tokens_per_microbatch: int = 8192,
        offload_to_cpu: bool = False,
        head_init_std: float = 0.0,
    ):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.transformer.module import Float16Module
        from megatron.core.utils import get_model_config

        self.layout = get_layout()
        if opts.vpp is not None:
            raise ValueError("the reward model does not support virtual pipeline stages")
        if max_tokens_per_microbatch < 1:
            raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens_per_microbatch}")
        self.trainable = optim is not None
        if offload_to_cpu and self.trainable:
            raise ValueError("offload_to_cpu is only for a frozen reward model")
        if self.trainable and (opts.tp, opts.pp) != (self.layout.tp, self.layout.pp):
            raise ValueError(
                f"a trainable reward model runs at the initialized layout TP={self.layout.tp} PP={self.layout.pp}; "
                f"got TP={opts.tp} PP={opts.pp}"
            )
        self.groups = model_groups(opts.tp, opts.pp)
        self.spec, self.opts = spec, opts
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        self.device = self.layout.device
        self._offload = offload_to_cpu and self.device.type == "cuda"
        chunks = build_reward_chunks(spec, opts, head_init_std=head_init_std, groups=self.groups)
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
        else:
            for c in self._models:
                c.requires_grad_(False)
                c.eval()
        self.chunks = chunks
        self.offload()

    @property
    def models(self) -> list:
        """The unwrapped ``GPTModel`` chunks (for weights and checkpoints)."""
        return self._models

    def offload(self) -> None:
        if self._offload:
            for m in self._models:
                m.to("cpu")

    def onload(self) -> None:
        if self._offload:
            for m in self._models:
                m.to(self.device)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> Tensor:
        """float32 [B] scores of this rank's rows, on every rank that passed the same rows (the
        ranks of one actor data-parallel shard). At the actor's layout each shard's model-parallel
        group scores its own rows; at another layout the rows of all shards are dealt to the
        reward model's replicas and the scores handed back (collective over all ranks). A
        non-finite score is a ``ValueError`` naming the rows (never passed on as a reward)."""
        if batch.B == 0:
            raise ValueError("empty batch: nothing to score")
        self._set_train(False)
        self.onload()
        try:
            if self.groups.shares_actor_layout:
                scores = self._score_here(batch)
                full = {"scores_B": scores} if scores is not None else None
                scores_B = collectives.broadcast_from_last_stage(full, {"scores_B": (batch.B,)}, device=self.device)["scores_B"]
            else:
                ids_BS, lens_B = batch.input_ids_BS.cpu(), batch.lens_B.cpu()
                part, share = deal_rows([ids_BS[i, : int(lens_B[i])].tolist() for i in range(batch.B)], self.groups)
                scores = self._score_here(SequenceBatch.from_lists(part)) if part else None
                scores_B = return_results(scores, share, self.groups).to(self.device)
        finally:
            self.offload()
            self._set_train(True)
        bad = (~torch.isfinite(scores_B)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward model produced non-finite scores for rows {bad[:10]} of {batch.B}")
        return scores_B

    def _score_here(self, batch: SequenceBatch) -> Optional[Tensor]:
        """Forward ``batch`` through this replica of the reward model (collective over its
        model-parallel group); float32 [B] scores on its last stage, None elsewhere."""
        groups = microbatch_rows(batch.lens_B.cpu(), self.max_tokens_per_microbatch, min_microbatches=self.groups.pp)
        store = self._schedule([(rows, batch.select(rows)) for rows in groups], self._forward_step_score, forward_only=True)
        if not self.groups.is_last_stage:
            return None
        scores_B = torch.zeros(batch.B, device=self.device)
        for out in store:
            scores_B[out["rows"].to(self.device)] = out["scores_b"].float()
        return scores_B

    def _forward_step_score(self, data_iterator, model):
        rows, mb = next(data_iterator)
        scores_b = self._run(model, mb)
        return scores_b, lambda out: (out.new_zeros((), dtype=torch.float32), {"rows": rows, "scores_b": out.detach()})

    def _run(self, model, mb: SequenceBatch):
        """Forward one micro-batch; on the last stage its [b] scores at ``lens - 1``, else the
        stage's output tensor (the pipeline schedule passes it on)."""
        ids = mb.input_ids_BS.to(self.device)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        out = model(ids, pos, None)
        if not _is_last_chunk(model):
            return out
        last_b = (mb.lens_B.to(self.device) - 1).clamp(min=0)
        return out[torch.arange(ids.shape[0], device=ids.device), last_b, 0]

    # ------------------------------------------------------------------ training

    def train_step(self, pairs: PairBatch, loss_fn: PairLossFn, *, min_microbatches: Optional[int] = None) -> dict[str, float]:
        """One optimizer step on this rank's pairs. Returns, on every rank, the metrics of
        ``loss_fn`` reduced over micro-batches and DP ranks (``collectives.reduce_metrics``
        weighted by ``num_pairs_local``; ``*loss`` summed), ``grad_norm``, ``lr`` and
        ``num_microbatches``."""
        if not self.trainable:
            raise ValueError("this reward model is frozen (built without OptimizerSettings)")
        if pairs.P == 0:
            raise ValueError("empty batch: this data-parallel rank has no preference pairs")
        pair_lens = torch.maximum(pairs.chosen.lens_B, pairs.rejected.lens_B).cpu()
        # A pair is two rows of the longer length: half the token budget per row.
        groups = microbatch_rows(pair_lens, max(1, self.max_tokens_per_microbatch // 2),
                                 min_microbatches=min_microbatches or self.layout.pp)
        mbs = [(rows, pairs.joint(rows)) for rows in groups]
        scale = loss_scale_factor(len(mbs), self.layout.dp)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        step = functools.partial(self._forward_step_train, loss_fn, scale)
        store = self._schedule(mbs, step, forward_only=False)
        metrics = collectives.reduce_metrics(store, weight_key="num_pairs_local") if self.layout.is_last_stage else None
        metrics = collectives.broadcast_object_from_last_stage(metrics)
        metrics["num_microbatches"] = len(mbs)
        self.scheduler.step(increment=1)
        metrics["lr"] = current_lr(self.optimizer)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            log.warning("reward model: optimizer step skipped (non-finite gradients)")
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return metrics

    def _forward_step_train(self, loss_fn: PairLossFn, scale: float, data_iterator, model):
        rows, mb = next(data_iterator)
        out = self._run(model, mb)
        return out, functools.partial(self._pair_loss, loss_fn, scale, rows)

    @staticmethod
    def _pair_loss(loss_fn: PairLossFn, scale: float, rows: Tensor, scores_b: Tensor):
        p = rows.numel()
        loss, metrics = loss_fn(scores_b[:p].float(), scores_b[p:].float(), rows)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a 0-dim loss, got shape {tuple(loss.shape)}")
        return loss * scale, {"loss": loss.detach(), "num_pairs_local": float(p), **metrics}

    # ------------------------------------------------------------------ internals

    def _set_train(self, mode: bool) -> None:
        for c in self.chunks:
            c.train(mode and self.trainable)

    def _schedule(self, mbs: list, step, *, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        pgs = {}
        if not self.groups.shares_actor_layout:  # the reward model's own pipeline, not parallel_state's
            pgs = dict(pg_collection=self.groups.pg_collection,
                       p2p_communicator=P2PCommunicator(pp_group=self.groups.pg_collection.pp, config=self._models[0].config))
        return get_forward_backward_func(pp_size=self.groups.pp, vp_size=None)(
            forward_step_func=step,
            data_iterator=iter(mbs),
            model=self.chunks,
            num_microbatches=len(mbs),
            seq_length=max(mb.input_ids_BS.shape[1] for _, mb in mbs),
            micro_batch_size=max(mb.B for _, mb in mbs),
            forward_only=forward_only,
            **pgs,
        )


def _is_last_chunk(model) -> bool:
    while not hasattr(model, "post_process") and hasattr(model, "module"):
        model = model.module
    return bool(model.post_process)
