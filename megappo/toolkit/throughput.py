"""Throughput of an actor update: tokens/s and model FLOPs utilization (MFU) against the
matrix-multiply ceiling measured on the same device in the same run.

Model FLOPs per trained token (``train_flops_per_token``), counting multiply-adds as 2
FLOPs and training as 3 forward passes (forward, and a backward that costs two), as the
PaLM paper's MFU (Chowdhery et al. 2022, arXiv 2204.02311, appendix B) with causal
attention counted at its average context:
  forward = 2 * N_matmul + L * 2 * S * (n_heads * head_dim)
where N_matmul are the parameters of the linear layers (QKV, output projection, SwiGLU
MLP, LM head; not the embedding lookup or the norms) and the attention term is
QK^T plus AV, 2 * 2 * (S / 2) * n_heads * head_dim per layer per token. Activation
recomputation is not counted (model FLOPs, not hardware FLOPs); the vocab-parallel
log-prob and the loss are negligible and not counted either.

The ceiling (``matmul_ceiling_tflops``) is the best of a few timed [n, n] x [n, n]
matmuls in the training dtype (CUDA events on GPU, wall clock on CPU), so MFU is
relative to what this device sustains, not to a datasheet number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megappo.algo import policy_loss
from megappo.models.batch import TokenBatch
from megappo.models.spec import ModelSpec

PRESETS = {
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings).
    "llama-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0,
    ),
    # Qwen3-1.7B's shape (QK-norm, tied embeddings).
    "qwen3-1.7b": dict(
        model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1000000.0,
    ),
    # A CPU-sized model with the same code paths.
    "tiny": dict(
        model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
}


def matmul_params(spec: ModelSpec) -> int:
    """Parameters of the linear layers (what costs FLOPs per token), LM head included."""
    h, d = spec.hidden_size, spec.head_dim
    attn = h * (spec.num_attention_heads + 2 * spec.num_kv_heads) * d + spec.num_attention_heads * d * h
    mlp = 3 * h * spec.ffn_hidden_size
    return spec.num_layers * (attn + mlp) + h * spec.vocab_size


def total_params(spec: ModelSpec) -> int:
    """All parameters (embedding once when tied, RMSNorm weights, QKV bias, QK-norm)."""
    h, d = spec.hidden_size, spec.head_dim
    per_layer = 2 * h
    if spec.qkv_bias:
        per_layer += (spec.num_attention_heads + 2 * spec.num_kv_heads) * d
    if spec.qk_norm:
        per_layer += 2 * d
    embed = h * spec.vocab_size * (1 if spec.tie_word_embeddings else 2)
    return matmul_params(spec) - h * spec.vocab_size + embed + spec.num_layers * per_layer + h


def train_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Model FLOPs to train on one token of a ``seq_len`` sequence (module docstring)."""
    forward = 2 * matmul_params(spec) + spec.num_layers * 2 * seq_len * spec.num_attention_heads * spec.head_dim
    return 3.0 * forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Best sustained TFLOP/s of an [n, n] x [n, n] matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            torch.matmul(a, b)
            seconds = time.perf_counter() - t
        best = min(best, seconds)
    return 2.0 * n**3 / best / 1e12


@dataclass(frozen=True)
class UpdateThroughput:
    model: str
    device: str
    dtype: str
    params: int
    seq_len: int
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    model_tflops_per_s: float
    matmul_ceiling_tflops: float
    mfu: float
    loss: float
    grad_norm: float


def measure_actor_update(
    policy, spec: ModelSpec, *, name: str, seq_len: int, rows: int, steps: int, warmup: int, ceiling_n: int, seed: int = 0
) -> UpdateThroughput:
    """Time ``policy.train_step`` (a PPO surrogate on random tokens and advantages) over
    ``steps`` steps after ``warmup``; ``rows`` sequences of ``seq_len`` per step, each a
    64-token prompt and a full-length response."""

    device = policy.device
    g = torch.Generator().manual_seed(seed)
    prompt = min(64, seq_len // 2)
    ids = torch.randint(0, spec.vocab_size, (rows, seq_len), generator=g)
    batch = TokenBatch(ids, torch.full((rows,), prompt), torch.full((rows,), seq_len - prompt)).to(device)
    mask_BT = batch.response_mask_BT
    adv_BT = torch.randn(mask_BT.shape, generator=g).to(device)
    num_tokens = float(mask_BT.sum())

    def loss_fn(out, mb_rows):
        lp = out["logprobs_BT"]
        return policy_loss(
            lp, lp.detach(), adv_BT[mb_rows], mask_BT[mb_rows], clip_low=0.2, clip_high=0.2, num_tokens=num_tokens
        )

    metrics = {}
    for _ in range(warmup):
        metrics = policy.train_step(batch, loss_fn)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        metrics = policy.train_step(batch, loss_fn)
    _sync(device)
    step_time = (time.perf_counter() - t) / max(steps, 1)
    tokens = rows * seq_len
    achieved = train_flops_per_token(spec, seq_len) * tokens / step_time / 1e12
    ceiling = matmul_ceiling_tflops(device, policy.opts.dtype, ceiling_n)
    return UpdateThroughput(
        model=name, device=str(device), dtype=str(policy.opts.dtype).replace("torch.", ""), params=total_params(spec),
        seq_len=seq_len, tokens_per_step=tokens, step_time_s=step_time, tokens_per_s=tokens / step_time,
        model_tflops_per_s=achieved, matmul_ceiling_tflops=ceiling, mfu=achieved / ceiling,
        loss=float(metrics.get("loss", float("nan"))), grad_norm=float(metrics.get("grad_norm", float("nan"))),
    )
