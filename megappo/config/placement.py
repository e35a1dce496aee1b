"""Checks of a disaggregated placement (``parallel.rollout_world_size``): the rollout ranks
are the last ranks of the launch, rollout rank i serves the trainer's data-parallel replica
i, and every other layout check applies to the trainer ranks alone."""

from __future__ import annotations

from typing import Optional

from megappo.config.errors import ConfigError
from megappo.config.schema import Config


def trainer_world_size(cfg: Config, world_size: Optional[int]) -> Optional[int]:
    """The ranks that train, of a launch of ``world_size`` (None: not known); a
    ``ConfigError`` naming the fields for a placement that cannot work."""
    par = cfg.parallel
    rollout = par.rollout_world_size
    if rollout < 0:
        raise ConfigError(f"parallel.rollout_world_size must be >= 0 (0: colocated), got {rollout}")
    if not par.rollout_timeout_s > 0:
        raise ConfigError(f"parallel.rollout_timeout_s must be > 0, got {par.rollout_timeout_s}")
    if rollout == 0:
        return world_size
    if cfg.rollout.engine == "sglang_server":
        raise ConfigError(
            f"parallel.rollout_world_size={rollout} with rollout.engine=sglang_server: the servers run outside the "
            "launch already; rollout ranks run rollout.engine=embedded or sglang (or set parallel.rollout_world_size=0)"
        )
    if world_size is None:
        return None
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    fits = f"a launch of parallel.rollout_world_size x (TP x PP + 1) = {rollout} x {tp * pp + 1} = {rollout * (tp * pp + 1)} processes"
    if rollout >= world_size:
        raise ConfigError(f"parallel.rollout_world_size={rollout} leaves no trainer rank in a world of {world_size} processes; "
                          f"this layout needs {fits}")
    trainers = world_size - rollout
    if trainers % (tp * pp):
        raise ConfigError(
            f"the trainer world size {trainers} (world size {world_size} - parallel.rollout_world_size {rollout}) is not "
            f"divisible by parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size = {tp} x {pp}; "
            f"this layout needs {fits}"
        )
    if trainers // (tp * pp) != rollout:
        raise ConfigError(
            f"parallel.rollout_world_size={rollout} must equal the trainer's data-parallel size "
            f"{trainers // (tp * pp)} = (world size {world_size} - {rollout}) / (TP {tp} x PP {pp}): rollout rank i serves "
            f"data-parallel replica i; this layout needs {fits}"
        )
    return trainers
