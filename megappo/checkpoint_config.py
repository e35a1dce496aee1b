"""What a resume does with a config that changed since the checkpoint (issue 14, bug 4).

A resumed run used to keep the checkpoint's learning-rate schedule and Adam settings
silently (the restored scheduler and optimizer param groups won) while ``config.yaml``
recorded the new values, and resumed another algorithm's checkpoint without a word. Now:

- every key that differs from the checkpoint's ``config`` is logged, old -> new;
- the run's optimizer and scheduler settings apply, as Megatron-LM's
  ``--override-opt_param-scheduler`` does: the checkpoint brings the per-parameter state
  (Adam moments and step counts) and the scheduler's step count, the run's config brings
  peak / minimum learning rate, warm-up, decay, weight decay, Adam betas and epsilon;
- a change under ``algo`` is refused unless ``checkpoint.allow_algo_change`` is set;
- a checkpoint at or past ``train.steps`` is said out loud (the run has nothing to train).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterator, Optional

log = logging.getLogger("megappo")

_MISSING = "(absent)"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and other values are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict, run: dict) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ, as (key, checkpoint value, run value), sorted."""
    # meta.json stored the saved config through JSON: compare the run's the same way (tuples
    # become lists, other objects strings), or every tuple would read as a change.
    a, b = flatten(json.loads(json.dumps(saved, default=str))), flatten(json.loads(json.dumps(run, default=str)))
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]


def check_resume_config(
    saved: Optional[dict], run: Optional[dict], *, step: int, source: str, allow_algo_change: bool = False
) -> list[tuple[str, Any, Any]]:
    """Log the differences between the checkpoint's config and the run's; raise ``ValueError``
    on an algorithm change unless allowed. Returns the changes."""
    if run is None:
        return []
    steps = (run.get("train") or {}).get("steps")
    if isinstance(steps, int) and step >= steps:
        log.warning(
            "%s is at step %d and train.steps=%d: there is nothing left to train (raise train.steps to continue "
            "this run, or set checkpoint.resume=never to start a new one)", source, step, steps,
        )
    if saved is None:
        log.warning("%s records no config: the resumed run's settings cannot be compared with it", source)
        return []
    changes = config_changes(saved, run)
    algo = [c for c in changes if c[0].startswith("algo.")]
    if algo and not allow_algo_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in algo)
        raise ValueError(
            f"{source} was trained with another algorithm setting ({listed}). Resume with the checkpoint's "
            f"algo settings, start a new run directory, or set checkpoint.allow_algo_change=true to continue anyway"
        )
    for key, old, new in changes:
        applied = "applied (the optimizer and LR schedule take the run's settings)" if key.startswith("optim.") else "the run's value is used"
        log.warning("resume from %s: %s changed: %r -> %r; %s", source, key, old, new, applied)
    return changes


def _torch_optimizers(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [getattr(o, "optimizer", o) for o in inner]


@contextlib.contextmanager
def run_settings_win(optimizer, scheduler) -> Iterator[None]:
    """Load a checkpoint's optimizer and scheduler state inside this block: afterwards the
    param groups' hyper-parameters (``max_lr``, ``min_lr``, betas, eps, weight-decay
    multipliers, ...; torch's ``load_state_dict`` replaces them with the saved ones) are the
    freshly built optimizer's again, and Megatron's scheduler loads with
    ``override_opt_param_scheduler`` (its own values win; only ``num_steps`` is restored),
    then sets each group's lr and weight decay for the restored step."""
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in _torch_optimizers(optimizer)]
    flags = None
    if scheduler is not None and hasattr(scheduler, "override_opt_param_scheduler"):
        flags = (scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler)
        scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler = True, False
    try:
        yield
    finally:
        if flags is not None:
            scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler = flags
    for opt, fresh in zip(_torch_optimizers(optimizer), groups):
        if len(opt.param_groups) != len(fresh):
            raise ValueError(f"the checkpoint's optimizer has {len(opt.param_groups)} param groups, this run's {len(fresh)}")
        for group, values in zip(opt.param_groups, fresh):
            group.update(values)
    if scheduler is not None:
        scheduler.step(increment=0)  # lr and weight decay of the restored step, from the run's settings
