#!/usr/bin/env python
"""Where an RL step's time goes, on the demo setup: one measured run, printed as fractions.

    python tools/bench_step.py [--steps 20] [--out runs/bench_step] [overrides ...]

Builds the demo's warmed-up tiny model and toy data (``megappo.demo.prepare``), trains
``--steps`` LitePPO steps under torchrun (2 processes, as the demo) with ``recipes/toy_liteppo_cpu.yaml``, skips the
first steps (start-up effects), and prints the mean seconds of each phase and its fraction
of the step (rollout includes reward scoring, which is also shown on its own), so the next
bottleneck is visible.
"""

import argparse
import json
import sys
from pathlib import Path

PHASES = ("time/rollout", "time/reward", "time/logprobs", "time/train", "time/sync")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="leading steps left out of the means")
    ap.add_argument("--out", default="runs/bench_step")
    args, overrides = ap.parse_known_args(argv)
    from megappo.demo import prepare, train

    out = Path(args.out)
    paths = prepare(out, seed=1234, sft_steps=50)
    for stale in (out / "metrics.jsonl", out / "checkpoints"):
        if stale.is_file():
            stale.unlink()
        elif stale.is_dir():
            import shutil

            shutil.rmtree(stale)
    code = train(paths, out, steps=args.steps,
                 extra=["train.eval_every=0", "checkpoint.save_every=0", "checkpoint.save_hf_at_end=false", *overrides])
    if code != 0:
        return code
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()][args.warmup:]
    step = sum(r["time/step"] for r in rows) / len(rows)
    print(f"RL step on the demo setup: {step * 1000:.0f} ms mean over {len(rows)} steps "
          f"({sum(r['perf/tokens_per_s'] for r in rows) / len(rows):.0f} tokens/s)")
    accounted = 0.0
    for phase in PHASES:
        sec = sum(r.get(phase, 0.0) for r in rows) / len(rows)
        if phase != "time/reward":
            accounted += sec
        note = " (inside rollout)" if phase == "time/reward" else ""
        print(f"  {phase[5:]:<9} {sec * 1000:8.1f} ms  {sec / step:6.1%}{note}")
    print(f"  {'other':<9} {(step - accounted) * 1000:8.1f} ms  {(step - accounted) / step:6.1%}  (advantages, metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
