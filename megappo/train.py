"""Entry point: ``python -m megappo.train --config recipes/NAME.yaml [section.key=value ...]``.

The same command runs under ``torchrun --nproc-per-node N -m megappo.train ...`` (one
process per GPU) and from Slurm (one torchrun per node). ``--dry-run`` loads the recipe,
expands the preset, prints the resolved config as YAML (rank 0 only) and validates the
parallel layout against ``--world-size`` or ``$WORLD_SIZE``; it builds no model and imports
neither torch nor Megatron, so it is fast and safe on a login node.

A user error (a bad recipe, override or layout; a missing config file) prints
``error: <message>`` to stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from megappo.config import (
    Config,
    ConfigError,
    check_runnable,
    config_to_yaml,
    data_parallel_size,
    load_config,
    uses_critic,
)

USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megappo.train",
        description="Train an LLM with RL (PPO / GRPO / LitePPO / ...) on Megatron-core.",
        epilog="Example: torchrun --nproc-per-node 8 -m megappo.train --config recipes/gsm8k_liteppo.yaml "
        "train.steps=10 algo.adv_norm.std_level=group. Reference of every key: docs/config.md.",
    )
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe; without it the schema defaults are used")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="overrides, read as YAML values, applied after the recipe"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config, validate it and exit without training"
    )
    parser.add_argument(
        "--world-size", type=int, metavar="N", help="with --dry-run: check the layout for N processes (default $WORLD_SIZE)"
    )
    return parser


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _rank(name: str) -> int:
    try:
        return _env_int(name) or 0
    except ConfigError:
        return 0


def _report_error(message: str) -> None:
    """Rank 0 prints; other ranks print only one line per node (local rank 0), tagged."""
    rank, local_rank = _rank("RANK"), _rank("LOCAL_RANK")
    if not rank:
        print(f"error: {message}", file=sys.stderr)
    elif not local_rank:
        print(f"[rank {rank}] error: {message}", file=sys.stderr)


def _layout_comment(cfg: Config, world_size: Optional[int]) -> str:
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world_size is None:
        layout = f"TP {tp} x PP {pp} x DP ? (world size not given: pass --world-size N or set WORLD_SIZE to check it)"
    else:
        layout = f"world size {world_size} = TP {tp} x PP {pp} x DP {data_parallel_size(cfg, world_size)}"
    critic = "yes (adv_estimator=gae)" if uses_critic(cfg) else f"no (adv_estimator={cfg.algo.adv_estimator})"
    return f"# megappo resolved config (preset {cfg.algo.preset!r} expanded)\n# layout: {layout}\n# critic: {critic}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, load and validate the config, then dry-run or train; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        world_size = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
        if world_size is None and not args.dry_run:
            world_size = 1  # plain `python -m megappo.train`: one process
        cfg = load_config(args.config, args.overrides, world_size=world_size)
        check_runnable(cfg, strict=not args.dry_run)
    except (ConfigError, FileNotFoundError) as err:
        _report_error(str(err))
        return USER_ERROR
    if args.dry_run:
        if not _rank("RANK"):
            sys.stdout.write(_layout_comment(cfg, world_size) + config_to_yaml(cfg))
            sys.stdout.flush()
        return 0
    _configure_logging(cfg.logging.level)
    from megappo.trainer import run  # imports torch and Megatron: only for real runs

    try:
        return int(run(cfg) or 0)  # the trainer's status (e.g. its preemption code)
    except ValueError as err:  # bad input found while building the run: a model dir, data, a shape
        _report_error(str(err))
        return USER_ERROR


def _configure_logging(level: str) -> None:
    """Rank 0 logs at ``logging.level``; other ranks only warnings, tagged with their rank.
    Megatron's own INFO output (DDP and optimizer dumps) is shown only at debug level."""
    rank = _rank("RANK") or 0
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s"))
    logging.getLogger("megappo").setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    if level != "debug":
        logging.getLogger("megatron").setLevel(logging.WARNING)
        _summarize_fallback_warnings(rank)


def _summarize_fallback_warnings(rank: int) -> None:
    """megatron-core warns once per module that apex / Transformer Engine are missing (half a
    dozen ``UserWarning``s per rank): say it once, on rank 0, in one line instead."""
    import importlib.util
    import warnings

    warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)
    missing = [name for name, mod in (("apex", "apex"), ("Transformer Engine", "transformer_engine")) if importlib.util.find_spec(mod) is None]
    if missing and rank == 0:
        logging.getLogger("megappo").info(
            "%s not installed: megatron-core uses its plain-torch fallbacks (fused kernels off)", " and ".join(missing)
        )


if __name__ == "__main__":
    sys.exit(main())
