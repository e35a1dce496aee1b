"""Log-prob parity between transformers, the Megatron actor at a TP / PP layout, and the
rollout engine after a weight sync. Prints one JSON line per comparison (rank 0):

    {"compare": "megatron_vs_hf", "max_abs_diff": ..., "mean_abs_diff": ..., ...}
    {"compare": "engine_vs_megatron", "max_abs_diff": ..., "mean_abs_diff": ..., ...}
    {"compare": "weights_checksum", "trainer": ..., "engine": ..., "match": true, "scope": "all", ...}

The checksum line compares what the weight sync sent with what the engine reads back from
the weights it holds ("scope": "all", or the few tensors an SGLang engine spot-checks).

    torchrun --nproc-per-node 2 tools/compare_logprobs.py --hf-dir MODEL --tp 2 --pp 1
    torchrun --nproc-per-node 2 tools/compare_logprobs.py --hf-dir MOE_MODEL --ep 2
    python tools/compare_logprobs.py --hf-dir MODEL --ckpt CONVERTED_CKPT --token-ids "1,5,9,2;3,3,7,8"
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


def parse_token_ids(text: str) -> list[list[int]]:
    """``"1,5,9;3,3,7"`` -> ``[[1, 5, 9], [3, 3, 7]]``."""
    try:
        return [[int(t) for t in seq.split(",")] for seq in text.split(";") if seq.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--token-ids must look like '1,5,9;3,3,7', got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model directory: the reference weights (and config)")
    ap.add_argument("--ckpt", default=None, help="load the actor from this Megatron checkpoint instead of --hf-dir")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixture-of-experts models)")
    ap.add_argument("--num-seqs", type=int, default=4, help="random sequences (ignored with --token-ids)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-ids", type=parse_token_ids, default=None, help="sequences as '1,5,9;3,3,7' (equal lengths)")
    ap.add_argument("--engine", default="embedded", help="rollout engine to check after a weight sync; 'none' skips it")
    ap.add_argument("--gen-tokens", type=int, default=8, help="tokens the engine decodes greedily per sequence")
    args = ap.parse_args(argv)
    if args.engine == "sglang" and argv is None:  # after `make test`, SGLang on CPU lives in .venv-sglang
        from megappo.parallel.sglang_cpu import run_in_sglang_environment

        run_in_sglang_environment(__file__, sys.argv[1:])

    from megappo.toolkit.compare import compare_logprobs

    try:
        rows = compare_logprobs(
            args.hf_dir,
            ckpt=args.ckpt,
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            num_seqs=args.num_seqs,
            seq_len=args.seq_len,
            seed=args.seed,
            token_ids=args.token_ids,
            engine=None if args.engine == "none" else args.engine,
            gen_tokens=args.gen_tokens,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
