"""What a first GPU run needs, checked on CPU (issue 15): micro-batch padding for sequence
parallelism / FP8, entropy without gradients at coefficient 0, the loss-scaling self-check,
and trainer offload.

The padding rule is a fast unit test here. The rest runs in one child process
(``python tests/test_models_gpu_ready.py --out F``, world size 1, gloo, CPU, the module
fixture) that records results in JSON for the tests below:
  - padding: an actor whose micro-batches are padded to a multiple of 8 (what SP/FP8 ask
    for) gives the same log-probs, entropy, loss and gradients as the unpadded one;
  - entropy: with ``entropy_grad=False`` the ``entropy_BT`` handed to the loss has no
    autograd node, and the gradients at coefficient 0 equal those with it differentiated;
  - loss scaling: ``check_loss_scaling`` passes for actor and critic (fp32, plain and
    distributed optimizer), and fails when the loss-scale factor is wrong (the control);
  - offload: after a step, ``TrainerOffload`` frees every parameter, master-weight,
    optimizer-state and gradient storage (0 bytes while offloaded), restores them bit for
    bit, and the next two steps equal those of a twin that never offloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megappo.models.batch import TokenBatch
from megappo.models.model_inputs import model_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
HF = dict(
    model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=256,
)
TEMP = 0.7


@pytest.mark.parametrize("multiple", [1, 2, 8, 16])
def test_every_padded_microbatch_is_padded_to_the_multiple(multiple):
    ids = torch.arange(3 * 11).view(3, 11)
    b = TokenBatch(ids, torch.tensor([2, 1, 3]), torch.tensor([4, 0, 8]))
    plain, padded = model_inputs(b), model_inputs(b, "padded", multiple)
    assert padded.seq_length % multiple == 0 and 0 <= padded.seq_length - b.S < multiple
    assert torch.equal(padded.input_ids[:, : b.S], ids) and not padded.input_ids[:, b.S :].any()
    # The gathered outputs (what every loss and metric reads) are the same positions of the same rows.
    out = torch.randn(3, b.S, 5)
    wide = torch.nn.functional.pad(out, (0, 0, 0, padded.seq_length - b.S), value=float("nan"))
    assert torch.equal(padded.gather(wide), plain.gather(out))
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        model_inputs(b, "padded", 0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_ready") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" not in line)[-6000:]
        pytest.fail(f"{Path(__file__).name} checks failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


@pytest.mark.slow
def test_padded_microbatches_give_the_same_outputs_loss_and_grads(results):
    r = results["padding"]
    assert r["padded_widths"] and all(w % 8 == 0 for w in r["padded_widths"]) and r["padded_widths"] != r["plain_widths"]
    for k in ("logprobs", "entropy", "loss", "grads"):
        assert r[k] < 1e-5, (k, r[k])


@pytest.mark.slow
def test_entropy_has_no_autograd_node_at_coefficient_zero(results):
    r = results["entropy"]
    assert r["no_grad"] == {"requires_grad": False, "has_grad_fn": False}
    assert r["with_grad"] == {"requires_grad": True, "has_grad_fn": True}
    assert r["grad_diff"] == 0.0 and r["grad_norm"] > 0


@pytest.mark.slow
def test_loss_scaling_self_check_passes_and_catches_a_wrong_factor(results):
    r = results["loss_check"]
    for name in ("actor", "critic", "actor_distopt"):
        rep = r[name]
        assert rep["counts"][0] < rep["counts"][1]
        assert rep["rel_diff_microbatches"] < 1e-4 and rep["rel_diff_autograd"] < 1e-4, (name, rep)
    assert r["wrong_factor_raises"].startswith("LossScalingError: loss-scaling self-check (actor)"), r["wrong_factor_raises"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "distopt"])
def test_offload_round_trips_bit_exact_and_training_continues_identically(results, variant):
    r = results["offload"][variant]
    assert r["offloaded_bytes"] >= r["state_bytes"] > 0
    assert r["freed_bytes"] > r["offloaded_bytes"]  # the gradient buffers too
    assert r["live_bytes_while_offloaded"] == 0
    assert r["roundtrip_max_diff"] == 0.0
    assert r["next_steps_max_diff"] == 0.0 and r["moved"] > 0
    assert r["second_cycle_reused_host_buffers"]


# ---------------------------------------------------------------------- the child process

def _child(out_path: str) -> None:
    from megappo.algo import policy_loss, value_loss
    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings
    from megappo.models import loss_check, policy as policy_mod
    from megappo.models.offload import TrainerOffload, _torch_optimizers
    from megappo.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1, seed=5, device="cpu")
    torch.set_num_threads(1)
    spec = ModelSpec.from_hf_config(HF)
    g = torch.Generator().manual_seed(7)
    B, S = 6, 21
    ids = torch.randint(0, HF["vocab_size"], (B, S), generator=g)
    batch = TokenBatch(ids, torch.tensor([3, 8, 2, 5, 1, 6]), torch.tensor([10, 13, 0, 7, 20, 1]))
    T = batch.T
    adv, mask = torch.randn(B, T, generator=g), batch.response_mask_BT
    returns = torch.randn(B, T, generator=g)
    num_tokens = float(mask.sum())
    res: dict = {}

    def maxdiff(a, b) -> float:
        return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max()) if torch.as_tensor(a).numel() else 0.0

    def make(role="actor", seed_from=None, **optim_kw):
        pol = MegatronPolicy(spec, role, BuildOptions(value_head_init_std=0.05), OptimizerSettings(lr=1e-3, **optim_kw),
                             max_tokens_per_microbatch=60)
        if seed_from is not None:
            pol.models[0].load_state_dict(seed_from.models[0].state_dict())
        return pol

    base = make()
    with torch.no_grad():  # peaked distributions, so entropy varies per token
        base.models[0].output_layer.weight.mul_(10)
    old_lp = base.forward_logprobs(batch, temperature=TEMP)["logprobs_BT"] + 0.1 * torch.randn(B, T, generator=g)

    seen: dict = {}

    def actor_loss(coef):
        def fn(out, rows):
            ent = out["entropy_BT"]
            seen["entropy"] = {"requires_grad": ent.requires_grad, "has_grad_fn": ent.grad_fn is not None}
            return policy_loss(out["logprobs_BT"], old_lp[rows], adv[rows], mask[rows], clip_low=0.2, clip_high=0.28,
                               entropy=ent, entropy_coef=coef, num_tokens=num_tokens)
        return fn

    def grads_of(pol):
        return torch.cat([p.main_grad.reshape(-1).clone() for p in pol.models[0].parameters()])

    # -- padding: every micro-batch to a multiple of 8 vs unpadded
    padded = make(seed_from=base)
    padded._pad_multiple = 8
    plain_mbs, padded_mbs = base._microbatches(batch, None), padded._microbatches(batch, None)
    pr = {"plain_widths": [m.inputs.seq_length for m in plain_mbs], "padded_widths": [m.inputs.seq_length for m in padded_mbs]}
    outs = [p.forward_logprobs(batch, temperature=TEMP, with_entropy=True) for p in (base, padded)]
    pr["logprobs"] = maxdiff(outs[0]["logprobs_BT"], outs[1]["logprobs_BT"])
    pr["entropy"] = maxdiff(outs[0]["entropy_BT"], outs[1]["entropy_BT"])
    ms = [p.forward_backward(batch, actor_loss(0.01), temperature=TEMP) for p in (base, padded)]
    pr["loss"] = maxdiff(ms[0]["loss"], ms[1]["loss"])
    pr["grads"] = maxdiff(grads_of(base), grads_of(padded))
    res["padding"] = pr

    # -- entropy: detached at coefficient 0, same gradients
    er: dict = {}
    base.forward_backward(batch, actor_loss(0.0), temperature=TEMP, entropy_grad=True)
    er["with_grad"] = dict(seen["entropy"])
    g_with = grads_of(base)
    base.forward_backward(batch, actor_loss(0.0), temperature=TEMP, entropy_grad=False)
    er["no_grad"] = dict(seen["entropy"])
    g_without = grads_of(base)
    er["grad_diff"], er["grad_norm"] = maxdiff(g_with, g_without), float(g_with.norm())
    res["entropy"] = er

    # -- loss-scaling self-check, and its control (a wrong factor must fail it)
    lr: dict = {}
    critic = make("critic")
    distopt = make(seed_from=base, use_distributed_optimizer=True)
    for name, pol in (("actor", base), ("critic", critic), ("actor_distopt", distopt)):
        rep = loss_check.check_loss_scaling(pol)
        lr[name] = {"counts": list(rep.microbatch_counts), "rel_diff_microbatches": rep.rel_diff_microbatches,
                    "rel_diff_autograd": rep.rel_diff_autograd}
    original = policy_mod.loss_scale_factor
    policy_mod.loss_scale_factor = lambda m, dp: 1.0  # as if Megatron stopped dividing by M
    try:
        loss_check.check_loss_scaling(base)
        lr["wrong_factor_raises"] = "no error"
    except loss_check.LossScalingError as e:
        lr["wrong_factor_raises"] = f"LossScalingError: {e}"
    finally:
        policy_mod.loss_scale_factor = original
    res["loss_check"] = lr

    # -- offload: round trip and identical continuation against a twin
    def state_tensors(pol) -> list[torch.Tensor]:
        ts = [p.data for p in pol.models[0].parameters()]
        for opt in _torch_optimizers(pol.optimizer):
            for group in opt.param_groups:
                ts += [p.data for p in group["params"]]
            for st in opt.state.values():
                ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return ts

    def step(pol, crit):
        pol.train_step(batch, actor_loss(0.01), temperature=TEMP)
        crit.train_step(batch, lambda out, rows: value_loss(out["values_BT"], returns[rows] * 0.5, returns[rows], mask[rows],
                                                           value_clip=0.2, num_tokens=num_tokens))

    ores: dict = {}
    for variant, kw in (("plain", {}), ("distopt", {"use_distributed_optimizer": True})):
        a, twin = make(seed_from=base, **kw), make(seed_from=base, **kw)
        c, ctwin = make("critic", **kw), make("critic", **kw)
        ctwin.models[0].load_state_dict(c.models[0].state_dict())
        ref = MegatronPolicy(spec, "reference", BuildOptions())
        start = [t.clone() for t in state_tensors(a)]
        for pol, crit in ((a, c), (twin, ctwin)):
            step(pol, crit)
        before = [t.clone() for t in state_tensors(a) + state_tensors(c)]
        off = TrainerOffload([a, c, ref])
        stats = off.offload()
        live = sum(t.untyped_storage().nbytes() for t in state_tensors(a) + state_tensors(c))
        live += sum(p.main_grad.untyped_storage().nbytes() for pol in (a, c) for p in pol.models[0].parameters())
        off.onload()
        after = state_tensors(a) + state_tensors(c)
        r = {"offloaded_bytes": stats.offloaded_bytes, "freed_bytes": stats.freed_bytes, "live_bytes_while_offloaded": live,
             "state_bytes": sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                 for t in state_tensors(a) + state_tensors(c)}.values()),
             "roundtrip_max_diff": max(maxdiff(x, y) for x, y in zip(before, after)) if len(before) == len(after) else float("inf")}
        hosts = {id(s.host) for s in off._slots if s.host is not None}
        with off.offloaded():
            pass
        r["second_cycle_reused_host_buffers"] = hosts == {id(s.host) for s in off._slots if s.host is not None}
        for _ in range(2):
            for pol, crit in ((a, c), (twin, ctwin)):
                step(pol, crit)
        r["next_steps_max_diff"] = max(maxdiff(x, y) for x, y in zip(state_tensors(a) + state_tensors(c),
                                                                    state_tensors(twin) + state_tensors(ctwin)))
        r["moved"] = max(maxdiff(x, y) for x, y in zip(state_tensors(a)[: len(start)], start))
        ores[variant] = r
    res["offload"] = ores

    Path(out_path).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    _child(parser.parse_args().out)
