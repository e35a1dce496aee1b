"""Rollout failures reach every rank, run by tests/test_rollout_errors.py under
``torchrun --nproc-per-node 2`` (gloo, CPU). The engine is a real embedded engine (random
weights); failures are injected into its model, the reward function or the data.

  TP=2 (one replica; rank 1 has no engine):
    ok            the replica's ranks get the same experience; rank 1's cursor moves too
    generate      the engine's forward raises on rank 0
    reward        the reward function raises on rank 0
    evaluate      evaluation's generation raises on rank 0
  DP=2 (two replicas, each rank an engine holder):
    replica1      rank 1's engine raises, rank 0's works
    round2        dynamic sampling: rank 0's engine raises in the second round only

Each case records, per rank, "ok", or the exception's type and message and the seconds it
took; process groups time out after 60 s, so a hang shows up as a timeout error instead
of the test's own timeout. Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_fixtures import tiny_hf_config  # noqa: E402

from megappo.config import Config  # noqa: E402
from megappo.data.dataset import PromptItem  # noqa: E402
from megappo.data.rewards import RewardResult  # noqa: E402
from megappo.parallel import destroy_parallel, init_parallel  # noqa: E402
from megappo.rollout import build_engine  # noqa: E402
from megappo.loop.rollout_side import RolloutSide  # noqa: E402
from megappo.metrics import progress  # noqa: E402


class Data:
    """``next_batch``: 2 prompts per call, counted."""

    def __init__(self):
        self.calls = 0

    def next_batch(self):
        self.calls += 1
        return [PromptItem([5 + self.calls, 6, 7], "1", i, "p") for i in range(2)]


class Reward:
    """Scores alternate 0 / 1 within a group, or raise when ``broken``."""

    broken = False

    def score(self, texts, answers, prompts):
        if self.broken:
            raise RuntimeError("reward pool died")
        scores = [float(i % 2) for i in range(len(texts))]
        return RewardResult(scores, [s > 0 for s in scores], 0, 0)


class Tokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def components(layout, cfg, *, dynamic: bool = False, max_rounds: int = 1) -> RolloutSide:
    hf_config = tiny_hf_config("llama")
    engine = build_engine(cfg.rollout, hf_config=hf_config, hf_dir=None, layout=layout, eos_token_ids=[2])
    if engine is not None:  # any weights will do: load the engine's own (uninitialized) ones
        with torch.no_grad():
            for p in engine.model.parameters():
                p.normal_(0, 0.05)
        engine.update_weights([list(engine.model.named_parameters())])
    items = [PromptItem([3, 4, 5], "1", i, "p") for i in range(4)]
    return RolloutSide(layout, cfg.rollout, Data(), Tokenizer(), engine, Reward() if engine else None, items,
                       dynamic_sampling=dynamic, max_sampling_rounds=max_rounds,
                       progress=lambda items, desc, leave=True: progress(items, desc, rank=layout.rank, leave=leave))


def break_engine(c: RolloutSide, after_calls: int = 0):
    """From its ``after_calls + 1``-th ``generate`` on, the engine's model raises."""
    if c.engine is None:
        return
    engine, calls = c.engine, [0]
    generate = engine.generate

    def forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after_calls:
            engine.model.forward = forward
        return generate(*args, **kwargs)

    engine.generate = counting


def attempt(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except Exception as e:  # noqa: BLE001 - recorded
        outcome = f"{type(e).__name__}: {e}"
    return {"outcome": outcome, "seconds": round(time.perf_counter() - t0, 2)}


def gather(case: dict) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, case)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res: dict = {}
    base = Config()
    cfg = dataclasses.replace(
        base,
        rollout=dataclasses.replace(base.rollout, engine="embedded", device="cpu", num_return_sequences_in_group=2, response_length=3),
        logging=dataclasses.replace(base.logging, progress_bar=True),
    )

    layout = init_parallel(2, 1, device="cpu", timeout_minutes=1)
    c = components(layout, cfg)
    exp = c.sample(1, policy_version=0)
    res["ok"] = gather({"ids": exp.tokens.input_ids_BS.tolist(), "cursor": c.data.calls, "evaluate": c.evaluate()})
    if c.reward_fn is not None:
        c.reward_fn.broken = True
    res["reward"] = gather(attempt(lambda: c.sample(2, policy_version=1)))
    if c.reward_fn is not None:
        c.reward_fn.broken = False
    break_engine(c)
    res["generate"] = gather(attempt(lambda: c.sample(3, policy_version=2)))
    res["evaluate"] = gather(attempt(c.evaluate))
    destroy_parallel(keep_process_group=True)

    layout = init_parallel(1, 1, device="cpu", timeout_minutes=1)
    c = components(layout, cfg)
    if layout.rank == 1:
        break_engine(c)
    res["replica1"] = gather(attempt(lambda: c.sample(1, policy_version=0)))
    c = components(layout, cfg, dynamic=True, max_rounds=3)
    c.reward_fn.score = lambda texts, *a: RewardResult([0.0] * len(texts), [False] * len(texts), 0, 0)  # all groups dropped
    if layout.rank == 0:
        break_engine(c, after_calls=1)  # in the second round
    res["round2"] = gather(attempt(lambda: c.sample(1, policy_version=0)))
    res["round2_cursor"] = gather(c.data.calls)

    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(res, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
