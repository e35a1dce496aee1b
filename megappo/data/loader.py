"""Batches of prompts for data-parallel ranks: seeded per-epoch shuffle, resumable cursor.

Training: the dataset is read in global batches of ``train.rollout_batch_size`` prompts;
data-parallel rank ``r`` of ``d`` takes the contiguous ``r``-th share of each global batch,
so the ranks' shares are disjoint and together are the global batch. Each epoch visits the
prompts in an order drawn from ``(seed, epoch)`` alone, so every rank computes the same
order without communication. An epoch ends when fewer than a global batch of prompts is
left (those are dropped for the epoch; with shuffling they differ from epoch to epoch).

The cursor (``state_dict``: epoch, index into the epoch's order, seed) is saved with each
checkpoint; after ``load_state_dict`` the loader returns exactly the batches an
uninterrupted run would have returned next.

Evaluation takes the held-out prompts directly: rank ``r`` of ``d`` scores every ``d``-th one
(``megappo.loop.rollout_side``).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional, Sequence

from megappo.data.dataset import PromptItem

logger = logging.getLogger(__name__)


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")


class PromptLoader:
    """This rank's share of each global batch of training prompts (see the module docstring)."""

    def __init__(
        self,
        dataset: Sequence[PromptItem],
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        _check_rank(dp_rank, dp_size)
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"train.rollout_batch_size={global_batch_size} must be a positive multiple of the "
                f"data-parallel size {dp_size} (each rank takes an equal share of every batch)"
            )
        if len(dataset) < global_batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} usable prompts, fewer than one global batch "
                f"(train.rollout_batch_size={global_batch_size})"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order_epoch: Optional[int] = None
        self._order: list[int] = []

    @classmethod
    def from_config(cls, dataset: Sequence[PromptItem], config: Any, *, dp_rank: int, dp_size: int) -> "PromptLoader":
        """Build from the root config (``train.rollout_batch_size``, ``train.seed``, ``data.shuffle``)."""
        return cls(dataset, config.train.rollout_batch_size, dp_rank, dp_size, config.train.seed, config.data.shuffle)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                # A string seed is hashed with SHA-512: the same order in every process.
                random.Random(f"megappo-data/{self.seed}/{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_batch(self) -> list[PromptItem]:
        """This rank's ``global_batch_size / dp_size`` prompts of the next global batch."""
        if self.index + self.global_batch_size > len(self.dataset):
            if self.dp_rank == 0:
                logger.info("data: epoch %d done (%d prompts)", self.epoch, len(self.dataset))
            self.epoch += 1
            self.index = 0
        order = self._epoch_order(self.epoch)
        start = self.index + self.dp_rank * self.per_rank
        self.index += self.global_batch_size
        return [self.dataset[i] for i in order[start : start + self.per_rank]]

    def state_dict(self) -> dict[str, int]:
        """The cursor: the epoch, the number of its prompts already handed out, the seed."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved cursor. Its seed wins over the constructor's (with a warning
        when they differ), so the resumed run sees the prompts the original would have."""
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise ValueError(f"data loader state lacks {sorted(missing)}: {state}")
        epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        if epoch < 0 or not 0 <= index <= len(self.dataset):
            raise ValueError(
                f"data loader state {state} does not fit the training set of {len(self.dataset)} prompts "
                "(was the dataset changed since the checkpoint?)"
            )
        if seed != self.seed:
            logger.warning("data: resuming with the checkpoint's seed %d instead of train.seed=%d", seed, self.seed)
        self.epoch, self.index, self.seed = epoch, index, seed
        self._order_epoch = None
