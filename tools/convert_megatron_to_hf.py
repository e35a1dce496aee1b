"""Export a Megatron checkpoint as an HF model directory (safetensors shards, index,
config.json, generation config and tokenizer files) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

--ckpt takes a model checkpoint of tools/convert_hf_to_megatron.py, a training checkpoint
``step_N`` (its actor), or a checkpoint directory (its ``latest``). A reward model (a model
checkpoint of role ``reward``, or a ``megappo.train_rm`` checkpoint) exports as the family's
``*ForSequenceClassification``.

    python tools/convert_megatron_to_hf.py --ckpt runs/x/checkpoints --out runs/x/hf
    python tools/convert_megatron_to_hf.py --ckpt CKPT --out OUT --hf-config ORIGINAL_MODEL_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model checkpoint, training checkpoint step_N, or checkpoint directory")
    ap.add_argument("--out", required=True,
                    help="output HF directory, replaced atomically; an existing one must be an earlier HF export "
                         "(else pass --overwrite), and never the checkpoint or a directory inside it")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an earlier HF export")
    ap.add_argument("--hf-config", default=None, metavar="DIR", help="HF directory whose config.json and tokenizer to use")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="saved dtype; auto: the HF config's")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (default 1)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (default 1)")
    args = ap.parse_args(argv)

    import torch

    from megappo.toolkit.convert import convert_megatron_to_hf, quiet_fallback_warnings

    quiet_fallback_warnings()

    try:
        convert_megatron_to_hf(
            args.ckpt,
            args.out,
            hf_config_dir=args.hf_config,
            tp=args.tp,
            pp=args.pp,
            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
