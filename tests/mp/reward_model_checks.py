"""Reward-model checks at one parallel layout per phase (pytest asserts on the JSON written):

  scores      Megatron reward model vs transformers' AutoModelForSequenceClassification
              (fp32, right padding, varied lengths, several micro-batches), Llama and Qwen2,
              tied and untied
  export      iter_hf_tensors bit-exact against the HF files; save_hf -> from_pretrained ->
              the same scores
  convert     HF -> Megatron checkpoint at TP=2 (phase tp2), read back at PP=2 and
              exported to HF (phase pp2): bit-exact
  compare     megappo.toolkit.compare_reward_model rows
  train       megappo.rm_trainer.run from a causal LM (zero score head) for a few steps:
              per-step metrics and the exported weights, compared across layouts by pytest
  loop        the reward model in the RL loop (LoopRewardModel): same or another tokenizer
  resume      (world1) a run from a reward model, cut after step 2 and resumed, against
              the same run uninterrupted

Launches: ``python`` (world1) and ``torchrun x2`` (tp2, pp2, dp2); between phases the
same processes get new Megatron groups. Each phase writes OUT/{phase}-rank{r}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from types import SimpleNamespace

import torch

RM_KEYS = ("rm-llama-untied", "rm-llama-tied", "rm-qwen2-untied", "rm-qwen2-tied")
LAYOUTS = {"world1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
TRAIN_STEPS = 3


def _regroup(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as mpu

    from megappo.parallel import state

    if state._LAYOUT is not None and (state._LAYOUT.tp, state._LAYOUT.pp) != (tp, pp):
        mpu.destroy_model_parallel()
        state._LAYOUT = None


def _sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 12, 3, 16)]


def check_scores_and_export(ctx, key: str, tag: str, res: dict) -> None:
    import torch.distributed as dist
    from hf_fixtures import hf_reward_scores, read_config, read_hf_state

    from megappo.models.builder import BuildOptions
    from megappo.models.reward_model import RewardModel, SequenceBatch
    from megappo.parallel.state import get_layout
    from megappo.weights import iter_hf_tensors, save_hf
    from megappo.weights.reward import load_hf_into_reward_model, reward_spec

    path = ctx.zoo[key]
    layout = get_layout()
    spec = reward_spec(path)
    rm = RewardModel(spec, BuildOptions(tp=layout.tp, pp=layout.pp), max_tokens_per_microbatch=40)
    load_hf_into_reward_model(rm.models, path)
    seqs = _sequences(spec.vocab_size)
    ours = rm.score(SequenceBatch.from_lists(seqs))
    ref = hf_reward_scores(path, seqs)
    res[f"{key}/score_diff"] = float((ours - ref).abs().max())
    orig = read_hf_state(path)
    got = dict(iter_hf_tensors(rm.models))
    res[f"{key}/iter_names"] = sorted(got)
    res[f"{key}/iter_mismatch"] = [n for n, t in got.items() if n not in orig or not torch.equal(t, orig[n])]
    res[f"{key}/hf_names"] = sorted(orig)
    out = os.path.join(ctx.work, tag, key)
    save_hf(rm.models, out, hf_config=read_config(path), tokenizer_dir=path)
    if dist.get_rank() == 0:
        saved = read_hf_state(out)
        res[f"{key}/save_hf_mismatch"] = sorted(set(orig) ^ set(saved)) + [n for n in orig if n in saved and not torch.equal(saved[n], orig[n])]
        res[f"{key}/save_hf_score_diff"] = float((hf_reward_scores(out, seqs) - ours).abs().max())


def train_config(ctx, run_dir: str, hf_path: str, **extra):
    from megappo.config.loader import build, resolve_tree
    from megappo.parallel.state import get_layout

    layout = get_layout()
    overrides = {
        "parallel.tensor_model_parallel_size": layout.tp, "parallel.pipeline_model_parallel_size": layout.pp,
        "model.hf_path": hf_path, "parallel.device": "cpu", "train.run_dir": run_dir, "train.seed": 5,
        "train.max_tokens_per_microbatch": 48, "optim.lr": 3e-3, "reward_train.train_path": ctx.pairs,
        "reward_train.eval_path": ctx.eval_pairs, "reward_train.batch_size": 8, "reward_train.eval_every": 2,
        "reward_train.epochs": 1, "logging.tensorboard": False, "logging.progress_bar": False, **extra,
    }
    return build(resolve_tree(None, [f"{k}={v}" for k, v in overrides.items()]))


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def check_training(ctx, tag: str, res: dict) -> None:
    import torch.distributed as dist
    from hf_fixtures import read_hf_state

    from megappo.rm_trainer import run

    run_dir = os.path.join(ctx.work, f"train-{tag}")
    run(train_config(ctx, run_dir, ctx.lm, **{"reward_train.max_length": 64}))
    if dist.get_rank() == 0:
        res["train/metrics"] = _metrics(run_dir)
        res["train/hf"] = os.path.join(run_dir, "hf")
        res["train/hf_names"] = sorted(read_hf_state(os.path.join(run_dir, "hf")))
    dist.barrier()


def check_resume(ctx, res: dict) -> None:
    """From a reward model: an uninterrupted run against one cut after its step-2 checkpoint."""
    from hf_fixtures import read_hf_state

    from megappo.checkpoint import LATEST
    from megappo.rm_trainer import run

    full, cut = os.path.join(ctx.work, "resume-full"), os.path.join(ctx.work, "resume-cut")
    for d in (full, cut):
        run(train_config(ctx, d, ctx.zoo["rm-llama-tied"], **{"checkpoint.save_every": 2, "reward_train.epochs": 2}))
    ckpt = os.path.join(cut, "checkpoints")
    steps = sorted(n for n in os.listdir(ckpt) if n.startswith("step_"))
    res["resume/steps_saved"] = steps
    shutil.rmtree(os.path.join(ckpt, steps[-1]))  # as if the run died after saving step_{N-1}
    with open(os.path.join(ckpt, LATEST), "w") as f:
        f.write(steps[-2] + "\n")
    shutil.rmtree(os.path.join(cut, "hf"))
    run(train_config(ctx, cut, ctx.zoo["rm-llama-tied"], **{"checkpoint.save_every": 2, "reward_train.epochs": 2}))
    a, b = read_hf_state(os.path.join(full, "hf")), read_hf_state(os.path.join(cut, "hf"))
    res["resume/weights_max_diff"] = max(float((a[n] - b[n]).abs().max()) for n in a)
    res["resume/metrics_equal"] = _metrics(full) == _metrics(cut)
    res["resume/steps"] = [r["step"] for r in _metrics(cut)]


def _tool_main(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.normpath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def check_convert(ctx, tag: str, res: dict) -> None:
    """The conversion CLIs (``tools/convert_*.py``) find the reward model themselves: an HF
    ``*ForSequenceClassification`` in at TP=2, the model checkpoint out at PP=2, and the
    ``train_rm`` training checkpoint of phase tp2 out at PP=2 (against that run's own export)."""
    import torch.distributed as dist
    from hf_fixtures import read_hf_state

    def mismatch(a_dir, b_dir):
        a, b = read_hf_state(a_dir), read_hf_state(b_dir)
        return sorted(set(a) ^ set(b)) + [n for n in a if n in b and not torch.equal(a[n], b[n])]

    mcore = os.path.join(ctx.work, "rm-mcore-tp2")
    if tag == "tp2":
        res["convert/hf2m_rc"] = _tool_main("convert_hf_to_megatron")(["--hf-dir", ctx.zoo["rm-qwen2-tied"], "--out", mcore, "--tp", "2"])
    if tag == "pp2":
        out, trained = os.path.join(ctx.work, "rm-from-mcore"), os.path.join(ctx.work, "rm-from-train-ckpt")
        res["convert/m2hf_rc"] = _tool_main("convert_megatron_to_hf")(["--ckpt", mcore, "--out", out, "--pp", "2"])
        train_ckpt = os.path.join(ctx.work, "train-tp2", "checkpoints")
        res["convert/train_m2hf_rc"] = _tool_main("convert_megatron_to_hf")(["--ckpt", train_ckpt, "--out", trained, "--pp", "2"])
        if dist.get_rank() == 0:
            res["convert/mismatch"] = mismatch(ctx.zoo["rm-qwen2-tied"], out)
            res["convert/train_mismatch"] = mismatch(os.path.join(ctx.work, "train-tp2", "hf"), trained)
            for key, d in (("convert/architectures", out), ("convert/train_architectures", trained)):
                with open(os.path.join(d, "config.json")) as f:
                    res[key] = json.load(f)["architectures"]
        dist.barrier()


def check_loop_reward_model(ctx, res: dict) -> None:
    """``LoopRewardModel`` on policy rollouts (finished and truncated): with the policy's own
    vocabulary the ids pass through; with another tokenizer each row is re-tokenized. Both
    against transformers on the ids the reward model's tokenizer makes of the same text."""
    from hf_fixtures import hf_reward_scores
    from transformers import AutoTokenizer

    from megappo.models.batch import TokenBatch
    from megappo.parallel.state import get_layout
    from megappo.rollout.reward_model import LoopRewardModel

    policy = AutoTokenizer.from_pretrained(ctx.policy_tok)
    rows = [("3+4=", "7", False), ("12+30=", "42", True), ("9+9=", "18", False), ("1+1=", "", False)]
    seqs, plens, rlens, trunc = [], [], [], []
    for prompt, response, truncated in rows:
        p = policy(prompt, add_special_tokens=False)["input_ids"]
        r = policy(response, add_special_tokens=False)["input_ids"] + ([] if truncated else [policy.eos_token_id])
        seqs.append(p + r), plens.append(len(p)), rlens.append(len(r)), trunc.append(truncated)
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    tokens = TokenBatch(ids, torch.tensor(plens), torch.tensor(rlens))
    truncated_B = torch.tensor(trunc)
    # "same": the policy's tokenizer named as the reward model's (reward.model.tokenizer_path).
    for name, key, tok_path in (("same", "rm-qwen2-untied", ctx.policy_tok), ("other", "rm-llama-othertok", None)):
        cfg = SimpleNamespace(hf_path=ctx.zoo[key], tokenizer_path=tok_path, on_cpu=False,
                              tensor_model_parallel_size=None, pipeline_model_parallel_size=None)  # the actor's layout
        loop_rm = LoopRewardModel(cfg, get_layout(), policy, max_tokens_per_microbatch=24)
        got = loop_rm.score(tokens, truncated_B)
        rm_tok = AutoTokenizer.from_pretrained(tok_path or ctx.zoo[key])
        want_ids = [rm_tok(p + r, add_special_tokens=False)["input_ids"] + ([] if t else [rm_tok.eos_token_id]) for p, r, t in rows]
        res[f"loop/{name}/retokenized"] = loop_rm.rm_tokenizer is not None
        res[f"loop/{name}/ids_equal"] = loop_rm.sequences(tokens, truncated_B) == want_ids
        res[f"loop/{name}/score_diff"] = float((got - hf_reward_scores(ctx.zoo[key], want_ids)).abs().max())


def run_phase(ctx, tag: str) -> dict:
    from megappo.parallel.state import init_parallel
    from megappo.toolkit.compare_reward_model import compare_reward_model

    tp, pp = LAYOUTS[tag]
    _regroup(tp, pp)
    init_parallel(tp, pp, seed=1, device="cpu")
    res: dict = {}
    for key in RM_KEYS:
        check_scores_and_export(ctx, key, tag, res)
    res["compare"] = compare_reward_model(ctx.zoo["rm-qwen2-untied"], tp=tp, pp=pp, num_seqs=5, seq_len=20)
    check_convert(ctx, tag, res)
    check_loop_reward_model(ctx, res)
    check_training(ctx, tag, res)
    if tag == "world1":
        check_resume(ctx, res)
    return res


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", required=True, help="JSON: zoo, lm, pairs, eval_pairs, work")
    ap.add_argument("--out", required=True)
    ap.add_argument("phases", nargs="+", choices=list(LAYOUTS))
    args = ap.parse_args()
    ctx = SimpleNamespace(**json.loads(args.ctx))
    for tag in args.phases:
        res = run_phase(ctx, tag)
        with open(os.path.join(args.out, f"{tag}-rank{dist.get_rank()}.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
