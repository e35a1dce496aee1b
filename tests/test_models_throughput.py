"""The actor-update benchmark: its FLOPs / parameter formulas (fast), the CPU smoke run of
tools/bench_train.py (slow), and a bf16 forward/backward of a ~1B model (GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megappo.models.spec import ModelSpec
from megappo.toolkit.throughput import PRESETS, matmul_params, total_params, train_flops_per_token

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_parameter_count_of_llama_3_2_1b():
    spec = ModelSpec.from_hf_config(PRESETS["llama-1b"])
    assert total_params(spec) == 1_235_814_400  # the published size of Llama-3.2-1B


def test_train_flops_per_token():
    spec = ModelSpec.from_hf_config(PRESETS["llama-1b"])
    attn = spec.num_layers * 2 * 4096 * spec.num_attention_heads * spec.head_dim
    assert train_flops_per_token(spec, 4096) == 3 * (2 * matmul_params(spec) + attn)
    assert math.isclose(train_flops_per_token(spec, 4096) / 1e9, 8.22, rel_tol=1e-3)


@pytest.mark.slow
def test_bench_train_tiny_on_cpu_prints_the_fields():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench_train.py"), "--tiny", "--steps", "1", "--warmup", "1",
         "--seq-len", "128", "--matmul-size", "256"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    for key in ("tokens_per_s", "model_tflops_per_s", "matmul_ceiling_tflops", "mfu", "step_time_s"):
        assert out[key] > 0 and math.isfinite(out[key]), key
    assert out["params"] == out["params_built"]  # the FLOPs formula counts the model we built
    assert out["device"] == "cpu" and out["dtype"] == "float32" and math.isfinite(out["loss"])


@pytest.mark.gpu
def test_bf16_forward_backward_of_a_1b_model_on_gpu():
    import torch

    from megappo.models import BuildOptions, MegatronPolicy, OptimizerSettings, TokenBatch
    from megappo.models.builder import resolve_transformer_impl
    from megappo.toolkit.throughput import measure_actor_update
    from megappo.parallel import destroy_parallel, init_parallel

    layout = init_parallel(1, 1, seed=0, device="cuda")
    try:
        spec = ModelSpec.from_hf_config(PRESETS["llama-1b"])
        opts = BuildOptions(dtype=torch.bfloat16, transformer_impl=resolve_transformer_impl("auto", layout.device))
        policy = MegatronPolicy(spec, "actor", opts, OptimizerSettings(lr=1e-6), max_tokens_per_microbatch=2048)
        assert sum(p.numel() for p in policy.models[0].parameters()) == total_params(spec)
        result = measure_actor_update(policy, spec, name="llama-1b", seq_len=2048, rows=2, steps=2, warmup=1, ceiling_n=8192)
        assert math.isfinite(result.loss) and result.grad_norm > 0 and math.isfinite(result.grad_norm)
        assert result.tokens_per_s > 0 and 0 < result.mfu < 1.5
        ids = torch.randint(0, spec.vocab_size, (2, 256))
        out = policy.forward_logprobs(
            TokenBatch(ids, torch.tensor([16, 32]), torch.tensor([240, 100])), temperature=1.0, with_entropy=True
        )
        assert out["logprobs_BT"].shape == (2, 240) and out["logprobs_BT"].device.type == "cuda"
        assert torch.isfinite(out["logprobs_BT"]).all() and (out["logprobs_BT"] <= 0).all()
        assert (out["entropy_BT"] >= 0).all() and out["entropy_BT"].max() <= math.log(spec.vocab_size) + 1e-3
    finally:
        destroy_parallel()
