"""Training-checkpoint phases of ``weights_launch.py`` (pytest: tests/test_checkpoint.py).

ckpt_train (2 ranks, TP=1 DP=2): actor (distributed optimizer) and critic (plain
  optimizer) as ``MegatronPolicy`` loaded from HF; one step, ``save(1)``, steps 2 and 3
  (the uninterrupted reference; step 3's loss depends on the restored Adam state and LR
  schedule); fresh objects resume from step 1 and repeat steps 2 and 3 (identical
  losses and weights, RNG included); a save that raises midway leaves ``latest`` alone; finally
  every rank is SIGKILLed in the middle of ``save(3)`` (the launch exits non-zero).
ckpt_resume (1 process, DP=1): resume from ``latest`` at another DP size and repeat
  steps 2 and 3 (same losses to float tolerance); mismatched tokenizer / architecture errors; a new
  save removes the stale temporary directory and prunes to ``keep_last``. Then, in a directory of
  its own (tests/test_reliability.py): the checkpoint-writer helper survives the preemption
  signals; a resume with a new lr / warm-up / beta1 applies them to Megatron's optimizer and
  scheduler; an algorithm change is refused.
"""

from __future__ import annotations

import os
import signal

import torch

KEY = "qwen3-tied"


def build(spec, hf, **optim_overrides):
    from megappo.models import BuildOptions, MegatronPolicy, OptimizerSettings
    from megappo.weights import load_hf_into_model

    optim = OptimizerSettings(**{"lr": 1e-3, "lr_warmup_steps": 3, "weight_decay": 0.01, **optim_overrides})
    pols = {
        "actor": MegatronPolicy(spec, "actor", BuildOptions(), OptimizerSettings(**{**optim.__dict__, "use_distributed_optimizer": True})),
        "critic": MegatronPolicy(spec, "critic", BuildOptions(value_head_init_std=0.05), optim),
    }
    for p in pols.values():
        load_hf_into_model(p, hf)  # a policy: its optimizer's own fp32 copy is refreshed too
    return pols


def make_step(layout):
    """One actor + critic optimizer step on a fixed global batch (this DP rank's share)."""
    from megappo.models import TokenBatch
    from megappo.parallel import collectives

    g = torch.Generator().manual_seed(5)
    batch = TokenBatch(torch.randint(0, 103, (4, 12), generator=g), torch.tensor([3, 2, 4, 1]), torch.tensor([9, 6, 8, 11]))
    returns = torch.randn(4, batch.T, generator=g)
    rows = torch.arange(batch.B).tensor_split(layout.dp)[layout.dp_rank]
    share = batch.select(rows, trim=False)
    mask = share.response_mask_BT
    n = float(collectives.dp_all_reduce(mask.double().sum()))

    def actor_loss(out, r):
        return -(out["logprobs_BT"] * mask[r]).sum() / n, {}

    def critic_loss(out, r):
        return ((out["values_BT"] - returns[rows[r]]) ** 2 * mask[r]).sum() / n, {}

    def step(pols):
        a = pols["actor"].train_step(share, actor_loss)
        c = pols["critic"].train_step(share, critic_loss)
        return [a["loss"], c["loss"]]

    return step


def weights_checksum(pols) -> list[float]:
    """Sum of |w| over each role's parameters (float64): equal weights give equal sums."""
    return [sum(float(p.detach().double().abs().sum()) for m in pol.models for p in m.parameters()) for pol in pols.values()]


def save_args(spec, step):
    return dict(
        extra={"data": {"cursor": 4 * step}, "kl": {"coef": 0.1 * step}, "reward_stats": torch.tensor([1.0, 2.0])},
        config_dict={"train": {"seed": 3}},
        spec_dict=spec.to_dict(),
        tokenizer_fingerprint="tok-A",
    )


def phase_train(ctx, res, write):
    from megatron.core import dist_checkpointing

    from megappo.checkpoint import CheckpointManager
    from megappo.models import ModelSpec
    from megappo.parallel import init_parallel

    layout = init_parallel(1, 1, seed=3, device="cpu")
    hf = ctx.zoo[KEY]
    spec = ModelSpec.from_hf_dir(hf)
    step = make_step(layout)
    mgr = CheckpointManager(ctx.ckpt_dir, keep_last=2)
    pols = build(spec, hf)
    res["dp"] = layout.dp
    res["loss1"] = step(pols)
    mgr.save(1, policies=pols, **save_args(spec, 1))
    rand_after_save = torch.rand(4)
    res["loss2"] = step(pols)
    res["loss3"] = step(pols)  # depends on the optimizer state and LR schedule after step 2
    res["weights3"] = weights_checksum(pols)

    torch.manual_seed(12345)
    fresh = build(spec, hf)
    extra = mgr.load(policies=fresh, tokenizer_fingerprint="tok-A")
    res["rng_restored"] = bool(torch.equal(torch.rand(4), rand_after_save))
    res["extra"] = {"data": extra["data"], "kl": extra["kl"], "step": extra["step"], "reward_stats": extra["reward_stats"].tolist()}
    res["loss2_resumed"] = step(fresh)
    res["loss3_resumed"] = step(fresh)
    res["weights3_resumed"] = weights_checksum(fresh)

    real_save = dist_checkpointing.save

    def failing_save(state, path, *a, **k):
        real_save(state, path, *a, **k)
        if path.endswith("critic"):
            raise RuntimeError("injected failure after the critic's files")

    dist_checkpointing.save = failing_save
    try:
        mgr.save(2, policies=fresh, **save_args(spec, 2))
        res["injected_error"] = None
    except RuntimeError as e:
        res["injected_error"] = str(e)
    dist_checkpointing.save = real_save
    res["latest_after_error"] = os.path.basename(mgr.latest())
    write()

    def killed_save(state, path, *a, **k):
        real_save(state, path, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # the whole job dies, as on a node failure

    dist_checkpointing.save = killed_save
    mgr.save(3, policies=fresh, **save_args(spec, 3))
    raise AssertionError("the save should have been killed")


def phase_resume(ctx, res, write):
    from megappo.checkpoint import CheckpointManager
    from megappo.models import ModelSpec
    from megappo.parallel import init_parallel
    from megappo.weights import iter_hf_tensors

    layout = init_parallel(1, 1, seed=3, device="cpu")
    hf = ctx.zoo[KEY]
    spec = ModelSpec.from_hf_dir(hf)
    mgr = CheckpointManager(ctx.ckpt_dir, keep_last=1)
    res["latest"] = os.path.basename(mgr.latest())
    res["dirs_before"] = sorted(os.listdir(ctx.ckpt_dir))
    pols = build(spec, hf)
    for fp, spec_dict, key in [
        ("tok-B", None, "tokenizer_error"),
        ("tok-A", {**spec.to_dict(), "hidden_size": 128, "num_kv_heads": 4}, "architecture_error"),
    ]:
        try:
            mgr.load(policies=pols, tokenizer_fingerprint=fp, spec_dict=spec_dict)
            res[key] = None
        except ValueError as e:
            res[key] = str(e)
    extra = mgr.load(policies=pols, tokenizer_fingerprint="tok-A")
    res["extra_step"] = extra["step"]
    step = make_step(layout)
    res["loss2_resumed_dp1"] = step(pols)
    res["loss3_resumed_dp1"] = step(pols)
    mgr.save(2, policies=pols, **save_args(spec, 2))
    res["dirs_after"] = sorted(os.listdir(ctx.ckpt_dir))
    res["latest_after"] = os.path.basename(mgr.latest())
    ctx.trained_actor = dict(iter_hf_tensors(pols["actor"].models))
    phase_reliability(ctx, res, pols, spec, hf, step, write)


def phase_reliability(ctx, res, pols, spec, hf, step, write):
    """Bugs 1 / 9 (the writer helper) and 4 (a changed config on resume), at DP=1."""
    import logging
    import time

    from megappo.checkpoint import CheckpointManager, start_writer_helper
    from megappo.helper_processes import PREEMPTION_SIGNALS, blocked_signals

    helper = start_writer_helper()  # started by the saves above: returns its pid
    res["writer_helper_blocked"] = sorted(blocked_signals(helper))
    for sig in PREEMPTION_SIGNALS:
        os.kill(helper, sig)
    time.sleep(0.5)
    with open(f"/proc/{helper}/status") as f:
        res["writer_helper_state"] = [line.split()[1] for line in f if line.startswith("State:")][0]
    res["writer_helper_pid"] = helper
    write()
    mgr = CheckpointManager(os.path.join(ctx.work, "reliability-ckpt"), keep_last=2)
    saved_cfg = {"optim": {"lr": 1e-3, "lr_warmup_steps": 3, "adam_beta1": 0.9}, "algo": {"adv_estimator": "grpo"}, "train": {"steps": 9}}
    mgr.save(4, policies=pols, **{**save_args(spec, 4), "config_dict": saved_cfg})  # through the signalled helper
    res["writer_helper_pid_after_save"] = start_writer_helper()
    res["saved_num_steps"] = pols["actor"].scheduler.num_steps

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megappo").addHandler(handler)
    new_cfg = {**saved_cfg, "optim": {"lr": 5e-4, "lr_warmup_steps": 1, "adam_beta1": 0.8}}
    fresh = build(spec, hf, lr=5e-4, lr_warmup_steps=1, adam_beta1=0.8)
    mgr.load(policies=fresh, tokenizer_fingerprint="tok-A", config_dict=new_cfg)
    logging.getLogger("megappo").removeHandler(handler)
    res["changed_config_log"] = records
    groups = [g for o in getattr(fresh["actor"].optimizer, "chained_optimizers", [fresh["actor"].optimizer]) for g in o.optimizer.param_groups]
    res["resumed_groups"] = [[g["lr"], g["max_lr"], list(g["betas"])] for g in groups]
    res["resumed_scheduler"] = [fresh["actor"].scheduler.num_steps, fresh["actor"].scheduler.max_lr]
    res["resumed_loss"] = step(fresh)  # trains with the new settings
    try:
        mgr.load(policies=build(spec, hf), tokenizer_fingerprint="tok-A", config_dict={**saved_cfg, "algo": {"adv_estimator": "gae"}})
        res["algo_change_error"] = None
    except ValueError as e:
        res["algo_change_error"] = str(e)
