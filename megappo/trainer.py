"""The RL loop. ``Trainer.step`` reads as the algorithm; each phase is one call on a
named component, and no phase branches on the algorithm or the parallel layout.

    prompts -> engine.generate -> reward -> old / ref log-probs, values -> advantages
            -> critic update -> actor update -> weight sync -> metrics, checkpoint

Every rank runs this same program (SPMD under torchrun). See ``megappo/loop/`` for the
parts it calls (rollout side, policies, train state) and ``megappo/objective.py`` for the losses.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from megappo.checkpoint_dir import prune_hf_exports
from megappo.config import Config
from megappo.loop.build import Run, build_run
from megappo.loop.rollout_metrics import rollout_metrics
from megappo.metrics import Timer
from megappo.models import MegatronPolicy
from megappo.models.loss_check import check_loss_scaling
from megappo.parallel.collectives import all_reduce, dp_all_reduce
from megappo.rollout.batch import RolloutBatch
from megappo.rollout.reward_model import combine_rewards
from megappo.run_dir import lock_run_dir
from megappo.weights import save_hf

log = logging.getLogger("megappo")

PREEMPT_EXIT_CODE = 124
"""Exit status after a preemption signal (SIGUSR1 / SIGTERM) was handled: the run saved a
checkpoint at the end of the current step and stopped; a requeued job resumes from it."""


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        # First, so a preemption signal during start-up is not lost: the run then stops
        # before its first step (the checkpoint it resumed from is still the latest).
        self._preempted = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_preempt)
        self.run: Run = build_run(cfg)
        self.policies, self.rollout, self.objective, self.state = (
            self.run.policies, self.run.rollout, self.run.objective, self.run.state)
        for policy in self.policies.trained().values():
            check_loss_scaling(policy)  # our loss scaling is Megatron's, on this megatron-core (raises if not)
        self.step_num = self.resume()
        self.sync_weights(version=self.step_num)
        self.run.stream.start(self.step_num)

    def _on_preempt(self, signum, frame):
        log.warning("received signal %d: will checkpoint at the end of this step and exit", signum)
        self._preempted = True

    def resume(self) -> int:
        """The step this run starts after: the checkpoint ``checkpoint.resume`` /
        ``resume_from`` choose (checkpoints of another lineage are set aside, never
        deleted), or 0 for a fresh start."""
        c = self.cfg.checkpoint
        path = self.state.checkpoints.start(c.resume, c.resume_from)
        step = self.state.restore(path, allow_algo_change=c.allow_algo_change) if path is not None else 0
        self.run.metrics.start(step)
        return step

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> int:
        cfg, metrics_log = self.cfg, self.run.metrics
        if _any_rank(self._preempted):
            log.warning("preempted during start-up; exiting with %d before step %d", PREEMPT_EXIT_CODE, self.step_num + 1)
            return PREEMPT_EXIT_CODE
        if cfg.train.eval_every and self.step_num == 0:
            metrics_log.log(0, self.run.stream.evaluate())
        for step in self.rollout.progress(range(self.step_num + 1, cfg.train.steps + 1), "steps"):
            metrics = self.step(step)
            check_finite(step, metrics)  # before anything is saved: a NaN run never overwrites a good checkpoint
            last = step == cfg.train.steps
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or last):
                metrics.update(self.run.stream.evaluate())
            metrics_log.log(step, metrics)
            preempted = _any_rank(self._preempted)
            if last or preempted or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
                self.state.save(step)
            if cfg.checkpoint.save_hf_every and step % cfg.checkpoint.save_hf_every == 0:
                self.save_hf(f"step_{step}")
                if self.run.layout.rank == 0:
                    prune_hf_exports(os.path.join(cfg.train.run_dir, "hf"), cfg.checkpoint.keep_last_hf)
            self.step_num = step
            if preempted:
                log.warning("preempted after step %d; checkpoint saved, exiting with %d", step, PREEMPT_EXIT_CODE)
                return PREEMPT_EXIT_CODE
        if cfg.checkpoint.save_hf_at_end:
            self.save_hf("final")
        return 0

    def step(self, step: int) -> dict[str, float]:
        p, start, times = self.policies, time.perf_counter(), {}
        with Timer("time/rollout", times), (self.run.offload.offloaded() if self.run.offload else nullcontext()):
            batch, stream_metrics = self.run.stream.take(step)  # sampled under version step - 1 - staleness
        if self.run.metrics.wants_samples(step):
            self.run.metrics.log_samples(step, batch.prompt_texts, batch.response_texts, batch.scores_B.tolist())
        rm_metrics = {}
        if p.reward_model is not None:
            with Timer("time/reward_model", times):
                rm = self.cfg.reward.model
                batch.scores_B, rm_metrics = combine_rewards(batch.scores_B, p.reward_model.score(batch.tokens, batch.truncated_B),
                                                             weight=rm.weight, rule_weight=rm.rule_weight)
        with Timer("time/logprobs", times):
            self.score_with_models(batch, step)
        metrics = self.objective.compute_advantages(batch, trained_version=step - 1)
        with Timer("time/train", times):
            if p.critic is not None:
                metrics |= self.update(p.critic, batch, self.objective.critic_loss_fn, "critic", step=step)
            if step > self.cfg.algo.critic_warmup_steps:
                ref = self.objective.actor_loss_reference(p.reference)  # exact KL loss: None otherwise
                metrics |= self.update(p.actor, batch, self.objective.actor_loss_fn, "actor", step=step, ref=ref)
        with Timer("time/sync", times):
            metrics |= self.sync_weights(version=step)
        metrics |= rollout_metrics(batch, reduce=dp_all_reduce, dynamic_sampling=self.cfg.algo.dynamic_sampling,
                                   trained_version=step - 1)
        metrics |= stream_metrics
        metrics |= rm_metrics
        metrics |= times
        metrics["time/step"] = seconds = time.perf_counter() - start
        metrics["perf/tokens_per_s"] = _global_tokens(batch) / max(seconds, 1e-9)
        return metrics

    # -- the phases -------------------------------------------------------------------

    def score_with_models(self, batch: RolloutBatch, step: int) -> None:
        """Old and reference log-probs and old values, mini-batch by mini-batch so that the
        micro-batches are exactly those of the update: the first ratio is exactly 1."""
        p, temp = self.policies, self.cfg.rollout.temperature
        old, ref, values = [], [], []
        minibatches = self.minibatches(len(batch), step=step, epoch=0)
        for rows in minibatches:
            mini = batch.tokens.select(rows)
            old.append(p.actor.forward_logprobs(mini, temperature=temp)["logprobs_BT"])
            if p.reference is not None:
                ref.append(p.reference.forward_logprobs(mini, temperature=temp)["logprobs_BT"])
            if p.critic is not None:
                values.append(p.critic.forward_values(mini))
        T, order = batch.mask_BT.shape[1], torch.cat(minibatches)
        batch.old_logprobs_BT = _cat_rows(old, T, order)
        batch.ref_logprobs_BT = _cat_rows(ref, T, order) if ref else None
        batch.values_BT = _cat_rows(values, T, order) if values else None

    def update(self, policy: MegatronPolicy, batch: RolloutBatch, make_loss_fn, role: str, *, step: int, ref=None) -> dict[str, float]:
        """``ppo_epochs`` passes over the rollout batch, one optimizer step per mini-batch.
        ``ref``: the model ``train_step`` computes the exact per-token KL against (``kl_BT``
        in the loss function's outputs), or None."""
        per_step: list[dict[str, float]] = []
        entropy_grad = self.cfg.algo.entropy_coef != 0  # else entropy is a metric only: no [tokens x vocab] graph
        plan = [rows for epoch in range(self.cfg.algo.ppo_epochs) for rows in self.minibatches(len(batch), step=step, epoch=epoch)]
        with self.rollout.progress(len(plan), f"train {role}", leave=False) as bar:
            for rows in plan:
                mini = batch.select(rows)
                den = self.objective.denominators(mini)
                out = policy.train_step(mini.tokens, make_loss_fn(mini, den), temperature=self.cfg.rollout.temperature, ref=ref,
                                        entropy_grad=entropy_grad)
                per_step.append({k: float(v) for k, v in out.items()})
                bar.update(1)
        # train_step already reduced over micro-batches and data-parallel ranks; over the
        # optimizer steps of this RL step: min of *_min, max of *_max, mean of the rest.
        merged = {}
        for k in per_step[0]:
            values = [m[k] for m in per_step if k in m]
            merged[f"{role}/{k}"] = min(values) if k.endswith("_min") else max(values) if k.endswith("_max") else sum(values) / len(values)
        merged[f"{role}/optimizer_steps"] = float(len(per_step))
        return merged

    def minibatches(self, num_rows: int, *, step: int, epoch: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch of this rank's batch in epoch ``epoch`` of ``step``:
        contiguous runs of whole groups, or with ``train.shuffle_minibatches`` of a permutation
        drawn from (seed, step, epoch, data-parallel rank) alone. The old log-prob pass uses
        epoch 0's, so the first update sees the same micro-batches (its ratio is exactly 1)."""
        t, n = self.cfg.train, self.cfg.rollout.num_return_sequences_in_group
        order = torch.arange(num_rows)
        if t.shuffle_minibatches:
            seed = (t.seed * 1_000_003 + step * 1009 + epoch) * 131 + self.run.layout.dp_rank
            order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed % 2**63))
        if t.mini_batch_size is None:
            return [order]
        rows = t.mini_batch_size * n // self.run.layout.dp
        return [order[s : s + rows] for s in range(0, num_rows, rows)]

    def sync_weights(self, *, version: int) -> dict[str, float]:
        """The engine takes the actor's weights, policy ``version`` (the actor updates so far)."""
        stats = self.run.stream.sync_weights(self.policies.actor.models, version=version)
        return {"sync/seconds": stats.seconds, "sync/gbps": stats.gbps}

    def save_hf(self, tag: str) -> None:
        """The actor as an HF directory ``run_dir/hf/{tag}`` (collective)."""
        out = os.path.join(self.cfg.train.run_dir, "hf", tag)
        save_hf(self.policies.actor.models, out, hf_config=self.run.hf_config,
                tokenizer_dir=self.cfg.data.tokenizer_path or self.cfg.model.hf_path)
        log.info("actor saved in HF format to %s", out)


class NonFiniteError(RuntimeError):
    """A loss or gradient norm of the step is NaN or infinite: the weights are (or are about
    to be) corrupt, so the run stops before it writes a checkpoint."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """Raise ``NonFiniteError`` naming the step and the metrics when a trained policy's loss
    or gradient norm is not finite (the same on every rank: both are reduced over ranks).
    The weights only go non-finite through such a gradient (or a non-finite learning rate,
    which validation refuses), so this also guards them."""
    bad = {k: v for k, v in metrics.items()
           if k.startswith(("actor/", "critic/")) and (k.endswith("loss") or k.endswith("grad_norm")) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}; the run stops "
                             "before saving (the latest checkpoint is the last good one): lower optim.lr or check the data")


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a preemption signal may reach
    only some processes); all ranks then stop after the same step."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, "max", dist.group.WORLD if dist.is_initialized() else None).item() > 0)


def _global_tokens(batch: RolloutBatch) -> int:
    """Prompt and response tokens of the step over all data-parallel replicas."""
    local = batch.tokens.prompt_lens_B.sum() + batch.tokens.response_lens_B.sum()
    return int(dp_all_reduce(local.to(torch.float64).reshape(1))[0].item())


def _cat_rows(parts: list[torch.Tensor], T: int, order: torch.Tensor) -> torch.Tensor:
    """Per-mini-batch [b, t] tensors as one [B, T] (right-padded with zeros) in the batch's row
    order: ``order`` lists the batch rows the parts' rows are, one after another."""
    padded = [torch.nn.functional.pad(p.detach().float().cpu(), (0, T - p.shape[1])) if p.shape[1] < T else p[:, :T].detach().float().cpu() for p in parts]
    stacked = torch.cat(padded, dim=0)
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


def run(cfg: Config) -> int:
    """Train with ``cfg``; returns the process exit status."""
    start = time.time()
    # One run per directory: the second gets a message naming the holder (rank 0 holds it).
    lock = lock_run_dir(cfg.train.run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        trainer = Trainer(cfg)
        code = trainer.fit()
        trainer.run.close()
    finally:
        if lock is not None:
            lock.release()
    log.info("run finished in %.1f s (exit %d); run dir %s", time.time() - start, code, os.path.abspath(cfg.train.run_dir))
    return code
