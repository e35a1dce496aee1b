"""Convert an HF model directory into a Megatron distributed checkpoint (loadable at any
TP / PP: dist_checkpointing reshards on load), plus ``megappo_model.json`` (spec, HF
config, source directory); a reward model (``*ForSequenceClassification``) keeps its
``score`` head. Streams safetensors: memory stays near one copy of the model.

    python tools/convert_hf_to_megatron.py --hf-dir MODEL --out CKPT               # one process
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir MODEL --out CKPT --tp 2 --pp 2
    torchrun --nproc-per-node 2 tools/convert_hf_to_megatron.py --hf-dir MOE_MODEL --out CKPT --ep 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("auto", "float32", "bfloat16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (default 1)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (default 1)")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size of this run (mixture-of-experts models; default 1)")
    ap.add_argument("--dtype", choices=DTYPES, default="auto",
                    help="parameter dtype of the checkpoint (default auto: the dtype config.json declares, "
                         "bfloat16 or float32, so a bf16 model is not doubled in memory; else float32)")
    args = ap.parse_args(argv)

    import torch

    from megappo.toolkit.convert import convert_hf_to_megatron, quiet_fallback_warnings

    quiet_fallback_warnings()

    try:
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=dtype, ep=args.ep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
