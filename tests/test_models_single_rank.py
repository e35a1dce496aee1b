"""MegatronPolicy in one process (world size 1, gloo, CPU): packed sequences against the
right-padded path, and the learning-rate schedule against its closed form.

The checks run in a child process (``python tests/test_models_single_rank.py --out F``,
the module fixture) with ``CUDA_VISIBLE_DEVICES=`` so that Megatron's process state and
the CPU patches stay out of the pytest process; the tests assert on its JSON.

Packed vs padded: the same weights, the same batch; packed micro-batches are cut by a
real-token budget (3 micro-batches of 1-3 sequences) and padded ones are one micro-batch,
so the comparison also crosses micro-batch counts. Log-probs, entropy, exact KL to a
reference, values, the actor's and the critic's loss and gradients agree to 1e-5 (fp32;
measured ~1e-7: RoPE at shifted absolute positions and summation order are the only
differences). A packed row padded at the end (to a multiple of 8) gives the same outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fixtures import assert_diffs_small

TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_rank") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" not in line)[-6000:]
        pytest.fail(f"{Path(__file__).name} checks failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _assert_small(results, *names, tol=TOL):
    assert_diffs_small(results, *names, tol=tol)


def test_packed_forward_outputs_equal_padded(results):
    assert results["info"]["packed_microbatch_rows"] == [[1], [4, 0], [3, 5, 2]]
    _assert_small(results, "packed_logprobs", "packed_entropy", "packed_kl", "packed_values")


def test_packed_loss_and_gradients_equal_padded(results):
    _assert_small(results, "packed_loss", "packed_grads", "packed_critic_loss", "packed_critic_grads")
    assert results["info"]["packed_grad_norm"] > 100 * TOL  # the gradients compared are not ~0


def test_packed_row_padded_at_the_end_gives_the_same_outputs(results):
    assert results["info"]["tail_padded_length"] % 8 == 0
    _assert_small(results, "packed_tail_padding_logits")


def test_lr_schedules_follow_the_closed_form(results):
    assert results["info"]["lr_steps"] == 14
    _assert_small(results, "lr_warmup_constant", "lr_warmup_cosine", tol=1e-15)


# ------------------------------------------------------------------------------ the child process

HF = dict(
    model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=256,
)
TEMP = 0.7


def closed_form_lr(k: int, *, lr: float, min_lr: float, warmup: int, style: str, decay_steps: int | None) -> float:
    """The rate of optimizer step k (1-based): linear warmup from 0, then constant, or a
    half cosine from lr to min_lr over steps (warmup, decay_steps], min_lr after."""
    if warmup and k <= warmup:
        return lr * k / warmup
    if style == "constant":
        return lr
    if k > decay_steps:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (decay_steps - warmup)))


def _child(out_path: str) -> None:
    import torch

    from megappo.algo import aggregate_loss, policy_loss, value_loss
    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings, TokenBatch
    from megappo.models.model_inputs import model_inputs
    from megappo.parallel import destroy_parallel, init_parallel

    diffs: dict[str, float] = {}
    info: dict[str, object] = {}

    def diff(name, a, b):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        d = float("inf") if a.shape != b.shape else ((a - b).abs().max().item() if a.numel() else 0.0)
        diffs[name] = max(diffs.get(name, 0.0), d)

    init_parallel(1, 1, seed=5, device="cpu")
    torch.set_num_threads(1)
    spec = ModelSpec.from_hf_config(HF)
    g = torch.Generator().manual_seed(7)
    B, S = 6, 24
    ids = torch.randint(0, HF["vocab_size"], (B, S), generator=g)
    batch = TokenBatch(ids, torch.tensor([3, 8, 2, 5, 1, 6]), torch.tensor([10, 16, 0, 7, 23, 1]))
    T = batch.T
    old_lp, adv = -3 - torch.rand(B, T, generator=g) * 2, torch.randn(B, T, generator=g)
    returns, old_values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g) * 0.1
    mask = batch.response_mask_BT
    num_tokens = float(mask.sum())

    def actor_loss(out, rows):
        loss, metrics = policy_loss(out["logprobs_BT"], old_lp[rows], adv[rows], mask[rows], clip_low=0.2, clip_high=0.28,
                                    entropy=out["entropy_BT"], entropy_coef=0.01, num_tokens=num_tokens)
        return loss + 0.1 * aggregate_loss(out["kl_BT"], mask[rows], "token-mean", num_tokens=num_tokens), metrics

    def critic_loss(out, rows):
        return value_loss(out["values_BT"], old_values[rows], returns[rows], mask[rows], value_clip=0.2, num_tokens=num_tokens)

    optim = OptimizerSettings(lr=1e-4)
    opts = BuildOptions(value_head_init_std=0.05)
    padded = {r: MegatronPolicy(spec, r, opts, optim if r != "reference" else None, max_tokens_per_microbatch=10_000)
              for r in ("actor", "critic", "reference")}
    packed = {r: MegatronPolicy(spec, r, opts, optim, max_tokens_per_microbatch=40, packed_sequences=True)
              for r in ("actor", "critic")}
    with torch.no_grad():  # peaked distributions (random init is near uniform), so entropy and KL differ per token
        padded["actor"].models[0].output_layer.weight.mul_(10)
    for r in ("actor", "critic"):
        packed[r].models[0].load_state_dict(padded[r].models[0].state_dict())
    ref = padded["reference"]
    ref.models[0].load_state_dict(padded["actor"].models[0].state_dict())
    with torch.no_grad():  # a reference that differs from the actor, so the KL is not 0
        for p in ref.models[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    # Old log-probs near the current ones: ratios near 1, so the clipped surrogate has gradients.
    noise_BT = 0.1 * torch.randn(B, T, generator=g)
    old_lp.copy_(padded["actor"].forward_logprobs(batch, temperature=TEMP)["logprobs_BT"] + noise_BT)
    info["packed_microbatch_rows"] = [m.rows.tolist() for m in packed["actor"]._microbatches(batch, None)]

    for tag, pol in (("padded", padded), ("packed", packed)):
        out = pol["actor"].forward_logprobs(batch, temperature=TEMP, with_entropy=True, ref=ref)
        values = pol["critic"].forward_values(batch)
        m = pol["actor"].forward_backward(batch, actor_loss, temperature=TEMP, ref=ref)
        cm = pol["critic"].forward_backward(batch, critic_loss)
        grads = {n: p.main_grad.clone() for n, p in pol["actor"].models[0].named_parameters()}
        cgrads = {n: p.main_grad.clone() for n, p in pol["critic"].models[0].named_parameters()}
        if tag == "padded":
            want = dict(out=out, values=values, loss=m["loss"], grads=grads, closs=cm["loss"], cgrads=cgrads)
            continue
        for k in ("logprobs", "entropy", "kl"):
            diff(f"packed_{k}", out[f"{k}_BT"], want["out"][f"{k}_BT"])
        diff("packed_values", values, want["values"])
        info["entropy_range"] = [float(want["out"]["entropy_BT"][mask.bool()].min()), float(want["out"]["entropy_BT"].max())]
        diff("packed_loss", m["loss"], want["loss"])
        diff("packed_critic_loss", cm["loss"], want["closs"])
        for n in want["grads"]:
            diff("packed_grads", grads[n], want["grads"][n])
        for n in want["cgrads"]:
            diff("packed_critic_grads", cgrads[n], want["cgrads"][n])
        info["packed_grad_norm"] = math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads.values()))

    # A packed row padded at its end: the tail is its own segment, the outputs do not move.
    model = packed["actor"].models[0]
    model.eval()
    with torch.no_grad():
        exact = model_inputs(batch, "block_mask", 1)
        tail = model_inputs(batch, "block_mask", 8)
        info["tail_padded_length"] = tail.seq_length
        assert tail.seq_length > exact.seq_length
        outs = []
        for inp in (exact, tail):
            args, kwargs = inp.forward_args()
            outs.append(inp.gather(model(*args, **kwargs)) * mask.unsqueeze(-1))
        diff("packed_tail_padding_logits", outs[1], outs[0])

    # Learning-rate schedules with Megatron's optimizer (its param groups carry max_lr / min_lr).
    steps = 14
    info["lr_steps"] = steps
    for tag, settings in (
        ("lr_warmup_constant", OptimizerSettings(lr=3e-4, lr_warmup_steps=4)),
        ("lr_warmup_cosine", OptimizerSettings(lr=3e-4, min_lr=3e-5, lr_warmup_steps=3, lr_decay_style="cosine",
                                               lr_decay_steps=11)),
    ):
        pol = MegatronPolicy(spec, "actor", opts, settings)
        for k in range(1, steps + 1):
            got = pol.optimizer_step()["lr"]
            want_lr = closed_form_lr(k, lr=settings.lr, min_lr=settings.min_lr, warmup=settings.lr_warmup_steps,
                                     style=settings.lr_decay_style, decay_steps=settings.lr_decay_steps)
            diff(tag, got, want_lr)
            for group in pol.optimizer.param_groups:
                diff(tag, group["lr"], want_lr)

    with open(out_path, "w") as f:
        json.dump({"diffs": diffs, "info": info}, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    _child(parser.parse_args().out)
