"""Benchmark a full weight sync (Megatron actor -> rollout engine) against the memory-copy
bandwidth of the same machine, measured in the same run, and the engine's generation speed.
On CPU always; on GPU too when CUDA is visible. ``--engine sglang``: the embedded engine,
then the colocated SGLang engine (``rollout.engine: sglang``; flattened-bucket updates) on
the same model, in one run; on CPU the tool runs itself under the CPU SGLang environment
(.venv-sglang, ``make sglang-env``) when this Python has no SGLang.

Sync GB/s = bytes of HF tensors delivered / seconds of ``sync_weights`` (gather, bucket,
load), best of ``--repeats``. Copy GB/s = bytes / seconds of one ``dst.copy_(src)`` of the
same size, best of as many runs interleaved with the syncs; both count each byte once. Goal: sync >= 50% of copy.

    python tools/bench_weight_sync.py                 # ~134M-parameter Llama shape, fp32
    python tools/bench_weight_sync.py --layers 4 --hidden 512 --vocab 8000   # quick
    python tools/bench_weight_sync.py --engine sglang   # embedded and SGLang side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megappo.models.builder import BuildOptions, build_model_chunks
from megappo.models.spec import ModelSpec
from megappo.parallel import destroy_parallel, init_parallel
from megappo.rollout import SamplingParams, sync_weights
from megappo.rollout.embedded import EmbeddedEngine


def hf_config(args) -> dict:
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )


def timed_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
    _sync(src.device)
    t = time.perf_counter()
    dst.copy_(src)
    _sync(src.device)
    return time.perf_counter() - t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(kind: str, cfg: dict, device: torch.device, hf_dir: str):
    if kind == "embedded":
        return EmbeddedEngine(cfg, device=device, eos_token_ids=[])
    from megappo.rollout.sglang_engine import SGLangEngine

    server_args = {"dtype": "float32", "log_level": "error"}
    server_args.update({"device": "cpu"} if device.type == "cpu" else {"mem_fraction_static": 0.4})
    return SGLangEngine(hf_dir, server_args=server_args, eos_token_ids=[], tp_size=1, gpu_id=device.index or 0, timeout_s=900)


def bench(device_name: str, args, kind: str) -> None:
    layout = init_parallel(1, 1, seed=0, device=device_name)
    device = layout.device
    cfg = hf_config(args)
    spec = ModelSpec.from_hf_config(cfg)
    chunks = build_model_chunks(spec, "reference", BuildOptions())
    if device.type == "cuda":
        chunks = [c.cuda(device) for c in chunks]
    with tempfile.TemporaryDirectory() as hf_dir:  # SGLang reads the architecture from config.json
        with open(f"{hf_dir}/config.json", "w") as f:
            json.dump({**cfg, "torch_dtype": "float32"}, f)
        engine = make_engine(kind, cfg, device, hf_dir)
        try:
            measure(engine, chunks, layout, device, args, label=f"{device} {kind}")
        finally:
            engine.shutdown()
    del chunks
    destroy_parallel()


def measure(engine, chunks, layout, device, args, *, label: str) -> None:
    nbytes = sync_weights(chunks, engine, layout, bucket_mb=args.bucket_mb).bytes  # warm: pages in the engine's memory
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timed_copy(src, dst)  # warm
    best, copy_s = None, float("inf")
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        _sync(device)
        stats = sync_weights(chunks, engine, layout, bucket_mb=args.bucket_mb)
        _sync(device)
        best = stats if best is None or stats.seconds < best.seconds else best
        copy_s = min(copy_s, timed_copy(src, dst))
    copy = src.numel() * 4 / copy_s / 1e9
    del src, dst
    print(f"[{label}] model {best.bytes / 1e9:.3f} GB ({best.bytes // 4 / 1e6:.0f}M fp32 parameters), "
          f"bucket {args.bucket_mb} MiB, {best.num_buckets} buckets, peak bucket {best.peak_bucket_bytes / 2**20:.1f} MiB")
    print(f"[{label}] weight sync   : {best.seconds:.3f} s  {best.gbps:.2f} GB/s")
    print(f"[{label}] memory copy   : {copy_s:.3f} s  {copy:.2f} GB/s  (one dst.copy_(src) of {nbytes / 1e9:.3f} GB)")
    print(f"[{label}] sync / copy   : {best.gbps / copy:.1%}  (goal >= 50%)")

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.gen_prompts, args.gen_prompt_len), generator=g).tolist()
    params = SamplingParams(n=args.gen_n, temperature=1.0, max_new_tokens=args.gen_tokens, seed=0)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, seed=0))
    _sync(device)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    _sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(len(s.token_ids) for group in out for s in group)
    print(f"[{label}] generation    : {args.gen_prompts} prompts x {args.gen_n} samples, prompt {args.gen_prompt_len}, "
          f"{tokens} new tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--gen-n", type=int, default=2)
    ap.add_argument("--gen-prompt-len", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--engine", choices=("embedded", "sglang"), default="embedded",
                    help="sglang: the embedded engine, then SGLang's, in one run")
    args = ap.parse_args()
    kinds = ["embedded"] + (["sglang"] if args.engine == "sglang" else [])
    if args.engine == "sglang":
        from megappo.parallel.sglang_cpu import run_in_sglang_environment

        run_in_sglang_environment(__file__, sys.argv[1:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    for kind in kinds:
        if not (kind == "sglang" and torch.cuda.is_available()):  # SGLang on CPU only where no GPU is visible
            bench("cpu", args, kind)
        if torch.cuda.is_available():
            bench("cuda", args, kind)


if __name__ == "__main__":
    main()
