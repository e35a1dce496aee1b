"""Partial rollouts (``megappo.rollout.partial``) on the embedded engine: responses that
weight updates interrupt hold tokens of two or three policy versions, and each token's
log-prob is that of the weights that sampled it: teacher-forced log-probs of the 'trainer'
(a ``transformers`` model, the slow reference) with the old weights before the update,
with the new weights after it.

The updates fall at chosen points: a forward hook on the engine's model stops the decoding
thread at its k-th forward pass until the test has aborted the requests, so an update lands
inside a chunk being decoded and before a chunk that has not started (``max_batch_rows``)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_rollout_embedded import hf_tensors, make_trainer_model, teacher_forced

from megappo.rollout import SamplingParams
from megappo.rollout.embedded import EmbeddedEngine
from megappo.rollout.engine import Sample
from megappo.rollout.partial import _extend, generate_across_updates
from megappo.rollout.weight_sync import stream_to_engine

PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [3, 4, 3, 4, 3, 40]]
TOL = 1e-4  # the engine's cached decoding against one teacher-forced pass, fp32 (as test_rollout_embedded)


class Updater:
    """The trainer's side: at the engine's ``at[u]``-th forward pass (counted from the start,
    or from the previous update) abort the requests, then load weights ``models[u + 1]``
    when the generating thread waits for them (``await_update``)."""

    def __init__(self, engine, models, at):
        self.engine, self.models, self.at = engine, models, list(at)
        self.forwards, self.version = 0, 0
        self.reached, self.aborted = threading.Event(), threading.Event()
        self.waiting, self.loaded = threading.Event(), threading.Event()
        engine.model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):  # in the generating thread
        self.forwards += 1
        if self.at and self.forwards == self.at[0]:
            self.reached.set()
            assert self.aborted.wait(60)

    def await_update(self) -> int:  # in the generating thread, once per interruption
        self.waiting.set()
        assert self.loaded.wait(60)
        self.loaded.clear()
        return self.version

    def run(self) -> None:  # in the test's thread
        while self.at:
            assert self.reached.wait(60), "generation never reached the update point"
            self.reached.clear()
            self.engine.abort_requests()
            self.at.pop(0)
            self.forwards = 0
            self.aborted.set()
            assert self.waiting.wait(60), "the generating thread never waited for the update"
            self.waiting.clear()
            self.aborted.clear()
            self.version += 1
            stream_to_engine(hf_tensors(self.models[self.version]), self.engine, bucket_mb=0.05)
            self.loaded.set()


@pytest.fixture(scope="module")
def trainers():
    """Three weight versions of one tiny model (the trainer's policy 0, 1, 2)."""
    out = [make_trainer_model("llama", seed=s) for s in (0, 1, 2)]
    return out[0][0], [m for _, m in out]


def test_a_response_spanning_updates_has_the_logprobs_of_each_version(trainers):
    cfg, models = trainers
    engine = EmbeddedEngine(cfg, eos_token_ids=[], max_batch_rows=4)  # 2 prompts x 2 samples per chunk
    stream_to_engine(hf_tensors(models[0]), engine, bucket_mb=0.05)
    updater = Updater(engine, models, at=[10, 10])  # 10 tokens into chunk 1, then 10 into the first continuation
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=11)
    box = {}
    t = threading.Thread(target=lambda: box.update(value=generate_across_updates(
        engine, PROMPTS, params, version=0, await_update=updater.await_update)), daemon=True)
    t.start()
    updater.run()
    t.join(120)
    assert not t.is_alive() and "value" in box, "generation did not finish"
    samples = box["value"]

    versions_seen = set()
    for prompt, group in zip(PROMPTS, samples):
        assert len(group) == 2
        for s in group:
            assert s.finish_reason == "length" and len(s.token_ids) == 40  # no stop ids: every response runs to the limit
            assert len(s.token_versions) == 40 and s.token_versions == sorted(s.token_versions)
            versions_seen.update(s.token_versions)
            by_version = {v: teacher_forced(models[v], prompt, s.token_ids, 1.0) for v in set(s.token_versions)}
            lp = torch.tensor(s.logprobs)
            for v, reference in by_version.items():
                mine = torch.tensor(s.token_versions) == v
                assert (lp[mine] - reference[mine]).abs().max() < TOL, (v, s.token_versions)
                for other in set(range(3)) - {v}:  # the check tells the versions apart
                    assert (teacher_forced(models[other], prompt, s.token_ids, 1.0)[mine] - reference[mine]).abs().max() > 100 * TOL
    assert versions_seen == {0, 1, 2}
    # Chunk 1 (prompts 0, 1): 10 tokens, update, 10 tokens, update, the rest. Prompt 2's chunk
    # started neither before the first update nor, in the continuation, before the second.
    assert [s.token_versions for g in samples[:2] for s in g] == [[0] * 10 + [1] * 10 + [2] * 20] * 4
    assert [s.token_versions for s in samples[2]] == [[2] * 40] * 2


def test_uninterrupted_generation_is_the_engines_own(trainers):
    cfg, models = trainers
    engine = EmbeddedEngine(cfg, eos_token_ids=[2])
    stream_to_engine(hf_tensors(models[0]), engine, bucket_mb=0.05)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=4)
    calls = []
    samples = generate_across_updates(engine, PROMPTS, params, version=7, await_update=lambda: calls.append(1) or 8)
    plain = engine.generate(PROMPTS, params)
    assert not calls
    assert [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in samples] == \
        [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in plain]
    assert all(s.token_versions == [7] * len(s.token_ids) for g in samples for s in g)


def test_a_continuation_is_cut_to_the_tokens_left():
    prefix = Sample([1, 2], [-0.1, -0.2], "abort", [3, 3])
    stop = Sample([5, 2], [-0.5, -0.6], "stop")
    assert _extend(prefix, stop, 4, budget=2) == Sample([1, 2, 5, 2], [-0.1, -0.2, -0.5, -0.6], "stop", [3, 3, 4, 4])
    assert _extend(prefix, stop, 4, budget=1) == Sample([1, 2, 5], [-0.1, -0.2, -0.5], "length", [3, 3, 4])
    again = Sample([7], [-0.7], "abort")
    assert _extend(prefix, again, 4, budget=5).finish_reason == "abort"  # interrupted again: resubmitted later
    assert _extend(prefix, again, 4, budget=1).finish_reason == "length"


def _batch(samples_per_prompt, policy_version):
    from megappo.rollout.batch import RolloutBatch, RolloutStats

    B = sum(len(g) for g in samples_per_prompt)
    return RolloutBatch.from_samples(
        [[9, 9]] * len(samples_per_prompt), samples_per_prompt, scores=[0.0] * B, correct=[False] * B,
        prompt_texts=["p"] * len(samples_per_prompt), response_texts=[""] * B, first_group_id=0,
        policy_version=policy_version, stats=RolloutStats())


def test_token_versions_reach_the_batch_metrics_and_the_stale_token_mask():
    """Per-token versions through ``RolloutBatch`` (from samples, selection, concatenation
    with a batch without them), against a loop over tokens: the staleness metrics and
    ``algo.stale_token_mask``."""
    from megappo import algo
    from megappo.loop.rollout_metrics import rollout_metrics
    from megappo.rollout.batch import RolloutBatch, RolloutStats

    partial = _batch([[Sample([1, 2, 3], [-1.0] * 3, "length", [4, 4, 5]), Sample([1], [-1.0], "stop", [5])]], 4)
    plain = _batch([[Sample([7, 7, 7, 7], [-1.0] * 4, "length")]], 3)
    assert partial.policy_version_B.tolist() == [4, 5]  # a response's version: its oldest token's
    assert partial.token_versions_BT.tolist() == [[4, 4, 5], [5, 5, 5]]  # padding: the row's version
    both = RolloutBatch.concat([partial, plain], stats=RolloutStats())
    assert both.versions_BT().tolist() == [[4, 4, 5, 4], [5, 5, 5, 5], [3, 3, 3, 3]]
    assert both.select(torch.tensor([2, 0])).versions_BT().tolist() == [[3, 3, 3, 3], [4, 4, 5, 4]]

    trained = 5
    tokens = [(v, m) for row_v, row_m in zip(both.versions_BT().tolist(), both.mask_BT.tolist()) for v, m in zip(row_v, row_m)]
    off = sum(1 for v, m in tokens if m and v < trained) / sum(m for _, m in tokens)
    both.old_logprobs_BT = both.rollout_logprobs_BT.clone()  # the trainer's recompute (not what this test checks)
    metrics = rollout_metrics(both, reduce=lambda x, op: x, dynamic_sampling=False, trained_version=trained)
    assert metrics["rollout/off_policy_token_frac"] == pytest.approx(off) and off == 6 / 8
    assert metrics["rollout/partial_frac"] == pytest.approx(1 / 3)
    assert metrics["rollout/staleness_max"] == 2 and metrics["rollout/staleness_mean"] == pytest.approx((1 + 0 + 2) / 3)
    kept = algo.stale_token_mask(both.mask_BT, both.versions_BT(), trained, max_lag=0).tolist()
    assert kept == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_partial_rollout_needs_an_asynchronous_mode():
    from megappo.config import ConfigError, load_config

    base = ["rollout.num_return_sequences_in_group=2", "rollout.partial_rollout=true"]
    with pytest.raises(ConfigError, match="rollout.partial_rollout=true needs rollout.mode"):
        load_config(None, [*base, "rollout.mode=sync"])
    assert load_config(None, [*base, "rollout.mode=async"]).rollout.partial_rollout
