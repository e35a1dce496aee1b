"""Multi-process checks of the parallel layer and ``MegatronPolicy``, run under
``torchrun --nproc-per-node 2`` by ``tests/test_models_parallel.py``; results go to a JSON
file that the tests assert on. One launch lays the same two processes out three ways:

  tp1   TP=1 PP=1 DP=2  the reference: a tiny Qwen3-shaped actor, critic and reference
        are built, saved with dist_checkpointing, and run (forward on the full batch;
        forward/backward and one Adam step on each rank's half of it). Also the
        collectives, micro-batch invariance (1 vs 3), the distributed optimizer, the
        exact-zero KL to an identical reference, and log-probs against log_softmax
        over the full logits.
  tp2   TP=2 DP=1       the checkpoint resharded: outputs, loss, gradients (per-shard
        slices of the TP=1 gradients) and the updated weights against tp1; the
        vocab-parallel functions against torch on gathered logits (odd vocabulary);
        a bfloat16 model (Float16Module, mixed-precision optimizer) against fp32;
        packed sequences against tp1 (right-padded); full activation recomputation
        against the same model without it.
  pp2   PP=2 DP=1       the same against tp1 (layer names mapped by stage offset; the tied
        output layer of the last stage against the embedding), plus the broadcasts and
        packed sequences (packed rows of different lengths through the pipeline).
  vpp2  PP=2 x 2 virtual chunks (interleaved schedule), the same against tp1; 3 requested
        micro-batches become 4 (the schedule's count rule), a 1-row batch is a clear error.

Every comparison is recorded as a max abs difference (max over ranks).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from megappo.algo import aggregate_loss, policy_loss, value_loss
from megappo.config import config_from_dict
from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings, TokenBatch, build_policy
from megappo.parallel import collectives, destroy_parallel, init_parallel
from megappo.parallel.vocab_parallel import vocab_parallel_full_kl, vocab_parallel_logprobs

HF = dict(
    model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=64,
)
TEMP = 0.7
# Adam's first step is lr * g / (|g| + eps), nearly lr * sign(g): float noise in a gradient
# near 0 moves a weight by up to lr * noise / eps. eps = 1e-6 keeps that below 1e-7 while
# the step itself is ~lr = 1e-4, so the layout comparison of updated weights stays sharp.
OPTIM = OptimizerSettings(lr=1e-4, clip_grad=1.0, weight_decay=0.01, adam_eps=1e-6)
RESULTS: dict[str, float] = {}
INFO: dict[str, object] = {}


def diff(name: str, a, b) -> None:
    """Record max |a - b| under ``name`` (inf when the shapes differ)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        d = float("inf")
    else:
        d = (a - b).abs().max().item() if a.numel() else 0.0
    RESULTS[name] = max(RESULTS.get(name, 0.0), d)


def make_batch() -> tuple[TokenBatch, dict]:
    g = torch.Generator().manual_seed(7)
    B, S = 6, 24
    ids = torch.randint(0, HF["vocab_size"], (B, S), generator=g)
    prompt = torch.tensor([3, 8, 2, 5, 1, 6])
    resp = torch.tensor([10, 16, 0, 7, 23, 1])
    batch = TokenBatch(ids, prompt, resp)
    T = batch.T
    data = dict(
        old_lp=-3 - torch.rand(B, T, generator=g) * 2,
        adv=torch.randn(B, T, generator=g),
        returns=torch.randn(B, T, generator=g),
        old_values=torch.randn(B, T, generator=g) * 0.1,
    )
    return batch, data


def actor_loss(batch: TokenBatch, data: dict, rows_offset: torch.Tensor, *, with_kl: bool):
    """The trainer's shape of loss: PPO surrogate + entropy bonus (+ exact-KL term), token
    mean over the global batch. ``rows_offset`` maps the rows of ``batch`` (this DP rank's
    share) to rows of the full batch's tensors in ``data``."""
    mask = batch.response_mask_BT
    num_tokens = float(collectives.dp_all_reduce(mask.double().sum()))

    def loss_fn(out, rows):
        r = rows_offset[rows]
        m = mask[rows]
        loss, metrics = policy_loss(
            out["logprobs_BT"], data["old_lp"][r], data["adv"][r], m, clip_low=0.2, clip_high=0.28,
            entropy=out["entropy_BT"], entropy_coef=0.01, num_tokens=num_tokens,
        )
        if with_kl:
            loss = loss + 0.1 * aggregate_loss(out["kl_BT"], m, "token-mean", num_tokens=num_tokens)
        return loss, metrics

    return loss_fn


def ratio_probe(name: str, old_lp_BT: torch.Tensor, loss_fn):
    """``loss_fn`` that also records how far the training pass's log-probs are from the
    forward-only pass's on the same batch (0: the first PPO ratio is exactly 1)."""

    def probe(out, rows):
        diff(name, out["logprobs_BT"].detach(), old_lp_BT[rows])
        return loss_fn(out, rows)

    return probe


def critic_loss(batch: TokenBatch, data: dict, rows_offset: torch.Tensor):
    mask = batch.response_mask_BT
    num_tokens = float(collectives.dp_all_reduce(mask.double().sum()))

    def loss_fn(out, rows):
        r = rows_offset[rows]
        return value_loss(
            out["values_BT"], data["old_values"][r], data["returns"][r], mask[rows], value_clip=0.2, num_tokens=num_tokens
        )

    return loss_fn


def global_name(model, name: str) -> str:
    """Parameter name with the layer index of the whole model (pipeline stages number their
    layers from 0); the last stage's tied output layer is the embedding."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    name = ".".join(parts)
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def local_slice(full: torch.Tensor, param, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of a full (TP=1) tensor, as Megatron shards ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):  # [gate; up], each sharded on its own
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def grads_of(policy) -> dict[str, torch.Tensor]:
    return {
        global_name(m, n): p.main_grad.detach().clone() for m in policy.models for n, p in m.named_parameters()
    }


def weights_of(policy) -> dict[str, torch.Tensor]:
    return {global_name(m, n): p.detach().clone() for m in policy.models for n, p in m.named_parameters()}


def compare_params(tag: str, policy, full: dict[str, torch.Tensor], values: dict[str, torch.Tensor], layout) -> None:
    for m in policy.models:
        for n, p in m.named_parameters():
            g = global_name(m, n)
            diff(tag, values[g], local_slice(full[g], p, n, layout.tp, layout.tp_rank))


def sharded(policies: dict[str, MegatronPolicy]) -> dict:
    """One sharded state dict for several policies (and their virtual-pipeline chunks);
    the key prefix names the policy."""
    return {
        f"{k}/{i}": m.sharded_state_dict(prefix=f"{k}.") for k, pol in policies.items() for i, m in enumerate(pol.models)
    }


def load(policies: dict[str, MegatronPolicy], ckpt: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded(policies), ckpt)
    for k, pol in policies.items():
        for i, m in enumerate(pol.models):
            m.load_state_dict({n[len(k) + 1:]: t for n, t in state[f"{k}/{i}"].items()}, strict=True)


def build(spec, tp, pp, vpp=None, **kw) -> dict[str, MegatronPolicy]:
    opts = BuildOptions(tp=tp, pp=pp, vpp=vpp, value_head_init_std=0.05)
    return dict(
        actor=MegatronPolicy(spec, "actor", opts, OPTIM, max_tokens_per_microbatch=10_000, **kw),
        critic=MegatronPolicy(spec, "critic", opts, OPTIM, max_tokens_per_microbatch=10_000),
        ref=MegatronPolicy(spec, "reference", opts, max_tokens_per_microbatch=10_000),
    )


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].flatten() for k in sorted(d)])


# ------------------------------------------------------------------------------ phases

def phase_tp1(spec, batch, data, ckpt) -> dict:
    from megatron.core import dist_checkpointing

    layout = init_parallel(1, 1, seed=11, device="cpu")
    check_collectives()
    pols = build(spec, 1, 1)
    actor, critic, ref = pols["actor"], pols["critic"], pols["ref"]
    t = time.time()
    dist_checkpointing.save(sharded(pols), ckpt)
    INFO["checkpoint_save_s"] = round(time.time() - t, 2)

    out = actor.forward_logprobs(batch, temperature=TEMP, with_entropy=True, ref=ref)
    values = critic.forward_values(batch)
    check_logprobs_against_log_softmax(actor, batch, out)
    ref_same = MegatronPolicy(spec, "reference", BuildOptions())
    ref_same.models[0].load_state_dict(actor.models[0].state_dict())
    same = actor.forward_logprobs(batch, temperature=TEMP, ref=ref_same)
    RESULTS["kl_to_identical_reference"] = same["kl_BT"].abs().max().item()
    diff("logprobs_identical_reference", ref_same.forward_logprobs(batch, temperature=TEMP)["logprobs_BT"], same["logprobs_BT"])

    # Each DP rank trains on its half; the halves' gradients add up to the batch's.
    offset = torch.arange(batch.B).tensor_split(2)[layout.dp_rank]
    half = batch.select(offset, trim=False)
    kl_loss_fn = actor_loss(half, data, offset, with_kl=True)
    m1 = actor.forward_backward(half, kl_loss_fn, temperature=TEMP, ref=ref)
    grads_kl = grads_of(actor)
    m3 = actor.forward_backward(half, kl_loss_fn, temperature=TEMP, ref=ref, num_microbatches_hint=3)
    diff("microbatch_1_vs_3_loss", m1["loss"], m3["loss"])
    diff("microbatch_1_vs_3_grads", flat(grads_kl), flat(grads_of(actor)))
    INFO["tp1_num_microbatches"] = [m1["num_microbatches"], m3["num_microbatches"]]
    INFO["tp1_metrics"] = m3

    loss_fn = actor_loss(half, data, offset, with_kl=False)
    old_lp = actor.forward_logprobs(half, temperature=TEMP)["logprobs_BT"]
    m = actor.forward_backward(half, ratio_probe("tp1_train_vs_forward_logprobs", old_lp, loss_fn), temperature=TEMP)
    grads = grads_of(actor)
    before = weights_of(actor)
    step = actor.optimizer_step()
    INFO["tp1_lr"] = step["lr"]
    RESULTS["tp1_adam_step_size"] = (flat(weights_of(actor)) - flat(before)).abs().max().item()
    cm = critic.forward_backward(half, critic_loss(half, data, offset))
    critic_grads = grads_of(critic)
    critic.optimizer_step()

    # The distributed optimizer (Adam state sharded over the two DP ranks) steps like the plain one.
    # Built by the config factory, as the trainer does.
    cfg = config_from_dict({
        "optim": {"lr": OPTIM.lr, "weight_decay": OPTIM.weight_decay, "adam_eps": OPTIM.adam_eps, "clip_grad": OPTIM.clip_grad},
        "parallel": {"use_distributed_optimizer": True, "device": "cpu"},
        "train": {"max_tokens_per_microbatch": 10_000},
    })
    dopt = build_policy(cfg, spec, "actor", layout)
    INFO["factory_optimizer"] = type(dopt.optimizer.chained_optimizers[0]).__name__
    load({"actor": dopt}, ckpt)
    dopt.train_step(half, loss_fn, temperature=TEMP)
    diff("distributed_optimizer_vs_plain_weights", flat(weights_of(dopt)), flat(weights_of(actor)))
    check_loss_scaling_at("tp1", actor, dopt)
    return dict(
        out=out, values=values, loss_kl=m1["loss"], grads_kl=grads_kl, loss=m["loss"], grads=grads,
        grad_norm=step["grad_norm"], weights=weights_of(actor),
        critic_loss=cm["loss"], critic_grads=critic_grads, critic_weights=weights_of(critic),
    )


def phase_other(tag, tp, pp, vpp, spec, batch, data, ckpt, ref1) -> None:
    layout = init_parallel(tp, pp, vpp, seed=11, device="cpu")
    pols = build(spec, tp, pp, vpp)
    load(pols, ckpt)
    actor, critic, ref = pols["actor"], pols["critic"], pols["ref"]
    rows = torch.arange(batch.B)
    if vpp is not None:
        check_interleaved_counts(tag, actor, batch, data, ref1, layout)
    if pp == 1:
        out = actor.forward_logprobs(batch, temperature=TEMP, with_entropy=True, ref=ref)
        diff(f"{tag}_kl", out["kl_BT"], ref1["out"]["kl_BT"])
        m = actor.forward_backward(batch, actor_loss(batch, data, rows, with_kl=True), temperature=TEMP, ref=ref)
        diff(f"{tag}_loss_with_full_kl", m["loss"], ref1["loss_kl"])
        compare_params(f"{tag}_grads_with_full_kl", actor, ref1["grads_kl"], grads_of(actor), layout)
    else:
        out = actor.forward_logprobs(batch, temperature=TEMP, with_entropy=True)
        try:
            actor.forward_logprobs(batch, temperature=TEMP, ref=ref)
            INFO[f"{tag}_full_kl_error"] = None
        except ValueError as e:
            INFO[f"{tag}_full_kl_error"] = str(e)
        if vpp is None:
            check_broadcasts()
    diff(f"{tag}_logprobs", out["logprobs_BT"], ref1["out"]["logprobs_BT"])
    diff(f"{tag}_entropy", out["entropy_BT"], ref1["out"]["entropy_BT"])
    diff(f"{tag}_values", critic.forward_values(batch), ref1["values"])

    loss_fn = ratio_probe(f"{tag}_train_vs_forward_logprobs", out["logprobs_BT"], actor_loss(batch, data, rows, with_kl=False))
    m = actor.forward_backward(batch, loss_fn, temperature=TEMP)
    INFO[f"{tag}_num_microbatches"] = m["num_microbatches"]
    diff(f"{tag}_loss", m["loss"], ref1["loss"])
    grads = grads_of(actor)
    compare_params(f"{tag}_grads", actor, ref1["grads"], grads, layout)
    step = actor.optimizer_step()
    diff(f"{tag}_grad_norm", step["grad_norm"], ref1["grad_norm"])
    compare_params(f"{tag}_adam_step_weights", actor, ref1["weights"], weights_of(actor), layout)

    cm = critic.forward_backward(batch, critic_loss(batch, data, rows))
    diff(f"{tag}_critic_loss", cm["loss"], ref1["critic_loss"])
    compare_params(f"{tag}_critic_grads", critic, ref1["critic_grads"], grads_of(critic), layout)
    critic.optimizer_step()
    compare_params(f"{tag}_critic_adam_step_weights", critic, ref1["critic_weights"], weights_of(critic), layout)
    if vpp is None:
        check_packed(tag, spec, tp, pp, batch, data, ckpt, ref1, layout)
    if tp > 1:
        check_recompute(tag, spec, tp, batch, data, ckpt, m["loss"], grads)
        check_vocab_parallel(layout)
        check_padded_vocab_model(spec, layout)
        check_bf16(spec, batch, data, ckpt, ref1)
    check_loss_scaling_at(tag, actor)


def check_loss_scaling_at(tag, actor, distopt=None) -> None:
    """The start-up loss-scaling self-check (``megappo.models.loss_check``) at this layout;
    at tp1 (DP=2) also its control: without the 1/DP correction it must fail (M vs 2M
    micro-batches still agree there; the comparison with autograd catches it)."""
    from megappo.models import loss_check, policy as policy_mod

    for name, pol in ((tag, actor), (f"{tag}_distopt", distopt)):
        if pol is not None:
            rep = loss_check.check_loss_scaling(pol)
            INFO[f"{name}_loss_check"] = {"counts": list(rep.microbatch_counts), "rel_diff_microbatches": rep.rel_diff_microbatches,
                                           "rel_diff_autograd": rep.rel_diff_autograd}
    if tag == "tp1":
        original = policy_mod.loss_scale_factor
        policy_mod.loss_scale_factor = lambda m, dp: float(m)  # as if DDP stopped dividing by DP
        try:
            loss_check.check_loss_scaling(actor)
            INFO["tp1_loss_check_without_dp_factor"] = "no error"
        except loss_check.LossScalingError as e:
            INFO["tp1_loss_check_without_dp_factor"] = str(e)
        finally:
            policy_mod.loss_scale_factor = original


# ------------------------------------------------------------------------------ checks

def check_packed(tag, spec, tp, pp, batch, data, ckpt, ref1, layout) -> None:
    """Packed sequences (one row per micro-batch, block-diagonal causal mask, a real-token
    budget of 40: micro-batches of 1-3 sequences whose packed lengths differ) against the
    right-padded TP=1 run: outputs, loss and gradients of the actor and the critic."""
    opts = BuildOptions(tp=tp, pp=pp, value_head_init_std=0.05)
    pols = {
        "actor": MegatronPolicy(spec, "actor", opts, OPTIM, max_tokens_per_microbatch=40, packed_sequences=True),
        "critic": MegatronPolicy(spec, "critic", opts, OPTIM, max_tokens_per_microbatch=40, packed_sequences=True),
    }
    load(pols, ckpt)
    actor, critic = pols["actor"], pols["critic"]
    rows = torch.arange(batch.B)
    out = actor.forward_logprobs(batch, temperature=TEMP, with_entropy=True)
    diff(f"{tag}_packed_logprobs", out["logprobs_BT"], ref1["out"]["logprobs_BT"])
    diff(f"{tag}_packed_entropy", out["entropy_BT"], ref1["out"]["entropy_BT"])
    diff(f"{tag}_packed_values", critic.forward_values(batch), ref1["values"])
    m = actor.forward_backward(batch, actor_loss(batch, data, rows, with_kl=False), temperature=TEMP)
    INFO[f"{tag}_packed_num_microbatches"] = m["num_microbatches"]
    INFO[f"{tag}_packed_lengths"] = [mb.inputs.seq_length for mb in actor._microbatches(batch, None)]
    diff(f"{tag}_packed_loss", m["loss"], ref1["loss"])
    compare_params(f"{tag}_packed_grads", actor, ref1["grads"], grads_of(actor), layout)
    cm = critic.forward_backward(batch, critic_loss(batch, data, rows))
    diff(f"{tag}_packed_critic_loss", cm["loss"], ref1["critic_loss"])
    compare_params(f"{tag}_packed_critic_grads", critic, ref1["critic_grads"], grads_of(critic), layout)


def check_recompute(tag, spec, tp, batch, data, ckpt, loss, grads) -> None:
    """Full activation recomputation (every layer's forward rerun in backward, Megatron's
    ``recompute_granularity=full``, uniform, 1 layer per chunk): the same loss and gradients."""
    opts = BuildOptions(tp=tp, recompute_granularity="full", recompute_num_layers=1)
    pols = {"actor": MegatronPolicy(spec, "actor", opts, OPTIM, max_tokens_per_microbatch=10_000)}
    load(pols, ckpt)
    actor = pols["actor"]
    INFO[f"{tag}_recompute_granularity"] = actor.models[0].config.recompute_granularity
    calls = []  # a recomputed layer runs twice per micro-batch: forward, and again in backward
    hook = actor.models[0].decoder.layers[0].register_forward_hook(lambda *_: calls.append(1))
    m = actor.forward_backward(batch, actor_loss(batch, data, torch.arange(batch.B), with_kl=False), temperature=TEMP)
    hook.remove()
    INFO[f"{tag}_recompute_layer_calls_per_microbatch"] = len(calls) / m["num_microbatches"]
    diff(f"{tag}_recompute_loss", m["loss"], loss)
    diff(f"{tag}_recompute_grads", flat(grads_of(actor)), flat(grads))


def check_interleaved_counts(tag, actor, batch, data, ref1, layout) -> None:
    """Interleaved schedule: 3 requested micro-batches at PP=2 become 4 (Megatron runs only
    multiples of PP), with the loss and gradients unchanged; a batch with fewer rows than
    any count the schedule accepts is a ValueError naming the sizes. Runs before the
    phase's own training pass, which then overwrites the gradients."""
    m = actor.forward_backward(batch, actor_loss(batch, data, torch.arange(batch.B), with_kl=False), temperature=TEMP,
                               num_microbatches_hint=3)
    INFO[f"{tag}_hint3_num_microbatches"] = m["num_microbatches"]
    diff(f"{tag}_hint3_loss", m["loss"], ref1["loss"])
    compare_params(f"{tag}_hint3_grads", actor, ref1["grads"], grads_of(actor), layout)
    one = TokenBatch(batch.input_ids_BS[:1], batch.prompt_lens_B[:1], batch.response_lens_B[:1])
    try:
        actor.forward_logprobs(one, temperature=TEMP)
        INFO[f"{tag}_one_row_error"] = None
    except ValueError as e:
        INFO[f"{tag}_one_row_error"] = str(e)


def check_collectives() -> None:
    """DP=2: global statistics of two halves equal those of the whole."""
    from megappo.algo import masked_mean, masked_var, moments_from_sums

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(3)
    # float64 data: this checks the reduction to 1e-12; moment_sums' float32 passes are checked
    # against float64 in tests/test_algo_advantages.py.
    x = torch.randn(10, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(10, 7, generator=g) > 0.3).float()
    xs, ms = x.tensor_split(2)[rank], mask.tensor_split(2)[rank]
    mean, var = collectives.global_masked_mean_var(xs, ms)
    diff("collectives_global_mean", mean, masked_mean(x.double(), mask.double()))
    diff("collectives_global_var", var, masked_var(x.double(), mask.double()))
    diff("collectives_token_count", collectives.dp_all_reduce(ms.double().sum()), mask.sum())
    from megappo.algo import moment_sums

    mean2, _ = moments_from_sums(collectives.dp_sum_reducer()(moment_sums(xs, ms)))
    diff("collectives_sum_reducer_mean", mean2, mean)
    got = collectives.reduce_metrics(
        [{"a": rank + 1.0, "num_tokens_local": rank + 1.0, "x_min": float(rank), "x_max": float("nan") if rank == 0 else 5.0}]
    )
    want = {"a": 5.0 / 3.0, "num_tokens_local": 3.0, "x_min": 0.0, "x_max": 5.0}
    diff("collectives_reduce_metrics", torch.tensor([got[k] for k in sorted(want)]), torch.tensor([want[k] for k in sorted(want)]))


def check_broadcasts() -> None:
    """PP=2: the last stage's tensors and objects reach the first stage."""
    from megatron.core import parallel_state as mpu

    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    sent = {"a_BT": torch.arange(6.0).view(2, 3), "b_BT": torch.ones(1, 4)}
    got = collectives.broadcast_from_last_stage(sent if last else None, {"a_BT": (2, 3), "b_BT": (1, 4)})
    diff("broadcast_from_last_stage", flat(got), flat(sent))
    obj = collectives.broadcast_object_from_last_stage({"x": 42.0} if last else None)
    diff("broadcast_object_from_last_stage", obj["x"], 42.0)


def check_logprobs_against_log_softmax(actor, batch, out) -> None:
    """TP=1: log_softmax over the full logits, read at prompt_len + t - 1 (the slow path)."""
    model = actor.models[0]
    ids = batch.input_ids_BS
    pos = torch.arange(batch.S).expand_as(ids)
    model.eval()
    with torch.no_grad():
        logp_BSV = torch.log_softmax(model(ids, pos, None).double() / TEMP, dim=-1)
    model.train()
    mask = batch.response_mask_BT
    lp, ent = torch.zeros_like(mask, dtype=torch.float64), torch.zeros_like(mask, dtype=torch.float64)
    for b in range(batch.B):
        for t in range(int(batch.response_lens_B[b])):
            p = int(batch.prompt_lens_B[b]) + t
            lp[b, t] = logp_BSV[b, p - 1, ids[b, p]]
            ent[b, t] = -(logp_BSV[b, p - 1].exp() * logp_BSV[b, p - 1]).sum()
    diff("tp1_logprobs_vs_log_softmax", out["logprobs_BT"], lp)
    diff("tp1_entropy_vs_log_softmax", out["entropy_BT"], ent)


def check_vocab_parallel(layout) -> None:
    """TP=2: vocab-parallel log-prob / entropy / KL and their gradients against torch on the
    gathered logits, with a vocabulary of 127 padded to 128 (the padded id on rank 1)."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    V, Vp, N = 127, 128, 9
    for dtype, tag in ((torch.float64, "vp64"), (torch.float32, "vp32")):
        g = torch.Generator().manual_seed(5)
        full = (torch.randn(N, Vp, generator=g, dtype=torch.float64) * 3).to(dtype)
        full_ref = (torch.randn(N, Vp, generator=g, dtype=torch.float64) * 3).to(dtype)
        target = torch.randint(0, V, (N,), generator=g)
        wa, wb, wc = (torch.randn(N, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
        local = full.chunk(2, dim=-1)[layout.tp_rank].clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(local, target, vocab_size=V, temperature=TEMP, with_entropy=True, group=group)
        kl = vocab_parallel_full_kl(local, full_ref.chunk(2, dim=-1)[layout.tp_rank], vocab_size=V, temperature=TEMP, group=group)
        ((lp * wa).sum() + (ent * wb).sum() + (kl * wc).sum()).backward()

        x = full.clone().requires_grad_()
        ls = torch.log_softmax(x[:, :V] / TEMP, -1)
        lq = torch.log_softmax(full_ref[:, :V] / TEMP, -1)
        lp2 = ls.gather(-1, target[:, None]).squeeze(-1)
        ent2 = -(ls.exp() * ls).sum(-1)
        kl2 = (ls.exp() * (ls - lq)).sum(-1)
        ((lp2 * wa).sum() + (ent2 * wb).sum() + (kl2 * wc).sum()).backward()
        diff(f"{tag}_logprob", lp, lp2)
        diff(f"{tag}_entropy", ent, ent2)
        diff(f"{tag}_full_kl", kl, kl2)
        diff(f"{tag}_grad", local.grad, x.grad.chunk(2, dim=-1)[layout.tp_rank])
        if layout.tp_rank == 1:
            RESULTS[f"{tag}_padded_id_grad"] = local.grad[:, -1].abs().max().item()


def check_padded_vocab_model(spec, layout) -> None:
    """TP=2, vocabulary 127 (padded to 128): the model's log-probs equal log_softmax over the
    127 true ids of the gathered logits."""
    from megatron.core import parallel_state as mpu

    odd = ModelSpec.from_hf_config({**HF, "vocab_size": 127})
    ref = MegatronPolicy(odd, "reference", BuildOptions(tp=layout.tp))
    batch, _ = make_batch()
    batch = TokenBatch(batch.input_ids_BS.clamp(max=126), batch.prompt_lens_B, batch.response_lens_B)
    out = ref.forward_logprobs(batch, temperature=TEMP, with_entropy=True)
    ids = batch.input_ids_BS
    with torch.no_grad():
        local = ref.models[0](ids, torch.arange(batch.S).expand_as(ids), None)
    parts = [torch.empty_like(local) for _ in range(layout.tp)]
    dist.all_gather(parts, local, group=mpu.get_tensor_model_parallel_group())
    logp = torch.log_softmax(torch.cat(parts, dim=-1)[..., :127].double() / TEMP, dim=-1)
    pos = batch.output_positions_BT()
    lp = logp.gather(1, pos[..., None].expand(-1, -1, 127)).gather(-1, batch.response_ids_BT[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1).gather(1, pos)
    mask = batch.response_mask_BT
    diff("tp2_padded_vocab_model_logprobs", out["logprobs_BT"], lp * mask)
    diff("tp2_padded_vocab_model_entropy", out["entropy_BT"], ent * mask)


def check_bf16(spec, batch, data, ckpt, ref1) -> None:
    """TP=2 in bfloat16 (Float16Module, mixed-precision optimizer with fp32 master weights):
    the fp32 checkpoint loads, log-probs stay within bf16 rounding of fp32, a step runs."""
    pols = {"actor": MegatronPolicy(spec, "actor", BuildOptions(tp=2, dtype=torch.bfloat16), OPTIM)}
    load(pols, ckpt)
    actor = pols["actor"]
    out = actor.forward_logprobs(batch, temperature=TEMP, with_entropy=True)
    diff("bf16_logprobs_vs_fp32", out["logprobs_BT"], ref1["out"]["logprobs_BT"])
    rows = torch.arange(batch.B)
    m = actor.train_step(batch, actor_loss(batch, data, rows, with_kl=False), temperature=TEMP)
    diff("bf16_loss_vs_fp32", m["loss"], ref1["loss"])
    INFO["bf16_optimizer"] = type(actor.optimizer.chained_optimizers[0]).__name__
    INFO["bf16_param_dtype"] = str(next(actor.models[0].parameters()).dtype)
    INFO["bf16_grad_norm_finite"] = bool(torch.isfinite(torch.tensor(m["grad_norm"])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True, help="a directory both ranks see (the checkpoint goes there)")
    parser.add_argument("--phases", default="tp2,pp2,vpp2")
    parser.add_argument("--hang-timeout", type=float, default=300, help="dump every thread's stack and exit after this long")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    torch.set_num_threads(1)
    spec = ModelSpec.from_hf_config(HF)
    batch, data = make_batch()
    timings = {}
    ckpt = os.path.join(args.workdir, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    t = time.time()
    ref1 = phase_tp1(spec, batch, data, ckpt)
    timings["tp1"] = time.time() - t
    for tag in args.phases.split(","):
        destroy_parallel(keep_process_group=True)
        t = time.time()
        print(f"phase {tag}", file=sys.stderr, flush=True)
        tp, pp, vpp = {"tp2": (2, 1, None), "pp2": (1, 2, None), "vpp2": (1, 2, 2)}[tag]
        phase_other(tag, tp, pp, vpp, spec, batch, data, ckpt, ref1)
        timings[tag] = time.time() - t
    dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, RESULTS)
    merged: dict[str, float] = {}
    for res in gathered:
        for k, v in res.items():
            merged[k] = max(merged.get(k, 0.0), v)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"diffs": merged, "info": INFO, "timings_s": {k: round(v, 2) for k, v in timings.items()}}, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
