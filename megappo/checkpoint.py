"""Training checkpoints: atomic save and resume of models, optimizers, LR schedules, RNG
states and the trainer's own state (data cursor, KL controller, reward statistics).

Layout (every rank must see the same filesystem)::

    CKPT_DIR/
      latest                  "step_12": written last, by write-to-temp + os.replace
      step_12/
        meta.json             step, roles, architecture (spec), tokenizer fingerprint, layout, config
        extra.pt              the trainer's state (torch.save of plain Python / tensors)
        rng/rank00000.pt      per-rank RNG states (python, numpy, torch, CUDA, Megatron's tracker)
        actor/  critic/       one Megatron distributed checkpoint per role: "model" (or
                              "model0", "model1", ... per virtual chunk), "optimizer",
                              "scheduler"; tensors stored by global key, so a resume may
                              use another DP size (and, with ``fully_reshardable``
                              optimizer state, another TP / PP size)

Atomicity: everything is written to ``.tmp-step_12``, fsynced, renamed to ``step_12``
and only then is ``latest`` replaced. A save killed at any point leaves the previous
checkpoint and ``latest`` untouched; the next save deletes the stale temporary directory.
Older checkpoints beyond ``keep_last`` are deleted only after the new one is complete, by
save order, never the one ``latest`` names; ``start`` decides where a run begins and sets
aside checkpoints of another lineage (see ``megappo.checkpoint_dir``). ``load`` compares the
run's config with the checkpoint's and applies the run's optimizer settings
(``megappo.checkpoint_config``).

Helpers: megatron-core writes through a ``multiprocessing`` Manager it starts at the first
save. ``start_writer_helper`` starts that Manager itself, shielded from preemption signals and
tied to the trainer's lifetime (``megappo.helper_processes``), so a SIGUSR1 sent to every
process does not break the preemption save and ``kill -9`` leaves no helper behind.

``step_N/actor`` holds the same model keys as a model checkpoint of
``megappo.weights.save_megatron_model``, so ``tools/convert_megatron_to_hf.py`` exports it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from typing import Any, Optional, Sequence

import torch

from megappo import checkpoint_dir as cdir
from megappo.checkpoint_config import check_resume_config, run_settings_win
from megappo.helper_processes import start_writer_helper
from megappo.models.optimizer_state import load_optimizer_state, prepare_for_state_load
from megappo.models.spec import ModelSpec
from megappo.weights.export import fsync_dir, fsync_tree
from megappo.weights.megatron_ckpt import check_spec, load_model_state, quiet_dist_checkpointing, sharded_model_state
from megappo.weights.model_io import unwrap

log = logging.getLogger("megappo")

FORMAT = "megappo-train/1"
META = cdir.META
LATEST = cdir.LATEST
OPTIMIZER_SHARDING = ("fully_reshardable", "dp_reshardable")

class _Role:
    """What is saved for one role: its model chunks, and optimizer / scheduler if trained."""

    def __init__(self, chunks: Sequence, optimizer=None, scheduler=None):
        self.chunks, self.optimizer, self.scheduler = list(chunks), optimizer, scheduler

    def sharded_state(self, *, is_loading: bool, sharding: str, with_optimizer: bool = True) -> dict:
        state = sharded_model_state(self.chunks)
        if self.optimizer is not None and with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                dict(state), is_loading=is_loading, metadata={"distrib_optim_sharding_type": sharding}
            )
        if self.scheduler is not None and with_optimizer:
            state["scheduler"] = self.scheduler.state_dict()
        return state


def _roles(policies, models, optimizers, schedulers) -> dict[str, _Role]:
    """``policies`` (objects with ``.models``, ``.optimizer``, ``.scheduler``, e.g.
    ``MegatronPolicy``) and / or ``models`` (name -> chunks) with ``optimizers`` /
    ``schedulers`` by the same names."""
    out: dict[str, _Role] = {}
    for name, p in (policies or {}).items():
        out[name] = _Role(p.models, getattr(p, "optimizer", None), getattr(p, "scheduler", None))
    for name, chunks in (models or {}).items():
        if name in out:
            raise ValueError(f"role {name!r} given both as a policy and as models")
        if not isinstance(chunks, (list, tuple)):
            chunks = getattr(chunks, "models", [chunks])
        out[name] = _Role(chunks, (optimizers or {}).get(name), (schedulers or {}).get(name))
    unknown = (set(optimizers or {}) | set(schedulers or {})) - set(out)
    if unknown:
        raise ValueError(f"optimizers / schedulers for roles without models: {sorted(unknown)}")
    if not out:
        raise ValueError("nothing to checkpoint: pass policies= or models=")
    return out


def rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU, CUDA and Megatron's
    model-parallel tracker (dropout / init forks)."""
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _layout() -> dict[str, int]:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    return {
        "world_size": dist.get_world_size(),
        "tp": mpu.get_tensor_model_parallel_world_size(),
        "pp": mpu.get_pipeline_model_parallel_world_size(),
        "dp": mpu.get_data_parallel_world_size(),
    }


class CheckpointManager:
    """Saves ``step_N`` checkpoints under ``ckpt_dir`` and resumes from them.

    ``keep_last``: complete checkpoints kept (older ones are deleted after a newer one is
    complete). ``optimizer_sharding``: the distributed optimizer's checkpoint format,
    ``fully_reshardable`` (resume at any DP / TP / PP; gathers on DP rank 0 when saving)
    or ``dp_reshardable`` (fully parallel; resume at another DP size only).
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 2, *, optimizer_sharding: str = "fully_reshardable"):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if optimizer_sharding not in OPTIMIZER_SHARDING:
            raise ValueError(f"optimizer_sharding must be one of {OPTIMIZER_SHARDING}, got {optimizer_sharding!r}")
        self.dir = os.path.abspath(os.fspath(ckpt_dir))
        self.keep_last = keep_last
        self.sharding = optimizer_sharding

    # ------------------------------------------------------------------ finding

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present (sorted)."""
        return cdir.complete_steps(self.dir)

    def latest(self) -> Optional[str]:
        """The directory ``latest`` points to, or None when there is no checkpoint yet."""
        pointer = os.path.join(self.dir, LATEST)
        name = cdir.latest_name(self.dir)
        if name is None:
            return None
        path = os.path.join(self.dir, name)
        if not os.path.isfile(os.path.join(path, META)):
            raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint in {self.dir}")
        return path

    def start(self, resume: str = "auto", resume_from: Optional[str] = None) -> Optional[str]:
        """Where this run starts: the checkpoint to ``load`` (None: from scratch), after
        setting aside checkpoints of another lineage (``checkpoint_dir.start_checkpoint``):
        ``resume="never"`` over existing checkpoints, or a start (``resume_from``: a step,
        ``step_N`` or a path; else ``latest``) with later checkpoints present. Collective when
        torch.distributed is initialized: rank 0 decides and moves, every rank gets the path."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cdir.start_checkpoint(self.dir, resume, resume_from)
        answer: list = [None]
        if dist.get_rank() == 0:
            try:
                answer = [("ok", cdir.start_checkpoint(self.dir, resume, resume_from))]
            except ValueError as err:
                answer = [("error", str(err))]
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise ValueError(value)
        return value

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        *,
        policies: Optional[dict] = None,
        models: Optional[dict] = None,
        optimizers: Optional[dict] = None,
        schedulers: Optional[dict] = None,
        extra: Optional[dict] = None,
        config_dict: Optional[dict] = None,
        spec_dict: Optional[dict] = None,
        tokenizer_fingerprint: Optional[str] = None,
    ) -> str:
        """Write ``step_{step}`` atomically and point ``latest`` at it (collective over all
        ranks). ``extra`` is the trainer's state, torch-saveable; it comes back from ``load``."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        roles = _roles(policies, models, optimizers, schedulers)
        if spec_dict is None:
            spec_dict = next(iter(roles.values())).chunks[0].megappo_spec.to_dict()
        start_writer_helper()
        rank = dist.get_rank()
        final = os.path.join(self.dir, f"step_{step}")
        tmp = os.path.join(self.dir, f".tmp-step_{step}")
        if rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            self._remove_stale_tmp()
            os.makedirs(tmp)
            for name in roles:
                os.makedirs(os.path.join(tmp, name))
            os.makedirs(os.path.join(tmp, "rng"))
        dist.barrier()

        for name, role in roles.items():
            with quiet_dist_checkpointing():
                dist_checkpointing.save(role.sharded_state(is_loading=False, sharding=self.sharding), os.path.join(tmp, name))
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))
        if rank == 0:
            torch.save(extra or {}, os.path.join(tmp, "extra.pt"))
            meta = {
                "format": FORMAT,
                "step": step,
                "roles": sorted(roles),
                "spec": spec_dict,
                "specs": {name: _role_spec(role).to_dict() for name, role in roles.items()},
                "tokenizer_fingerprint": tokenizer_fingerprint,
                "layout": _layout(),
                "optimizer_sharding": self.sharding,
                "config": config_dict,
                "saved_ns": time.time_ns(),  # pruning goes by save order, not by step number
            }
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2, default=str)
        dist.barrier()

        if rank == 0:
            fsync_tree(tmp)
            if os.path.exists(final):
                log.warning("checkpoint %s exists; replacing it", final)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.dir)
            self._point_latest(os.path.basename(final))
            self._prune()
        dist.barrier()
        return final

    def _point_latest(self, name: str) -> None:
        cdir.point_latest(self.dir, name)

    def _remove_stale_tmp(self) -> None:
        for name in os.listdir(self.dir):
            if name.startswith(".tmp-step_"):
                log.warning("removing %s left by an interrupted save", os.path.join(self.dir, name))
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def _prune(self) -> None:
        deleted = cdir.prune(self.dir, self.keep_last)
        if deleted:
            log.info("pruned checkpoints %s (checkpoint.keep_last=%d)", ", ".join(f"step_{s}" for s in deleted), self.keep_last)

    # ------------------------------------------------------------------ loading

    def load(
        self,
        path: Optional[str] = None,
        *,
        policies: Optional[dict] = None,
        models: Optional[dict] = None,
        optimizers: Optional[dict] = None,
        schedulers: Optional[dict] = None,
        spec_dict: Optional[dict] = None,
        tokenizer_fingerprint: Optional[str] = None,
        load_optimizer: bool = True,
        load_rng: bool = True,
        config_dict: Optional[dict] = None,
        allow_algo_change: bool = False,
    ) -> dict:
        """Restore the given roles from ``path`` (default: ``latest``) and return the saved
        ``extra`` dict (with ``step``). Collective over all ranks.

        A different architecture (``spec_dict``, default: the models' own spec) or
        tokenizer fingerprint is a ``ValueError`` naming both. RNG states are restored when
        the world size is the one saved (else a warning: the resumed run is not
        bit-identical to an uninterrupted one).

        ``config_dict``: the run's resolved config. Every key that differs from the
        checkpoint's is logged; a change under ``algo`` is a ``ValueError`` unless
        ``allow_algo_change``. The optimizer and LR schedule always take the run's settings
        (the checkpoint gives Adam's state and the scheduler's step count)."""
        from megatron.core import dist_checkpointing

        path = self.latest() if path in (None, "latest") else os.fspath(path)
        if path is None:
            raise ValueError(f"no checkpoint to resume from in {self.dir}")
        meta = read_meta(path)
        roles = _roles(policies, models, optimizers, schedulers)
        run_spec = _spec(spec_dict) if spec_dict is not None else next(iter(roles.values())).chunks[0].megappo_spec
        check_spec(run_spec, meta["spec"], source=path)
        check_role_specs({name: _role_spec(role) for name, role in roles.items()}, meta, source=path)
        saved_tok = meta.get("tokenizer_fingerprint")
        if tokenizer_fingerprint is not None and saved_tok is not None and saved_tok != tokenizer_fingerprint:
            raise ValueError(
                f"{path}: the checkpoint was written with tokenizer {saved_tok}, this run uses tokenizer "
                f"{tokenizer_fingerprint}; resume with the original tokenizer or start a new run directory"
            )
        missing = sorted(set(roles) - set(meta["roles"]))
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} (it holds {', '.join(meta['roles'])})")
        import torch.distributed as dist

        quiet = dist.is_initialized() and dist.get_rank() != 0
        if quiet:  # one rank says what changed
            previous_level = log.level
            log.setLevel(logging.ERROR)
        try:
            check_resume_config(meta.get("config"), config_dict, step=int(meta["step"]), source=path, allow_algo_change=allow_algo_change)
        finally:
            if quiet:
                log.setLevel(previous_level)

        for name, role in roles.items():
            with_opt = load_optimizer and role.optimizer is not None
            if with_opt:
                prepare_for_state_load(role.optimizer)
            state = role.sharded_state(is_loading=True, sharding=meta.get("optimizer_sharding", self.sharding), with_optimizer=with_opt)
            with quiet_dist_checkpointing():
                loaded = dist_checkpointing.load(state, os.path.join(path, name))
            load_model_state(role.chunks, loaded)
            if with_opt:
                with run_settings_win(role.optimizer, role.scheduler):
                    load_optimizer_state(role.optimizer, loaded["optimizer"])
                    if role.scheduler is not None:
                        role.scheduler.load_state_dict(loaded["scheduler"])
        if load_rng:
            self._load_rng(path, meta)
        extra = torch.load(os.path.join(path, "extra.pt"), weights_only=False)
        extra.setdefault("step", meta["step"])
        return extra

    def _load_rng(self, path: str, meta: dict) -> None:
        import torch.distributed as dist

        saved_world = meta["layout"]["world_size"]
        if saved_world != dist.get_world_size():
            log.warning(
                "%s was saved by %d ranks, this run has %d: random states are not restored "
                "(sampling after the resume differs from an uninterrupted run)",
                path, saved_world, dist.get_world_size(),
            )
            return
        set_rng_state(torch.load(os.path.join(path, "rng", f"rank{dist.get_rank():05d}.pt"), weights_only=False))


def check_role_specs(run_specs: dict, meta: dict, *, source: str) -> None:
    """Each role's architecture must be the one saved for it: a critic built from another
    HF model than the actor (``model.critic_hf_path``) is checked against its own spec.
    Checkpoints without per-role specs (older ones) are checked by ``meta["spec"]`` only."""
    saved = meta.get("specs") or {}
    for name, spec in run_specs.items():
        if name in saved:
            check_spec(spec, saved[name], source=f"{source} ({name})")


def _role_spec(role: "_Role"):
    return unwrap(role.chunks[0]).megappo_spec


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path}: no {META} (not a complete megappo training checkpoint)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _spec(spec_dict: dict):
    return ModelSpec(**spec_dict)
