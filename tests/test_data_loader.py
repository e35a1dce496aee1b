"""DP sharding, seeded shuffle and the resumable cursor (megappo.data.loader)."""

from __future__ import annotations

import logging

import pytest

from megappo.data.dataset import PromptItem
from megappo.data.loader import PromptLoader


def make_items(n: int) -> list[PromptItem]:
    return [PromptItem(prompt_ids=[i], answer=str(i), index=i, text=f"p{i}") for i in range(n)]


def indices(batch: list[PromptItem]) -> list[int]:
    return [item.index for item in batch]


@pytest.mark.parametrize("n, batch, dp", [(24, 8, 4), (25, 6, 3), (10, 10, 1), (9, 4, 2)])
def test_shards_disjoint_and_cover_the_global_batch(n, batch, dp):
    data = make_items(n)
    loaders = [PromptLoader(data, batch, rank, dp, seed=7) for rank in range(dp)]
    seen_epoch0: list[int] = []
    for _ in range(3 * (n // batch)):  # crosses epoch boundaries
        shares = [indices(loader.next_batch()) for loader in loaders]
        assert all(len(share) == batch // dp for share in shares)
        merged = [i for share in shares for i in share]
        assert len(set(merged)) == batch  # disjoint
        if loaders[0].epoch == 0:
            seen_epoch0 += merged
    # One epoch visits each prompt at most once and drops fewer than a batch.
    assert len(seen_epoch0) == len(set(seen_epoch0)) == (n // batch) * batch


def test_same_order_on_every_rank_and_rank_share_is_contiguous():
    data = make_items(32)
    single = PromptLoader(data, 8, 0, 1, seed=3)
    ranks = [PromptLoader(data, 8, r, 4, seed=3) for r in range(4)]
    for _ in range(10):
        full = indices(single.next_batch())
        assert [i for r in ranks for i in indices(r.next_batch())] == full


def test_seeded_shuffle():
    data = make_items(50)

    def epoch_order(seed: int, epochs: int = 2) -> list[int]:
        loader = PromptLoader(data, 10, 0, 1, seed=seed)
        return [i for _ in range(5 * epochs) for i in indices(loader.next_batch())]

    a = epoch_order(1)
    assert a == epoch_order(1)
    assert a != epoch_order(2)
    assert a[:50] != list(range(50)) and sorted(a[:50]) == list(range(50))
    assert a[:50] != a[50:]  # a new order each epoch
    unshuffled = PromptLoader(data, 10, 0, 1, seed=1, shuffle=False)
    assert indices(unshuffled.next_batch()) == list(range(10))


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 9])
def test_resume_gives_the_uninterrupted_sequence(stop_after):
    data = make_items(21)  # 3 global batches of 6 per epoch, 3 prompts dropped per epoch
    reference = PromptLoader(data, 6, 1, 2, seed=11)
    expected = [indices(reference.next_batch()) for _ in range(12)]

    first = PromptLoader(data, 6, 1, 2, seed=11)
    got = [indices(first.next_batch()) for _ in range(stop_after)]
    state = first.state_dict()
    assert set(state) == {"epoch", "index", "seed"}
    resumed = PromptLoader(data, 6, 1, 2, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(dict(state))
    got += [indices(resumed.next_batch()) for _ in range(12 - stop_after)]
    assert got == expected


def test_bad_configurations():
    data = make_items(10)
    with pytest.raises(ValueError, match="rollout_batch_size=6 must be a positive multiple of the data-parallel size 4"):
        PromptLoader(data, 6, 0, 4, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptLoader(data, 12, 0, 2, seed=0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        PromptLoader(data, 4, 2, 2, seed=0)
    loader = PromptLoader(data, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match="does not fit the training set"):
        loader.load_state_dict({"epoch": 0, "index": 50, "seed": 0})
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"epoch": 0})


def test_seed_mismatch_warns(caplog):
    loader = PromptLoader(make_items(10), 2, 0, 1, seed=1)
    with caplog.at_level(logging.WARNING, logger="megappo.data"):
        loader.load_state_dict({"epoch": 1, "index": 4, "seed": 2})
    assert "checkpoint's seed 2" in caplog.text
