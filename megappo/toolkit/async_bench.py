"""Throughput of the rollout modes on the demo setup (``tools/bench_async.py``).

One call trains the demo's warmed-up tiny model for a few steps in each of ``sync``,
``one_step_off`` and ``async`` (every run from the same start), on two response-length mixes:

- ``short``: the demo's task as it is (answers of 1-2 digits, at most 4 tokens);
- ``long_tail``: the same model sampled at a high temperature with room for 48 tokens, so most
  responses stop after a few tokens and a few run on to the limit (a long-tailed mix, measured
  by ``response_length/mean`` and ``/max``); the engine's batch takes as long as its longest row.

Per run, from ``metrics.jsonl`` after ``warmup`` steps: samples/s (responses trained per second
of step time), the trainer's busy fraction (the step's time not spent waiting for a batch or
for the engine before a weight sync) and the rollout's busy fraction (generation seconds per
step second; above 1 - trainer's busy fraction means generation overlapped training), each
also as a ratio against colocated ``sync`` of the same mix.

``disaggregated``: each mode also with the engines on rollout ranks of their own
(``parallel.rollout_world_size`` = the trainer processes, so twice as many processes): the
engine then generates in another process, on a core the trainer's ops do not hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

MODES = (("sync", []), ("one_step_off", ["rollout.mode=one_step_off"]),
         ("async", ["rollout.mode=async", "rollout.max_staleness=2"]))
MIXES = (("short", []), ("long_tail", ["rollout.temperature=1.6", "rollout.response_length=48"]))


def run_mode(paths: dict, run_dir: Path, overrides: list[str], *, recipe: Path, steps: int, nproc: int) -> list[dict]:
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "megappo.train", "--config", str(recipe), f"model.hf_path={paths['model']}",
           f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}", f"train.run_dir={run_dir}",
           f"train.steps={steps}", "train.eval_every=0", "checkpoint.save_every=0", "checkpoint.save_hf_at_end=false",
           "logging.progress_bar=false", "logging.tensorboard=false", "algo.policy_loss=decoupled", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(rows: list[dict], *, warmup: int, samples_per_step: int) -> dict[str, float]:
    rows = [r for r in rows if r["step"] > warmup]
    total = sum(r["time/step"] for r in rows)
    waits = sum(r["time/rollout_wait"] + r["time/sync_wait"] for r in rows)
    return {
        "samples_per_s": samples_per_step * len(rows) / total,
        "trainer_busy": 1.0 - waits / total,
        "rollout_busy": sum(r["time/generate"] for r in rows) / total,
        "staleness_mean": sum(r["rollout/staleness_mean"] for r in rows) / len(rows),
        "response_length_mean": sum(r["response_length/mean"] for r in rows) / len(rows),
        "response_length_max": max(r["response_length/max"] for r in rows),
    }


def bench(out: Path, *, prepare: Callable[..., dict], recipe: Path, steps: int, warmup: int, nproc: int,
          prompts: int, disaggregated: bool = False) -> list[dict]:
    """``prepare`` and ``recipe``: the demo's (``megappo.demo``), passed in by the tool (the demo
    imports this package, so this module does not import it back)."""
    paths = prepare(out / "demo", seed=1234, sft_steps=100)
    samples = prompts * 8
    results = []
    placements = [("colocated", [], nproc)] + ([("disaggregated", [f"parallel.rollout_world_size={nproc}"], 2 * nproc)]
                                               if disaggregated else [])
    for mix, mix_overrides in MIXES:
        base = None
        for placement, placement_overrides, world in placements:
            for mode, mode_overrides in MODES:
                rows = run_mode(paths, out / f"{mix}_{placement}_{mode}",
                                [f"train.rollout_batch_size={prompts}", f"train.mini_batch_size={prompts // 4}", *mix_overrides,
                                 *mode_overrides, *placement_overrides], recipe=recipe, steps=steps, nproc=world)
                s = summarize(rows, warmup=warmup, samples_per_step=samples)
                base = base or s
                s |= {f"{k}_vs_sync": s[k] / base[k] for k in ("samples_per_s", "trainer_busy", "rollout_busy")}
                results.append({"mix": mix, "placement": placement, "mode": mode, **{k: round(v, 4) for k, v in s.items()}})
                print(json.dumps(results[-1]), flush=True)
    return results
