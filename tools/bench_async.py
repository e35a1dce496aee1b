#!/usr/bin/env python
"""Samples/s and busy fractions of the rollout modes (sync, one_step_off, async) on the demo
setup, as ratios against sync, on the demo's short responses and on a long-tailed mix.

    python tools/bench_async.py [--steps 30] [--warmup 5] [--nproc 1] [--disaggregated] [--out runs/bench_async]

One JSON line per (mix, placement, mode); the logic and the definitions are in
``megappo.toolkit.async_bench``.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="leading steps left out of the means")
    ap.add_argument("--nproc", type=int, default=1, help="trainer processes (1: the producer thread has a core of its own on 2 cores)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step (x 8 responses)")
    ap.add_argument("--disaggregated", action="store_true",
                    help="also run every mode with the engines on rollout ranks of their own (parallel.rollout_world_size)")
    ap.add_argument("--out", default="runs/bench_async")
    args = ap.parse_args(argv)
    from megappo.demo import RECIPE, prepare
    from megappo.toolkit.async_bench import bench

    bench(Path(args.out), prepare=prepare, recipe=RECIPE, steps=args.steps, warmup=args.warmup, nproc=args.nproc,
          prompts=args.prompts, disaggregated=args.disaggregated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
