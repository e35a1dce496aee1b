"""The reward model at a TP x PP of its own (``megappo.parallel.model_groups``), under an actor
layout that differs, on 2 ranks (pytest asserts on the JSON written):

  scores   each rank's rows (its actor data-parallel shard's: different rows on different
           shards, uneven counts) scored by ``RewardModel`` at the reward model's layout, against
           transformers' AutoModelForSequenceClassification on the same rows (fp32, right padding,
           several micro-batches), Llama and Qwen2, tied and untied
  loop     ``LoopRewardModel`` with ``reward.model.tensor_model_parallel_size`` /
           ``pipeline_model_parallel_size`` set, on policy rollouts, against transformers
  layers   which layers this rank holds (the reward model's pipeline, not the actor's)

Each phase is ``a{actor}-rm{rm}`` with layouts ``tp2`` / ``pp2`` / ``dp2`` (world 2, TP or PP 2,
else data parallel). Launch: ``torchrun x2``; between phases the same processes get new
Megatron groups. Each phase writes OUT/{phase}-rank{r}.json.
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch

RM_KEYS = ("rm-llama-untied", "rm-llama-tied", "rm-qwen2-untied", "rm-qwen2-tied")
SIZES = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
PHASES = ("atp2-rmdp2", "atp2-rmpp2", "app2-rmdp2", "adp2-rmtp2", "adp2-rmpp2")


def _layouts(phase: str) -> tuple[tuple[int, int], tuple[int, int]]:
    actor, rm = phase.split("-")
    return SIZES[actor[1:]], SIZES[rm[2:]]


def _regroup(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as mpu

    from megappo.parallel import state

    if state._LAYOUT is not None and (state._LAYOUT.tp, state._LAYOUT.pp) != (tp, pp):
        mpu.destroy_model_parallel()
        state._LAYOUT = None


def _shard_sequences(vocab: int, dp_rank: int) -> list[list[int]]:
    """This actor shard's rows: shard 0 has 5, shard 1 has 3 others (uneven on purpose)."""
    g = torch.Generator().manual_seed(3 + dp_rank)
    lengths = (5, 17, 9, 12, 3) if dp_rank == 0 else (14, 2, 11)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def check_scores(ctx, key: str, rm_tp: int, rm_pp: int, res: dict) -> None:
    from hf_fixtures import hf_reward_scores

    from megappo.models.builder import BuildOptions
    from megappo.models.reward_model import RewardModel, SequenceBatch
    from megappo.parallel.state import get_layout
    from megappo.weights.reward import load_hf_into_reward_model, reward_spec

    path = ctx.zoo[key]
    layout = get_layout()
    spec = reward_spec(path)
    rm = RewardModel(spec, BuildOptions(tp=rm_tp, pp=rm_pp), max_tokens_per_microbatch=40)
    load_hf_into_reward_model(rm.models, path)
    seqs = _shard_sequences(spec.vocab_size, layout.dp_rank)
    ours = rm.score(SequenceBatch.from_lists(seqs))
    res[f"{key}/num_rows"] = len(seqs)
    res[f"{key}/score_diff"] = float((ours.cpu() - hf_reward_scores(path, seqs)).abs().max())
    g = rm.groups
    res[f"{key}/rm_groups"] = [g.tp, g.pp, g.dp, g.tp_rank, g.pp_rank, g.dp_rank, g.shares_actor_layout]
    res[f"{key}/layers"] = [layer.layer_number for layer in rm.models[0].decoder.layers]


def check_loop(ctx, rm_tp: int, rm_pp: int, res: dict) -> None:
    """``LoopRewardModel`` from a ``reward.model`` section with its own layout."""
    from hf_fixtures import hf_reward_scores
    from transformers import AutoTokenizer

    from megappo.models.batch import TokenBatch
    from megappo.parallel.state import get_layout
    from megappo.rollout.reward_model import LoopRewardModel

    layout = get_layout()
    policy = AutoTokenizer.from_pretrained(ctx.policy_tok)
    rows = [("3+4=", "7", False), ("12+30=", "42", True), ("9+9=", "18", False)][: 3 - layout.dp_rank]
    seqs, plens, rlens, trunc = [], [], [], []
    for prompt, response, truncated in rows:
        p = policy(prompt, add_special_tokens=False)["input_ids"]
        r = policy(response, add_special_tokens=False)["input_ids"] + ([] if truncated else [policy.eos_token_id])
        seqs.append(p + r), plens.append(len(p)), rlens.append(len(r)), trunc.append(truncated)
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    key = "rm-qwen2-untied"
    cfg = SimpleNamespace(hf_path=ctx.zoo[key], tokenizer_path=ctx.policy_tok, on_cpu=False,
                          tensor_model_parallel_size=rm_tp, pipeline_model_parallel_size=rm_pp)
    loop_rm = LoopRewardModel(cfg, layout, policy, max_tokens_per_microbatch=24)
    got = loop_rm.score(TokenBatch(ids, torch.tensor(plens), torch.tensor(rlens)), torch.tensor(trunc))
    res["loop/rm_layout"] = [loop_rm.model.groups.tp, loop_rm.model.groups.pp]
    res["loop/score_diff"] = float((got - hf_reward_scores(ctx.zoo[key], seqs)).abs().max())


def run_phase(ctx, phase: str) -> dict:
    from megappo.parallel.state import get_layout, init_parallel

    (tp, pp), (rm_tp, rm_pp) = _layouts(phase)
    _regroup(tp, pp)
    init_parallel(tp, pp, seed=1, device="cpu")
    layout = get_layout()
    res: dict = {"actor": [layout.tp, layout.pp, layout.dp, layout.dp_rank]}
    for key in RM_KEYS:
        check_scores(ctx, key, rm_tp, rm_pp, res)
    check_loop(ctx, rm_tp, rm_pp, res)
    return res


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", required=True, help="JSON: zoo, policy_tok")
    ap.add_argument("--out", required=True)
    ap.add_argument("phases", nargs="+", choices=PHASES)
    args = ap.parse_args()
    ctx = SimpleNamespace(**json.loads(args.ctx))
    for phase in args.phases:
        res = run_phase(ctx, phase)
        with open(os.path.join(args.out, f"{phase}-rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
