"""Reward-model parity: the Megatron reward model at a TP / PP layout against transformers'
AutoModelForSequenceClassification on the same weights. Prints one JSON line (rank 0):

    {"compare": "megatron_rm_vs_transformers", "max_abs_diff": ..., "mean_abs_diff": ..., ...}

    python tools/compare_reward_model.py --hf-dir REWARD_MODEL
    torchrun --nproc-per-node 2 tools/compare_reward_model.py --hf-dir REWARD_MODEL --tp 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF *ForSequenceClassification directory (one label)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--num-seqs", type=int, default=6, help="random sequences of varied lengths")
    ap.add_argument("--seq-len", type=int, default=24, help="the longest sequence")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from megappo.toolkit.compare_reward_model import compare_reward_model

    try:
        rows = compare_reward_model(args.hf_dir, tp=args.tp, pp=args.pp, num_seqs=args.num_seqs, seq_len=args.seq_len, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
