"""Peak extra memory of a real weight sync, run by tests/test_rollout_weight_sync.py as one
plain process (world size 1): a ~115 MB fp32 Megatron actor -> the embedded engine.

Measure: the process's peak resident set (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``) during the call, minus its resident set just before; torch's
CPU allocator does not cache, and the test runs this with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor above 64 KiB is its own mapping, returned
to the system when freed: the resident set follows the live tensors. The engine's pages
are made resident by a first sync; the best of two measured syncs is reported. As a
control, the same measure of a sync fed from a full copy of the model (what a sync that
materializes every tensor before sending would hold) must see about the model's size.

Writes OUT (JSON): model bytes, bucket bytes, largest tensor, the sync's and the control's
peak extra bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megappo.models.builder import BuildOptions, build_model_chunks  # noqa: E402
from megappo.models.spec import ModelSpec  # noqa: E402
from megappo.parallel import destroy_parallel, init_parallel  # noqa: E402
from megappo.rollout import sync_weights  # noqa: E402
from megappo.rollout.embedded import EmbeddedEngine  # noqa: E402
from megappo.rollout.weight_sync import stream_to_engine  # noqa: E402
from megappo.weights import iter_hf_tensors  # noqa: E402


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_bytes(fn) -> int:
    """Peak resident bytes during ``fn()`` above the resident bytes before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    base = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - base) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bucket-mb", type=float, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layout = init_parallel(1, 1, seed=0, device="cpu")
    cfg = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=8192, hidden_size=512, intermediate_size=1536,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    chunks = build_model_chunks(ModelSpec.from_hf_config(cfg), "reference", BuildOptions())
    engine = EmbeddedEngine(cfg, eos_token_ids=[2])
    sync = lambda: sync_weights(chunks, engine, layout, bucket_mb=args.bucket_mb)  # noqa: E731
    stats = sync()  # the engine's parameters become resident
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    largest = max(t.numel() * t.element_size() for _, t in iter_hf_tensors(chunks))
    extra = min(peak_extra_bytes(sync) for _ in range(2))

    def materialized():
        copies = [(name, t.clone()) for name, t in iter_hf_tensors(chunks)]
        stream_to_engine(copies, engine, bucket_mb=args.bucket_mb)

    control = peak_extra_bytes(materialized)
    result = dict(model_bytes=model_bytes, synced_bytes=stats.bytes, bucket_bytes=int(args.bucket_mb * 2**20),
                  peak_bucket_bytes=stats.peak_bucket_bytes, largest_tensor_bytes=largest,
                  sync_peak_extra_bytes=extra, materialized_peak_extra_bytes=control)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    engine.shutdown()
    destroy_parallel()


if __name__ == "__main__":
    main()
