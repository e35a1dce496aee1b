"""Actor-update throughput: tokens/s and model FLOPs utilization against the measured
matrix-multiply ceiling (``megappo.toolkit.throughput``).

GPU (one device, bf16, random weights, Llama-3.2-1B shape, 4096-token sequences):
    python tools/bench_train.py
CPU smoke run with a tiny model (same fields):
    python tools/bench_train.py --tiny
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from megappo.toolkit.throughput import PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="llama-1b", help="model shape (random weights)")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU-sized model at a short length (smoke run)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; 256 with --tiny)")
    p.add_argument("--rows", type=int, default=2, help="sequences per optimizer step")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=None, help="default: one sequence per micro-batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"), default="auto")
    p.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    p.add_argument("--packed", action="store_true", help="packed sequences (train.packed_sequences)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n ceiling matmul (8192 GPU, 1024 CPU)")
    args = p.parse_args()

    import torch

    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings
    from megappo.models.builder import resolve_transformer_impl
    from megappo.models.factory import resolve_dtype
    from megappo.toolkit.throughput import measure_actor_update
    from megappo.parallel import destroy_parallel, init_parallel

    name = "tiny" if args.tiny else args.model
    seq_len = args.seq_len or (256 if args.tiny else 4096)
    layout = init_parallel(1, 1, seed=1234)
    spec = ModelSpec.from_hf_config({**PRESETS[name], "max_position_embeddings": max(seq_len, 4096)})
    opts = BuildOptions(
        dtype=resolve_dtype(args.dtype, layout.device),
        transformer_impl=resolve_transformer_impl(args.transformer_impl, layout.device),
        recompute_granularity=None if args.recompute == "none" else args.recompute,
    )
    policy = MegatronPolicy(
        spec, "actor", opts, OptimizerSettings(lr=1e-6),
        max_tokens_per_microbatch=args.max_tokens_per_microbatch or seq_len,
        packed_sequences=args.packed,
    )
    result = measure_actor_update(
        policy, spec, name=name, seq_len=seq_len, rows=args.rows, steps=args.steps, warmup=args.warmup,
        ceiling_n=args.matmul_size or (8192 if layout.device.type == "cuda" else 1024),
    )
    out = dataclasses.asdict(result)
    out["params_built"] = sum(p.numel() for m in policy.models for p in m.parameters())
    if layout.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
