"""Entry point: ``python -m megappo.train --config recipes/NAME.yaml [section.key=value ...]``.

The same command runs under ``torchrun --nproc-per-node N -m megappo.train ...`` (one
process per GPU) and from Slurm (one torchrun per node). ``--dry-run`` loads the recipe,
expands the preset, prints the resolved config as YAML (rank 0 only) and validates the
parallel layout against ``--world-size`` or ``$WORLD_SIZE`` (the last
``parallel.rollout_world_size`` ranks of which only serve rollouts: ``megappo.rollout.remote``),
and checks the files the run will read and write (``config.preflight``). It builds no model and imports neither torch nor
Megatron, so it is fast and safe on a login node, except to check pass-through dicts against
their upstream classes: ``model.megatron`` / ``optim.megatron`` / ``optim.ddp`` import
megatron-core, and ``rollout.sglang`` (with an SGLang engine) imports SGLang where installed.

A user error (a bad recipe, override or layout; a missing config file; a model, tokenizer,
data file or run directory that cannot work) prints ``error: <message>`` to stderr and exits
with status 2, without a traceback. Before a run starts, the same file checks as the dry
run's are made strictly (``config.preflight.check_runnable``), so they cost a second, not a
start-up. During a run, a file-system problem that is the user's to fix (read-only or
permission-denied paths, a full disk, a directory that is a file) exits 1 and Ctrl-C
exits 130, each with one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
from typing import Iterator, Optional, Sequence

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
ENVIRONMENT_ERROR = 1
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C

# File-system errors that are the user's to fix (not bugs): one line instead of a traceback.
_USER_ERRNOS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "disk quota exceeded (No space left for this user)",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EEXIST: "exists and is in the way (a file where a directory is needed?)",
    errno.EISDIR: "is a directory, where a file is needed",
}
_LOW_SPACE_BYTES = 1 << 20


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
    rollout = par.rollout_world_size
    if world_size is None:
        layout = f"TP {tp} x PP {pp} x DP ? (world size not given: pass --world-size N or set WORLD_SIZE to check it)"
    elif rollout:
        trainers = world_size - rollout
        layout = (f"world size {world_size} = {trainers} trainer ranks (TP {tp} x PP {pp} x DP "
                  f"{data_parallel_size(cfg, trainers)}) + {rollout} rollout ranks (the last; parallel.rollout_world_size)")
    else:
        layout = f"world size {world_size} = TP {tp} x PP {pp} x DP {data_parallel_size(cfg, world_size)}"
    critic = "yes (adv_estimator=gae)" if uses_critic(cfg) else f"no (adv_estimator={cfg.algo.adv_estimator})"
    return f"# megappo resolved config (preset {cfg.algo.preset!r} expanded)\n# layout: {layout}\n# critic: {critic}\n"


def check_reward(cfg: Config) -> None:
    """``reward.fn`` names a registered reward or an importable ``module:function`` (the
    registry is in ``megappo.data``, above the config layer, so the entry point asks it)."""
    from megappo.data.rewards import resolve_reward  # deferred: keeps the dry run light (the module is torch-free)

    try:
        resolve_reward(cfg.reward.fn)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def user_os_error(err: BaseException, dirs: Sequence[str] = ()) -> Optional[str]:
    """One line for a file-system error that is the user's to fix, or None for a bug: an
    ``OSError`` with such an errno anywhere in the exception chain, or any error raised while
    one of ``dirs`` (the run's directories) has under 1 MiB free (libraries such as torch's
    writer report a full disk without an errno)."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            where = f": {e.filename}" if e.filename else ""
            return f"{_USER_ERRNOS[e.errno]}{where} ({e.strerror or e})"
    for path in dirs:
        probe = os.path.abspath(path)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            continue
        if free < _LOW_SPACE_BYTES:
            return f"No space left on device: {probe} has {free} bytes free ({type(err).__name__}: {err})"
    return None


def _run_dirs(cfg: Config) -> list[str]:
    return [cfg.train.run_dir] + ([cfg.checkpoint.dir] if cfg.checkpoint.dir else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, load and validate the config, then dry-run or train; returns the exit status."""
    # Intermixed: overrides may sit on both sides of an option (`a.b=1 --dry-run c.d=2`).
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    cfg = None
    try:
        try:
            world_size = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
            if world_size is None and not args.dry_run:
                world_size = 1  # plain `python -m megappo.train`: one process
            cfg = load_config(args.config, args.overrides, world_size=world_size)
            check_runnable(cfg, strict=not args.dry_run)
            check_reward(cfg)
        except (ConfigError, FileNotFoundError) as err:
            _report_error(str(err))
            return USER_ERROR
        if args.dry_run:
            if not _rank("RANK"):
                sys.stdout.write(_layout_comment(cfg, world_size) + config_to_yaml(cfg))
                sys.stdout.flush()
            return 0
        _configure_logging(cfg.logging.level)
        try:
            if cfg.parallel.rollout_world_size:
                from megappo.parallel.placement import place_ranks  # deferred: torch, only for real runs

                placement = place_ranks(cfg.parallel.rollout_world_size, timeout_s=cfg.parallel.rollout_timeout_s)
                if placement.is_rollout:
                    from megappo.rollout.remote import serve  # deferred: torch and the engines, only on rollout ranks

                    return serve(cfg, placement)  # this rank's engine, until the trainer is done
            from megappo.trainer import run  # deferred: torch and Megatron, only for real runs (not --dry-run)

            return int(run(cfg) or 0)  # the trainer's status (e.g. its preemption code)
        except ValueError as err:  # bad input found while building the run: a model dir, data, a shape
            _report_error(str(err))
            return USER_ERROR
    except KeyboardInterrupt:
        _report_error("interrupted (Ctrl-C)")
        return INTERRUPTED
    except Exception as err:
        message = user_os_error(err, _run_dirs(cfg) if cfg is not None else ())
        if message is None:
            raise  # a bug: keep the traceback
        _report_error(message)
        return ENVIRONMENT_ERROR


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
