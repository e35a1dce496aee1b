"""Entry point of the reward-model trainer:
``python -m megappo.train_rm --config recipes/NAME.yaml [section.key=value ...]``
(console script ``megappo-train-rm``), under ``torchrun`` for TP / PP / DP.

The recipe is the same strict, typed config as the RL trainer's (``docs/config.md``); the
trainer's own keys are the ``reward_train`` section, and it also reads ``model``,
``parallel``, ``optim``, ``data`` (tokenizer and chat template), ``train`` (seed, run
directory, micro-batch token budget), ``checkpoint`` and ``logging``; the RL-only sections
are ignored (and not validated). ``--dry-run`` prints
the resolved config and checks it without building a model. A user error (recipe, data,
model directory) prints ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from megappo.config import ConfigError, config_to_yaml
from megappo.config.loader import build, resolve_tree

USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megappo.train_rm",
        description="Train a reward model (Bradley-Terry on preference pairs) on Megatron-core.",
        epilog="Example: torchrun --nproc-per-node 2 -m megappo.train_rm --config recipes/toy_rm_cpu.yaml "
        "parallel.tensor_model_parallel_size=2. Reference of every key: docs/config.md (section reward_train).",
    )
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides applied after the recipe")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, check it and exit")
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not _is_rank0():
        logging.getLogger("megappo").setLevel(logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        # The typed tree, strictly checked (unknown keys, types); not the RL trainer's
        # validation, whose rollout and length rules do not apply here.
        cfg = build(resolve_tree(args.config, args.overrides))
        from megappo.rm_trainer import check_reward_train  # deferred: keeps the CLI's start light

        check_reward_train(cfg, world, files=not args.dry_run)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if _is_rank0():
            print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    if args.dry_run:
        if _is_rank0():
            sys.stdout.write(config_to_yaml(cfg))
        return 0
    from megappo.rm_trainer import run  # deferred: torch and Megatron, only for real runs (not --dry-run)

    try:
        return int(run(cfg) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
