#!/usr/bin/env python
"""Held-out accuracy of a saved policy (HF format), greedy, with the embedded engine.

    python tools/evaluate.py --config recipes/toy_liteppo_cpu.yaml --hf-dir runs/demo/hf/final [--data eval.jsonl] [overrides]

Prints one JSON line: {"accuracy": ..., "num_samples": ..., ...}. For a training
checkpoint, convert its actor first: tools/convert_megatron_to_hf.py --ckpt DIR --out HF_DIR.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's recipe (data, reward and rollout settings)")
    ap.add_argument("--hf-dir", required=True, help="HF model directory to evaluate")
    ap.add_argument("--data", default=None, help="held-out prompts (default: data.eval_path)")
    ap.add_argument("--max-samples", type=int, default=None)
    args, overrides = ap.parse_known_args(argv)
    from megappo.config import ConfigError, load_config
    from megappo.evaluation import evaluate_hf_dir

    try:
        cfg = load_config(args.config, [f"model.hf_path={args.hf_dir}", *overrides])
        result = evaluate_hf_dir(cfg, args.hf_dir, eval_path=args.data, max_samples=args.max_samples)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
