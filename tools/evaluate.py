#!/usr/bin/env python
"""Held-out accuracy of a saved policy, greedy, with the embedded engine.

    python tools/evaluate.py --config recipes/toy_liteppo_cpu.yaml --hf-dir runs/demo/hf/final [--data eval.jsonl] [overrides]
    python tools/evaluate.py --config recipes/toy_liteppo_cpu.yaml --ckpt runs/demo/checkpoints [--data eval.jsonl]

``--hf-dir``: an HF model directory. ``--ckpt``: a training checkpoint (``step_N``, or a
checkpoint directory for its ``latest``), whose actor is exported to a temporary HF
directory first (the tokenizer and config come from the recipe's ``model.hf_path``).
Prints one JSON line: {"accuracy": ..., "num_samples": ..., ...}.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's recipe (data, reward and rollout settings)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="HF model directory to evaluate")
    src.add_argument("--ckpt", help="training checkpoint (step_N or its directory) whose actor to evaluate")
    ap.add_argument("--data", default=None, help="held-out prompts (default: data.eval_path)")
    ap.add_argument("--max-samples", type=int, default=None)
    args, overrides = ap.parse_known_args(argv)
    from megappo.config import ConfigError, load_config
    from megappo.toolkit.evaluation import evaluate_hf_dir

    try:
        if args.hf_dir is not None:
            cfg = load_config(args.config, [f"model.hf_path={args.hf_dir}", *overrides])
            result = evaluate_hf_dir(cfg, args.hf_dir, eval_path=args.data, max_samples=args.max_samples)
        else:
            import tempfile

            from megappo.toolkit.convert import convert_megatron_to_hf

            cfg = load_config(args.config, overrides)
            with tempfile.TemporaryDirectory(prefix="megappo-eval-") as tmp:
                hf_dir = f"{tmp}/actor"
                convert_megatron_to_hf(args.ckpt, hf_dir, hf_config_dir=cfg.model.hf_path)
                result = evaluate_hf_dir(cfg, hf_dir, eval_path=args.data, max_samples=args.max_samples)
            result["checkpoint"] = args.ckpt
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
