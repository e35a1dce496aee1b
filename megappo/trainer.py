"""The RL loop. ``Trainer.step`` reads as the algorithm; each phase is one call on a
named component, and no phase branches on the algorithm or the parallel layout.

    prompts -> engine.generate -> reward -> old / ref log-probs, values -> advantages
            -> critic update -> actor update -> weight sync -> metrics, checkpoint

Every rank runs this same program (SPMD under torchrun). See ``megappo/experience.py``
for where generation happens and ``megappo/objective.py`` for the losses.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from megappo.config import Config, config_to_dict, uses_critic
from megappo.experience import Experience
from megappo.objective import Objective
from megappo.parallel.collectives import all_reduce, dp_sum_reducer
from megappo.run_setup import RunComponents, build_components

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
        self.c: RunComponents = build_components(cfg)
        self.objective = Objective(cfg, reduce_sums=dp_sum_reducer())
        self.step_num = self.c.resume(self.objective)
        self.sync_weights()

    def _on_preempt(self, signum, frame):
        log.warning("received signal %d: will checkpoint at the end of this step and exit", signum)
        self._preempted = True

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> int:
        cfg = self.cfg
        if _any_rank(self._preempted):
            log.warning("preempted during start-up; exiting with %d before step %d", PREEMPT_EXIT_CODE, self.step_num + 1)
            return PREEMPT_EXIT_CODE
        if cfg.train.eval_every and self.step_num == 0:
            self.c.metrics.log(0, self.c.evaluate())
        for step in self.c.progress(range(self.step_num + 1, cfg.train.steps + 1), "steps"):
            metrics = self.step(step)
            last = step == cfg.train.steps
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or last):
                metrics.update(self.c.evaluate())
            self.c.metrics.log(step, metrics)
            preempted = _any_rank(self._preempted)
            if last or preempted or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
                self.c.save_checkpoint(step, self.objective)
            if cfg.checkpoint.save_hf_every and step % cfg.checkpoint.save_hf_every == 0:
                self.c.save_hf(f"step_{step}")
            self.step_num = step
            if preempted:
                log.warning("preempted after step %d; checkpoint saved, exiting with %d", step, PREEMPT_EXIT_CODE)
                return PREEMPT_EXIT_CODE
        if cfg.checkpoint.save_hf_at_end:
            self.c.save_hf("final")
        return 0

    def step(self, step: int) -> dict[str, float]:
        timer = self.c.timer()
        with timer("rollout"):
            exp = self.rollout(step)
            self.c.release_engine_memory()  # colocated SGLang gives the GPUs back for training
        with timer("logprobs"):
            self.score_with_models(exp)
        metrics = self.objective.compute_advantages(exp)
        with timer("train"):
            if self.c.critic is not None:
                metrics |= self.update(self.c.critic, exp, self.objective.critic_loss_fn, "critic")
            if step > self.cfg.algo.critic_warmup_steps:
                ref = self.objective.actor_loss_reference(self.c.reference)  # exact KL loss: None otherwise
                metrics |= self.update(self.c.actor, exp, self.objective.actor_loss_fn, "actor", ref=ref)
        with timer("sync"):
            metrics |= self.sync_weights()
        metrics |= self.c.rollout_metrics(exp)
        metrics |= timer.metrics(tokens=self.c.global_tokens(exp))
        return metrics

    # -- the phases -------------------------------------------------------------------

    def rollout(self, step: int) -> Experience:
        """Sample a group of responses per prompt and score them (dynamic sampling keeps
        only groups whose rewards differ, sampling more prompts to fill the batch)."""
        a = self.cfg.algo
        return self.c.sample_experience(step, dynamic=a.dynamic_sampling, max_rounds=a.max_sampling_rounds)

    def score_with_models(self, exp: Experience) -> None:
        """Old and reference log-probs and old values, mini-batch by mini-batch so that the
        micro-batches are exactly those of the update: the first ratio is exactly 1."""
        c, temp = self.c, self.cfg.rollout.temperature
        old, ref, values = [], [], []
        for rows in c.minibatches(len(exp)):
            mini = exp.batch.select(rows)
            old.append(c.actor.forward_logprobs(mini, temperature=temp)["logprobs_BT"])
            if c.reference is not None:
                ref.append(c.reference.forward_logprobs(mini, temperature=temp)["logprobs_BT"])
            if c.critic is not None:
                values.append(c.critic.forward_values(mini))
        T = exp.mask_BT.shape[1]
        exp.old_logprobs_BT = _cat_rows(old, T)
        exp.ref_logprobs_BT = _cat_rows(ref, T) if ref else None
        exp.values_BT = _cat_rows(values, T) if values else None

    def update(self, policy, exp: Experience, make_loss_fn, role: str, ref=None) -> dict[str, float]:
        """``ppo_epochs`` passes over the rollout batch, one optimizer step per mini-batch.
        ``ref``: the model ``train_step`` computes the exact per-token KL against (``kl_BT``
        in the loss function's outputs), or None."""
        per_step: list[dict[str, float]] = []
        for _ in range(self.cfg.algo.ppo_epochs):
            for rows in self.c.minibatches(len(exp)):
                mini = exp.select(rows)
                den = self.objective.denominators(mini)
                out = policy.train_step(mini.batch, make_loss_fn(mini, den), temperature=self.cfg.rollout.temperature, ref=ref)
                per_step.append({k: float(v) for k, v in out.items()})
        # train_step already reduced over micro-batches and data-parallel ranks; over the
        # optimizer steps of this RL step: min of *_min, max of *_max, mean of the rest.
        merged = {}
        for k in per_step[0]:
            values = [m[k] for m in per_step if k in m]
            merged[f"{role}/{k}"] = min(values) if k.endswith("_min") else max(values) if k.endswith("_max") else sum(values) / len(values)
        merged[f"{role}/optimizer_steps"] = float(len(per_step))
        return merged

    def sync_weights(self) -> dict[str, float]:
        stats = self.c.sync_weights()
        return {"sync/seconds": stats.seconds, "sync/gbps": stats.gbps}


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a preemption signal may reach
    only some processes); all ranks then stop after the same step."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, "max", dist.group.WORLD if dist.is_initialized() else None).item() > 0)


def _cat_rows(parts: list[torch.Tensor], T: int) -> torch.Tensor:
    """Concatenate per-mini-batch [b, t] tensors into [B, T] (right-padded with zeros)."""
    padded = [torch.nn.functional.pad(p.detach().float().cpu(), (0, T - p.shape[1])) if p.shape[1] < T else p[:, :T].detach().float().cpu() for p in parts]
    return torch.cat(padded, dim=0)


def run(cfg: Config) -> int:
    """Train with ``cfg``; returns the process exit status."""
    start = time.time()
    trainer = Trainer(cfg)
    code = trainer.fit()
    trainer.c.close()
    log.info("run finished in %.1f s (exit %d); run dir %s", time.time() - start, code, os.path.abspath(cfg.train.run_dir))
    return code


__all__ = ["Trainer", "run", "PREEMPT_EXIT_CODE", "config_to_dict", "uses_critic"]
