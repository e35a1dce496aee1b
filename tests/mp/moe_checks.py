"""Mixture-of-experts checks under ``torchrun --nproc-per-node 2`` (gloo, CPU), run by
``tests/test_moe_parallel.py``; every comparison goes to a JSON file as a max abs difference.

Tiny Qwen3-MoE (4 experts, top-2, one dense layer by ``mlp_only_layers``) and Mixtral
(4 experts, top-2) models are written by rank 0. Then, one layout after another on the
same two processes:

  ep1   TP=1 PP=1 EP=1 (each rank the whole model): log-probs against transformers; the
        loss and gradients of a fixed batch (the reference for ep2).
  ep2   EP=2: log-probs against transformers; each rank takes half the batch, so the
        summed loss and the all-reduced non-expert gradients equal ep1's full-batch ones,
        and each rank's experts (which see the tokens of both halves through the
        all-to-all) equal ep1's gradients of those experts. HF -> Megatron -> HF through
        ``load_hf_into_model`` and ``iter_hf_tensors`` (experts gathered over EP) is bit exact;
        ``sync_weights`` to a recording engine delivers every expert in 16 KiB buckets, bit exact.
        At ep1 and ep2 the policy is also synced into the real embedded engine (transformers 5,
        experts fused in memory): bit exact, checksum equal, its log-probs the policy's.
  tp2   TP=2 and pp2 PP=2: log-probs against transformers.
  convert  ``convert_hf_to_megatron(..., ep=2)`` writes a checkpoint for the test to export at world 1.
  r3    rollout routing replay at EP=2 (each rank half the batch) and PP=2: a 4-layer Qwen3-MoE
        (layer 1 dense) whose routers tie, nudged one way in the embedded engine and the other
        in the trainer (``test_rollout_routing.near_tie_moe``); the engine's samples and
        routed experts; the actor replaying them: first ratio, engine-vs-trainer log-probs
        (and, at EP=2, the same without replay).

The load-balancing loss is off in the gradient check (``moe_aux_loss_coeff=0``): it is a
per-rank statistic, so halving the batch changes it by design.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_fixtures import make_tiny_hf_model, read_config, read_hf_state  # noqa: E402
from test_rollout_routing import engine_rollout_batch, near_tie_moe  # noqa: E402

from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, TokenBatch  # noqa: E402
from megappo.models.builder import build_model_chunks  # noqa: E402
from megappo.parallel import destroy_parallel, init_parallel  # noqa: E402
from megappo.parallel.state import get_layout  # noqa: E402
from megappo.rollout import SamplingParams, checksums_match  # noqa: E402
from megappo.rollout.embedded import EmbeddedEngine  # noqa: E402
from megappo.rollout.weight_sync import sync_weights  # noqa: E402
from megappo.toolkit.compare import fixed_sequences, hf_logprobs_NT  # noqa: E402
from megappo.weights.base import plan, table_for  # noqa: E402
from megappo.weights.model_io import iter_hf_tensors, load_hf_into_model, placement_of  # noqa: E402

RESULTS: dict[str, float] = {}
FAMILIES = {"qwen3_moe": dict(mlp_only_layers=[1], norm_topk_prob=True), "mixtral": {}, "qwen2_moe": {}}


def record(name: str, value: float) -> None:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    RESULTS[name] = float(t)


def logprob_parity(tag: str, dirs: dict, ids_NS: torch.Tensor, hf_NT: dict, tp: int, pp: int, ep: int, engine: bool = False) -> None:
    init_parallel(tp, pp, seed=3, device="cpu", ep=ep)
    N, S = ids_NS.shape
    batch = TokenBatch(ids_NS, torch.ones(N, dtype=torch.long), torch.full((N,), S - 1))
    for fam, d in dirs.items():
        policy = MegatronPolicy(ModelSpec.from_hf_dir(d), "reference", BuildOptions(tp=tp, pp=pp, ep=ep))
        load_hf_into_model(policy.models, d)
        mg_NT = policy.forward_logprobs(batch, temperature=1.0)["logprobs_BT"]
        record(f"{tag}_{fam}_logprobs_vs_hf", (mg_NT - hf_NT[fam]).abs().max())
        if engine:
            sync_into_embedded_engine(f"{tag}_{fam}", d, policy, ids_NS[:, :5])
    destroy_parallel(keep_process_group=True)


def sync_into_embedded_engine(tag: str, d: str, policy, prompts_NP: torch.Tensor) -> None:
    """Weight sync from the Megatron policy into this rank's embedded engine (transformers 5,
    experts fused in memory) in 16 KiB buckets: every tensor equals ``from_pretrained``'s, the
    engine's checksum the trainer's; then the engine samples and the policy scores the same
    tokens (trainer vs engine log-probs)."""
    from transformers import AutoModelForCausalLM

    engine = EmbeddedEngine(read_config(d), eos_token_ids=())
    stats = sync_weights(policy.models, engine, get_layout(), bucket_mb=1 / 64, checksum=True)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
    held = engine.model.state_dict()
    exact = sorted(held) == sorted(ref) and all(torch.equal(t, ref[k]) for k, t in held.items())
    record(f"{tag}_engine_not_exact", 0.0 if exact else 1.0)
    record(f"{tag}_engine_checksum_mismatch", 0.0 if checksums_match(stats.checksum, engine.weights_checksum()) else 1.0)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=dist.get_rank())
    samples = [s for group in engine.generate(prompts_NP.tolist(), params) for s in group]
    N, P = len(samples), prompts_NP.shape[1]
    T = max(len(s.token_ids) for s in samples)
    ids_NS = prompts_NP.repeat_interleave(2, dim=0).new_zeros(N, P + T)
    ids_NS[:, :P] = prompts_NP.repeat_interleave(2, dim=0)
    engine_NT = torch.zeros(N, T)
    for i, s in enumerate(samples):
        ids_NS[i, P : P + len(s.token_ids)] = torch.tensor(s.token_ids)
        engine_NT[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    batch = TokenBatch(ids_NS, torch.full((N,), P), torch.tensor([len(s.token_ids) for s in samples]))
    mg_NT = policy.forward_logprobs(batch, temperature=1.0)["logprobs_BT"]
    record(f"{tag}_engine_vs_megatron", ((mg_NT - engine_NT) * batch.response_mask_BT).abs().max())
    RESULTS[f"{tag}_engine_tokens"] = int(batch.response_mask_BT.sum())
    engine.shutdown()


def hf_grads(model, spec) -> dict[str, torch.Tensor]:
    """This rank's gradients keyed by each tensor's first HF name (experts by global number)."""
    params = dict(model.named_parameters())
    return {e.hf[0]: params[e.megatron].grad.clone() for e in plan(table_for(spec), spec, placement_of(model))}


def loss_and_grads(d: str, ids_NS: torch.Tensor, ep: int):
    spec = ModelSpec.from_hf_dir(d)
    (model,) = build_model_chunks(spec, "actor", BuildOptions(ep=ep, moe_aux_loss_coeff=0.0))
    load_hf_into_model([model], d)
    model.train()
    pos = torch.arange(ids_NS.shape[1]).expand_as(ids_NS)
    logits = model(ids_NS, pos, None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids_NS[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach(), hf_grads(model, spec), spec


class _Recorder:
    """A stand-in rollout engine that keeps what a weight sync delivers."""

    name, receives_weights, spot_checked = "recorder", True, False

    def __init__(self):
        self.got: dict[str, torch.Tensor] = {}

    def update_weights(self, buckets) -> None:
        for bucket in buckets:
            for name, tensor in bucket:
                assert name not in self.got, f"{name} sent twice"
                self.got[name] = tensor.clone()

    def checksum_scope(self):
        return None


def rollout_replay(tag: str, workdir: str, *, ep: int, pp: int, source: str = "rollout") -> None:
    from megappo.models import OptimizerSettings

    engine_dir, trainer_dir = os.path.join(workdir, "r3-engine"), os.path.join(workdir, "r3-trainer")
    B = 8
    batch = engine_rollout_batch(engine_dir, B // 2)
    init_parallel(1, pp, seed=3, device="cpu", ep=ep)
    layout = get_layout()
    if layout.dp > 1:
        batch = batch.select(torch.arange(B).chunk(layout.dp)[layout.dp_rank])
    tokens, mask = batch.tokens, batch.mask_BT.bool()
    policy = MegatronPolicy(ModelSpec.from_hf_dir(trainer_dir), "actor",
                            BuildOptions(pp=pp, ep=ep, routing_replay=True, routing_replay_source=source),
                            OptimizerSettings(lr=1e-4), max_tokens_per_microbatch=10_000)
    load_hf_into_model(policy, trainer_dir)
    old = policy.forward_logprobs(tokens, temperature=1.0)["logprobs_BT"]
    seen = [0.0]

    def loss_fn(outputs, rows):
        ratio = torch.exp(outputs["logprobs_BT"] - old[rows])
        seen.append(float((ratio - 1).abs()[mask[rows]].max()))
        return -(ratio * mask[rows]).sum(), {}

    metrics = policy.forward_backward(tokens, loss_fn)
    record(f"{tag}_ratio_minus_1", max(seen))
    record(f"{tag}_engine_vs_trainer", float((old - batch.rollout_logprobs_BT).abs()[mask].max()))
    record(f"{tag}_rollout_routing_changed_frac", metrics.get("moe/rollout_routing_changed_frac", -1.0))
    destroy_parallel(keep_process_group=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--hang-timeout", type=float, default=400)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dirs = {fam: os.path.join(args.workdir, fam) for fam in FAMILIES}
    if rank == 0:
        for fam, extra in FAMILIES.items():
            make_tiny_hf_model(args.workdir, fam, name=fam, layers=2, vocab=101, **extra)
    dist.barrier()
    ids_NS = fixed_sequences(101, 4, 12, seed=0)
    hf_NT = {fam: hf_logprobs_NT(d, ids_NS) for fam, d in dirs.items()}

    logprob_parity("ep1", dirs, ids_NS, hf_NT, 1, 1, 1, engine=True)
    logprob_parity("ep2", dirs, ids_NS, hf_NT, 1, 1, 2, engine=True)
    logprob_parity("tp2", dirs, ids_NS, hf_NT, 2, 1, 1)
    logprob_parity("pp2", dirs, ids_NS, hf_NT, 1, 2, 1)

    for fam, d in dirs.items():
        init_parallel(1, 1, seed=3, device="cpu", ep=1)
        ref_loss, ref_grads, spec = loss_and_grads(d, ids_NS, 1)
        destroy_parallel(keep_process_group=True)
        init_parallel(1, 1, seed=3, device="cpu", ep=2)
        half = ids_NS.chunk(2)[rank]
        loss, grads, _ = loss_and_grads(d, half, 2)
        dist.all_reduce(loss)
        record(f"ep2_{fam}_loss", (loss - ref_loss).abs())
        worst, experts_seen = 0.0, 0
        for key, g in grads.items():
            if ".experts." not in key:
                dist.all_reduce(g)
            else:
                experts_seen += 1
            worst = max(worst, float((g - ref_grads[key]).abs().max()))
        record(f"ep2_{fam}_grads", worst)
        RESULTS[f"ep2_{fam}_ref_grad_norm"] = float(torch.stack([g.norm() for g in ref_grads.values()]).norm())
        RESULTS[f"ep2_{fam}_local_expert_tensors"] = experts_seen
        # HF -> Megatron -> HF at EP=2, bit exact.
        (model,) = build_model_chunks(spec, "actor", BuildOptions(ep=2))
        load_hf_into_model([model], d)
        hf_state = read_hf_state(d)
        out = dict(iter_hf_tensors([model]))
        exact = sorted(out) == sorted(hf_state) and all(torch.equal(out[k], hf_state[k]) for k in hf_state)
        record(f"ep2_{fam}_roundtrip_not_exact", 0.0 if exact else 1.0)
        RESULTS[f"ep2_{fam}_roundtrip_tensors"] = len(out)
        # Online weight sync at EP=2: each replica's engine receives every expert, in
        # 16 KiB buckets, bit exact.
        engine = _Recorder()
        stats = sync_weights([model], engine, get_layout(), bucket_mb=1 / 64)
        got = engine.got
        same = sorted(got) == sorted(hf_state) and all(torch.equal(got[k], hf_state[k]) for k in hf_state)
        record(f"ep2_{fam}_sync_not_exact", 0.0 if same else 1.0)
        largest = max(t.numel() * t.element_size() for t in hf_state.values())
        record(f"ep2_{fam}_sync_peak_over_bound", stats.peak_bucket_bytes / max(2**14, largest))
        RESULTS[f"ep2_{fam}_sync_buckets"] = stats.num_buckets
        destroy_parallel(keep_process_group=True)

    if rank == 0:
        near_tie_moe(args.workdir, "r3-engine", nudge=1e-5, layers=4)
        near_tie_moe(args.workdir, "r3-trainer", nudge=-1e-5, layers=4)
    dist.barrier()
    rollout_replay("r3_ep2", args.workdir, ep=2, pp=1)
    rollout_replay("r3_ep2_free", args.workdir, ep=2, pp=1, source="old")
    rollout_replay("r3_pp2", args.workdir, ep=1, pp=2)

    from megappo.toolkit.convert import convert_hf_to_megatron

    for fam, d in dirs.items():
        convert_hf_to_megatron(d, os.path.join(args.workdir, f"{fam}-ckpt-ep2"), ep=2)
        destroy_parallel(keep_process_group=True)

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
