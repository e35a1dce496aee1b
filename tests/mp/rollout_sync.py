"""Weight sync from a Megatron actor into the embedded engine at one layout, run by
tests/test_rollout_weight_sync.py under ``torchrun --nproc-per-node 2`` (TP=2 or PP=2).

  1. A tiny HF model is loaded into a Megatron actor (``load_hf_into_model``).
  2. ``sync_weights`` into a fresh embedded engine with a small and a huge bucket: the
     checksum of what arrived equals the engine's and the HF files'; the peak bucket.
  3. ``generate_in_group`` (sampled, n=2); the actor scores the same sequences with
     ``forward_logprobs`` at the same temperature: max |trainer - rollout| and the PPO ratio.
  4. The two bucket sizes give the same samples; ``iter_hf_tensors(dst=0)`` (the sync's
     gather) yields the all-gather's tensors bit for bit on TP rank 0, nothing elsewhere.
  5. An engine that fails half-way through a sync: the holder raises its error, every
     other rank a RolloutEngineError quoting it (no hang), and the next sync works.
  6. PP > 1 only: bytes in flight from the sending stage. The holder's engine is slowed
     down (it sleeps per bucket); the sender time-stamps each tensor it gathers, the engine
     each tensor it takes; the peak of (gathered - taken) bytes of the sending stage must
     stay about one bucket per side, not the whole stage. gloo's send blocks until the
     peer receives, NCCL's does not: the sender's ``dist.send`` is swapped for ``isend``
     here (works kept until the end), so the test sees what NCCL would do.

Rank 0 writes OUT (JSON) for pytest to assert on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_fixtures import make_tiny_hf_model, read_config, read_hf_state  # noqa: E402

from megappo.config.schema import RolloutConfig  # noqa: E402
from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings, TokenBatch  # noqa: E402
from megappo.parallel import destroy_parallel, init_parallel  # noqa: E402
from megappo.rollout import (  # noqa: E402
    RolloutEngineError,
    SamplingParams,
    build_engine,
    checksum_of,
    checksums_match,
    generate_in_group,
    sync_weights,
)
from megappo.weights import iter_hf_tensors, load_hf_into_model  # noqa: E402

TEMP = 0.8
PROMPTS = [[5, 6, 7, 8, 9, 10], [12, 13], [3, 4, 3, 4, 3, 30, 31, 32], [40]]


def token_batch(prompts, groups) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response rows, rollout log-probs [B, T] and the mask."""
    rows = [(p, s) for p, group in zip(prompts, groups) for s in group]
    S = max(len(p) + len(s.token_ids) for p, s in rows)
    T = max(len(s.token_ids) for _, s in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    lp = torch.zeros(len(rows), T)
    mask = torch.zeros(len(rows), T)
    for b, (p, s) in enumerate(rows):
        seq = list(p) + s.token_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        lp[b, : len(s.token_ids)] = torch.tensor(s.logprobs)
        mask[b, : len(s.token_ids)] = 1
    batch = TokenBatch(ids, torch.tensor([len(p) for p, _ in rows]), torch.tensor([len(s.token_ids) for _, s in rows]))
    return batch, lp, mask


class FailOnce:
    """Wraps an engine's update_weights to fail after the first bucket, once."""

    def __init__(self, engine):
        self.engine, self.original = engine, engine.update_weights

    def __call__(self, buckets):
        self.engine.update_weights = self.original
        next(iter(buckets))
        raise RolloutEngineError(f"{self.engine.name}: injected failure after one bucket")


def bytes_in_flight(actor, engine, layout, *, bucket_mb: float) -> dict:
    """Phase 6: peak bytes of the sending stages gathered but not yet taken by the engine."""
    import megappo.rollout.weight_sync as weights  # the name the sync calls

    gathered, taken = [], []
    original_iter = weights.iter_hf_tensors

    def timed(models, **kw):
        for name, t in original_iter(models, **kw):
            gathered.append((time.time(), name, t.numel() * t.element_size()))
            yield name, t

    weights.iter_hf_tensors = timed
    c10d = dist.distributed_c10d  # send_object_list calls c10d's own ``send``
    original_send, pending = c10d.send, []

    def nonblocking_send(tensor, dst=None, group=None, tag=0, **kw):
        pending.append(dist.isend(tensor, dst, group=group, tag=tag, **kw))

    if layout.pp_rank > 0:
        dist.send = c10d.send = nonblocking_send
    if engine is not None:
        original_update = engine.update_weights

        def slow(buckets):
            def paced():
                for bucket in buckets:
                    time.sleep(0.03)
                    now = time.time()
                    taken.extend((now, name) for name, _ in bucket)
                    yield bucket
            return original_update(paced())

        engine.update_weights = slow
    try:
        sync_weights(actor.models, engine, layout, bucket_mb=bucket_mb)
    finally:
        weights.iter_hf_tensors = original_iter
        dist.send = c10d.send = original_send
        for work in pending:
            work.wait()
        if engine is not None:
            engine.update_weights = original_update
    every = [None] * layout.world_size
    dist.all_gather_object(every, (layout.pp_rank, layout.tp_rank, gathered, taken))
    sent = [g for pp_rank, tp_rank, gs, _ in every if pp_rank > 0 and tp_rank == 0 for g in gs]
    took = {name: t for _, _, _, ts in every for t, name in ts}
    events = sorted([(t, 1, n) for t, _, n in sent] + [(took[name], 0, -n) for _, name, n in sent])
    live = peak = 0
    for _, _, n in events:  # at equal times the take (0) sorts before the gather (1)
        live += n
        peak = max(peak, live)
    return dict(peak_bytes=peak, stage_bytes=sum(n for _, _, n in sent), bucket_bytes=int(bucket_mb * 2**20),
                largest_tensor_bytes=max(n for _, _, n in sent), num_tensors=len(sent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--family", default="qwen2")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    layout = init_parallel(args.tp, args.pp, seed=3, device="cpu")
    hf_dir = Path(args.workdir) / f"{args.family}-{args.tie}"
    if layout.rank == 0:
        make_tiny_hf_model(args.workdir, args.family, tie=args.tie, layers=4, vocab=103, name=hf_dir.name)
    dist.barrier()
    hf_config = read_config(hf_dir)
    spec = ModelSpec.from_hf_config(hf_config)
    actor = MegatronPolicy(spec, "actor", BuildOptions(tp=args.tp, pp=args.pp), OptimizerSettings(lr=1e-4), max_tokens_per_microbatch=10_000)
    load_hf_into_model(actor.models, hf_dir)
    rollout = RolloutConfig(engine="embedded", device="cpu")
    res: dict = {"layout": dict(tp=layout.tp, pp=layout.pp, dp=layout.dp)}
    params = SamplingParams(n=2, temperature=TEMP, max_new_tokens=12, seed=17)
    hf_checksum = checksum_of(read_hf_state(hf_dir).items())

    # Gathering to TP rank 0 only (what the sync does) gives the all-gather's tensors, bit for bit.
    everywhere = dict(iter_hf_tensors(actor.models))
    to_first = dict(iter_hf_tensors(actor.models, dst=0))
    if layout.tp_rank == 0:
        res["gather_to_rank0_bitwise_equal"] = list(to_first) == list(everywhere) and all(
            torch.equal(to_first[n], everywhere[n]) for n in everywhere)
    else:
        assert to_first == {}, "a TP rank other than dst receives nothing"

    samples_by_bucket = {}
    for bucket_mb in (0.02, 1000.0):
        engine = build_engine(rollout, hf_config=hf_config, hf_dir=None, layout=layout, eos_token_ids=[2])
        stats = sync_weights(actor.models, engine, layout, bucket_mb=bucket_mb, checksum=True)
        key = f"bucket{bucket_mb:g}"
        if engine is not None:
            res[key] = dict(
                bytes=stats.bytes, num_buckets=stats.num_buckets, peak_bucket_bytes=stats.peak_bucket_bytes,
                checksum_matches_engine=checksums_match(stats.checksum, engine.weights_checksum()),
                checksum_matches_hf_files=checksums_match(stats.checksum, hf_checksum), gbps=stats.gbps,
            )
        groups = generate_in_group(engine, PROMPTS, params, layout)
        samples_by_bucket[bucket_mb] = groups
        batch, rollout_lp, mask = token_batch(PROMPTS, groups)
        trainer_lp = actor.forward_logprobs(batch, temperature=TEMP)["logprobs_BT"]
        diff = (trainer_lp - rollout_lp).abs()[mask.bool()].max()
        ratio = (torch.exp(trainer_lp - rollout_lp) - 1).abs()[mask.bool()].max()
        for t in (diff, ratio):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res.setdefault(key, {}).update(max_logprob_diff=diff.item(), max_ratio_minus_1=ratio.item(), tokens=int(mask.sum()))
        if engine is not None and bucket_mb == 1000.0:
            engine.update_weights = FailOnce(engine)
        final_engine = engine
    res["same_samples_across_bucket_sizes"] = samples_by_bucket[0.02] == samples_by_bucket[1000.0]

    # The failing sync (armed above on the holder): every rank raises.
    try:
        sync_weights(actor.models, final_engine, layout, bucket_mb=0.02)
        outcome = "returned"
    except RolloutEngineError as e:
        outcome = f"raised: {e}"
    outcomes = [None] * layout.world_size
    dist.all_gather_object(outcomes, outcome)
    res["failing_sync_outcomes"] = outcomes
    stats = sync_weights(actor.models, final_engine, layout, bucket_mb=0.02, checksum=True)
    res["after_failure_checksum_ok"] = final_engine is None or checksums_match(stats.checksum, hf_checksum)
    if layout.pp > 1:
        res["in_flight"] = bytes_in_flight(actor, final_engine, layout, bucket_mb=0.004)
    if layout.rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
