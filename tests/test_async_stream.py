"""The rollout stream of the asynchronous modes, in one process with a fake rollout side:
staleness bounded by (and, under a slow trainer, reaching) ``max_staleness``; eta = 0 is the
synchronous order; a checkpoint taken while batches are generated ahead resumes with no
prompt skipped or trained twice."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from megappo.data.dataset import PromptItem
from megappo.data.loader import PromptLoader
from megappo.loop.rollout_stream import RolloutStream
from megappo.models.batch import TokenBatch
from megappo.rollout.batch import RolloutBatch, RolloutStats

LAYOUT = SimpleNamespace(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, vpp=None,
                         device=torch.device("cpu"))


@dataclass
class FakeSide:
    """The parts of ``RolloutSide`` the stream calls; generation takes ``gen_s`` seconds and
    records the engine's version (set by ``sync_weights``) and the prompts it was given."""

    data: PromptLoader
    gen_s: float = 0.01
    engine_version: int = 0

    def __post_init__(self):
        self.layout, self.rollout_cfg = LAYOUT, SimpleNamespace(server_timeout_s=10.0)
        self.generating = threading.Event()

    def generate_round(self, step, round_, prompts, *, policy_version, on_progress=None):
        assert policy_version == self.engine_version
        self.generating.set()
        time.sleep(self.gen_s)
        self.generating.clear()
        B = len(prompts)
        return RolloutBatch(
            tokens=TokenBatch(torch.zeros(B, 2, dtype=torch.long), torch.ones(B, dtype=torch.long), torch.ones(B, dtype=torch.long)),
            rollout_logprobs_BT=torch.zeros(B, 1), scores_B=torch.zeros(B), correct_B=torch.zeros(B, dtype=torch.bool),
            truncated_B=torch.zeros(B, dtype=torch.bool), group_ids_B=torch.arange(B),
            policy_version_B=torch.full((B,), policy_version), prompt_texts=[p.text for p in prompts], response_texts=[""] * B,
            stats=RolloutStats(),
        )

    def sample(self, step, *, policy_version):
        return self.generate_round(step, 1, self.data.next_batch(), policy_version=policy_version)

    def sync_weights(self, models):
        assert not self.generating.is_set(), "weights changed while the engine generated"
        self.engine_version += 1
        return None

    def release_memory(self):
        pass

    def evaluate(self):
        assert not self.generating.is_set()
        return {"eval/accuracy": 0.0}


def _loader():
    items = [PromptItem(prompt_ids=[i], text=f"p{i}", answer="", index=i) for i in range(40)]
    return PromptLoader(items, global_batch_size=4, dp_rank=0, dp_size=1, seed=3)


def _train(stream: RolloutStream, first: int, last: int, train_s: float = 0.0, save_at=None):
    """The trainer's side of the loop: take, 'train', sync. Returns the prompts and the
    staleness of each step, and the stream's state at ``save_at``."""
    prompts, stale, saved = [], [], None
    stream.start(first - 1)
    for step in range(first, last + 1):
        batch, metrics = stream.take(step)
        assert 0.0 < metrics["rollout/buffer_fill"] <= 1.0
        prompts.append(batch.prompt_texts)
        stale.append(int((step - 1 - batch.policy_version_B).max()))
        time.sleep(train_s)
        stream.sync_weights([], version=step)
        if step == save_at:
            saved = stream.state_dict()
    stream.close()
    return prompts, stale, saved


@pytest.mark.parametrize("mode,eta", [("one_step_off", 1), ("async", 2), ("async", 3)])
def test_staleness_bounded_and_reached_under_slow_trainer(mode, eta):
    side = FakeSide(_loader(), gen_s=0.01)
    _, stale, _ = _train(RolloutStream(side, mode=mode, max_staleness=eta), 1, 8, train_s=0.08)
    assert max(stale) == eta and min(stale) >= 0
    assert stale[eta:] == [eta] * (8 - eta)  # the producer runs ahead as far as the bound lets it


def test_fast_trainer_stays_fresh():
    side = FakeSide(_loader(), gen_s=0.05)
    _, stale, _ = _train(RolloutStream(side, mode="async", max_staleness=4), 1, 6, train_s=0.0)
    assert max(stale) <= 4 and stale[0] == 0


def test_eta_zero_is_sync():
    sync_prompts, sync_stale, _ = _train(RolloutStream(FakeSide(_loader()), mode="sync", max_staleness=0), 1, 6)
    prompts, stale, _ = _train(RolloutStream(FakeSide(_loader()), mode="async", max_staleness=0), 1, 6, train_s=0.02)
    assert prompts == sync_prompts and stale == sync_stale == [0] * 6


def test_evaluate_waits_for_the_batch_in_flight():
    side = FakeSide(_loader(), gen_s=0.05)
    stream = RolloutStream(side, mode="async", max_staleness=2)
    stream.start(0)
    stream.take(1)
    assert stream.evaluate() == {"eval/accuracy": 0.0}  # FakeSide.evaluate asserts the engine is idle
    stream.close()


@pytest.mark.parametrize("eta", [1, 3])
def test_resume_skips_and_repeats_no_prompt(eta):
    """Save at step 5 while the producer has drawn the prompts of later steps, drop the
    stream (as a kill would), restore a new one from the saved state: the prompts trained
    are those of an uninterrupted run, each once."""
    whole, _, _ = _train(RolloutStream(FakeSide(_loader()), mode="async", max_staleness=eta), 1, 12, train_s=0.03)
    first_side = FakeSide(_loader())
    first, _, saved = _train(RolloutStream(first_side, mode="async", max_staleness=eta), 1, 7, train_s=0.03, save_at=5)
    assert first_side.data.index > saved["index"]  # prompts were handed out beyond the checkpoint
    resumed_stream = RolloutStream(FakeSide(_loader(), engine_version=5), mode="async", max_staleness=eta)
    resumed_stream.load_state_dict(saved)
    rest, _, _ = _train(resumed_stream, 6, 12, train_s=0.03)
    trained = first[:5] + rest
    assert trained == whole
    flat = [p for batch in trained for p in batch]
    assert len(flat) == len(set(flat[:40])) + len(flat[40:])  # one epoch of 40 prompts: none twice within it
