"""The reward-model trainer's loop: Bradley-Terry on preference pairs, on Megatron-core.

Shape legend: P = pairs of this data-parallel rank.

One step: the next ``reward_train.batch_size`` pairs of the epoch's shuffled order (global),
this DP rank's contiguous share of them, ``RewardModel.train_step`` with the Bradley-Terry
loss divided by the global pair count; held-out pair accuracy / margin / loss every
``reward_train.eval_every`` steps and at the end; metrics to ``metrics.jsonl`` and
TensorBoard (``rm/*``, ``eval/rm_*``); an atomic checkpoint every ``checkpoint.save_every``
steps and at the end (``CheckpointManager``, role ``reward``); at the end an HF
``*ForSequenceClassification`` in ``<run_dir>/hf``.

The order of the pairs is a function of (seed, epoch) only, and the step is the whole
cursor, so a resumed run sees the pairs an uninterrupted one would.

Starting point (``model.hf_path``): a reward model (its score head is loaded) or a causal
LM (the backbone is loaded; the new score head is N(0, ``reward_train.head_init_std``)).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import torch

from megappo.algo.bradley_terry import bradley_terry_loss
from megappo.checkpoint import CheckpointManager
from megappo.config import config_to_dict
from megappo.data.dataset import load_tokenizer, tokenizer_source
from megappo.data.preferences import PreferenceFields, PreferencePair, load_preference_pairs
from megappo.metrics import MetricsLogger, progress
from megappo.models.factory import build_options, optimizer_settings
from megappo.models.reward_model import PairBatch, RewardModel, SequenceBatch
from megappo.models.spec import ModelSpec
from megappo.parallel.collectives import dp_all_reduce
from megappo.parallel.state import init_parallel
from megappo.weights.base import table_for
from megappo.weights.export import save_hf
from megappo.weights.reward import load_backbone_from_causal_lm, load_hf_into_reward_model, reward_spec

log = logging.getLogger("megappo")

ROLE = "reward"
CONSOLE_KEYS = ("rm/loss", "rm/accuracy", "rm/margin", "eval/rm_accuracy", "eval/rm_margin", "time/step")


def check_reward_train(cfg, world_size: int, *, files: bool = True) -> None:
    """The ``reward_train`` settings a run needs, each error naming its key. ``files``
    False (``--dry-run``): missing files and directories are only logged."""
    rt = cfg.reward_train
    problems = []
    if rt.train_path is None:
        problems.append("reward_train.train_path is not set: the trainer needs a .jsonl or .parquet file of preference pairs")
    for key in ("train_path", "eval_path"):
        value = getattr(rt, key)
        if value is not None and not os.path.isfile(value):
            problems.append(f"reward_train.{key}={value!r} is not a file")
    for key in ("max_length", "epochs", "batch_size"):
        if getattr(rt, key) < 1:
            problems.append(f"reward_train.{key} must be >= 1, got {getattr(rt, key)}")
    if rt.eval_every < 0 or rt.head_init_std < 0:
        problems.append("reward_train.eval_every and reward_train.head_init_std must be >= 0")
    if cfg.model.hf_path is None or not os.path.isdir(cfg.model.hf_path):
        problems.append(f"model.hf_path={cfg.model.hf_path!r} must be the HF directory to start from (causal LM or reward model)")
    if not files:
        missing = [p for p in problems if "is not a file" in p or "must be the HF directory" in p or "is not set" in p]
        for p in missing:
            log.warning(p)
        problems = [p for p in problems if p not in missing]
    if cfg.parallel.virtual_pipeline_model_parallel_size is not None:
        problems.append("parallel.virtual_pipeline_model_parallel_size: the reward model has no virtual pipeline stages")
    dp = world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    if dp and rt.batch_size % dp:
        problems.append(f"reward_train.batch_size={rt.batch_size} pairs do not split over data-parallel size {dp}")
    if problems:
        raise ValueError("; ".join(problems))


def use_chat_template(mode: str, tokenizer) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ValueError("data.apply_chat_template is 'on' but the tokenizer has no chat template")
    return mode == "on" or (mode == "auto" and has)


def is_reward_model_dir(hf_dir: str) -> bool:
    """Whether ``config.json`` names a ``*ForSequenceClassification`` architecture (False
    when it is missing or unreadable: the causal-LM path then reports that)."""
    import json

    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs)


def reward_hf_config(hf_config: dict, tokenizer) -> dict:
    """``hf_config`` (a causal LM's or a reward model's) as a one-label reward model's
    config: the family's ``*ForSequenceClassification`` architecture, one label and a
    ``pad_token_id`` (transformers pools the last token that is not it)."""

    spec = ModelSpec.from_hf_config(hf_config)
    cfg = {k: v for k, v in hf_config.items() if k not in ("num_labels", "label2id", "id2label")}
    cfg["architectures"] = [table_for(spec).reward_architectures[0]]
    cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id")
    if pad is None or pad == tokenizer.eos_token_id:
        log.warning(
            "the exported reward model's pad_token_id is %s, the EOS id: transformers pools the last token that is not "
            "padding, so on a sequence ending with EOS it reads the score one token earlier than megappo does", pad
        )
    cfg["pad_token_id"] = pad
    return cfg


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary: a resume with another tokenizer is refused."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def pair_batch(pairs: list[PreferencePair], pad_id: int) -> PairBatch:
    return PairBatch(
        SequenceBatch.from_lists([p.chosen_seq for p in pairs], pad_id),
        SequenceBatch.from_lists([p.rejected_seq for p in pairs], pad_id),
    )


def epoch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_pairs(step: int, num_pairs: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global indices of the pairs of ``step`` (1-based); the last partial batch of an epoch is dropped."""
    per_epoch = num_pairs // batch_size
    epoch, k = divmod(step - 1, per_epoch)
    return epoch_order(num_pairs, seed, epoch)[k * batch_size : (k + 1) * batch_size]


@torch.no_grad()
def evaluate(rm: RewardModel, pairs: list[PreferencePair], layout, pad_id: int) -> dict[str, float]:
    """Held-out pair accuracy (r_c > r_r), mean margin and Bradley-Terry loss over all pairs
    (each DP rank scores its share; the sums are all-reduced)."""
    import torch.nn.functional as F


    mine = torch.arange(len(pairs)).tensor_split(layout.dp)[layout.dp_rank].tolist()
    sums = torch.zeros(4, dtype=torch.float64)
    if mine:
        scores = rm.score(SequenceBatch.from_lists([pairs[i].chosen_seq for i in mine] + [pairs[i].rejected_seq for i in mine], pad_id))
        diff = (scores[: len(mine)] - scores[len(mine) :]).double().cpu()
        sums += torch.stack([torch.tensor(float(len(mine))), (diff > 0).double().sum(), diff.sum(), -F.logsigmoid(diff).sum()])
    n, correct, margin, loss = dp_all_reduce(sums).tolist()
    return {"eval/rm_accuracy": correct / n, "eval/rm_margin": margin / n, "eval/rm_loss": loss / n, "eval/rm_pairs": n}


def build_reward_model(cfg, layout, tokenizer) -> tuple[RewardModel, dict]:
    """The trainable reward model loaded from ``model.hf_path``, and its export config."""
    import json


    path, rt = cfg.model.hf_path, cfg.reward_train
    from_rm = is_reward_model_dir(path)
    spec = reward_spec(path) if from_rm else ModelSpec.from_hf_dir(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    rm = RewardModel(spec, build_options(cfg, layout), optimizer_settings(cfg, "actor"), max_tokens_per_microbatch=cfg.train.max_tokens_per_microbatch,
                     head_init_std=0.0 if from_rm else rt.head_init_std)
    if from_rm:
        load_hf_into_reward_model(rm.models, path)
    else:

        load_backbone_from_causal_lm(rm.models, path)
    rm.optimizer.reload_model_params()
    return rm, reward_hf_config(hf_config, tokenizer)


def total_steps(cfg, num_pairs: int) -> int:
    """Optimizer steps of the run: epochs x whole batches per epoch."""
    return cfg.reward_train.epochs * (num_pairs // cfg.reward_train.batch_size)


def run(cfg) -> int:
    """Train a reward model as ``cfg`` says (every rank calls it); returns 0."""

    rt, p = cfg.reward_train, cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_reward_train(cfg, world)
    layout = init_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, None,
                           seed=cfg.train.seed, device=p.device, backend=p.backend)
    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    template = use_chat_template(cfg.data.apply_chat_template, tokenizer)
    fields = PreferenceFields(rt.prompt_key, rt.chosen_key, rt.rejected_key)
    read = dict(tokenizer=tokenizer, fields=fields, use_template=template, system_prompt=cfg.data.system_prompt, max_length=rt.max_length)
    train = load_preference_pairs(rt.train_path, role="reward_train.train_path", **read).pairs
    held_out = load_preference_pairs(rt.eval_path, role="reward_train.eval_path", **read).pairs if rt.eval_path else []
    if len(train) < rt.batch_size:
        raise ValueError(f"{rt.train_path}: {len(train)} usable pairs, fewer than reward_train.batch_size={rt.batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = total_steps(cfg, len(train))
    if cfg.optim.lr_decay_style == "cosine" and cfg.optim.lr_decay_steps is None:  # decay over this run, not the RL one
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_decay_steps=total))
    rm, export_config = build_reward_model(cfg, layout, tokenizer)

    ckpts = CheckpointManager(cfg.checkpoint.dir or os.path.join(cfg.train.run_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last)
    fingerprint = tokenizer_fingerprint(tokenizer)
    start = 0
    if cfg.checkpoint.resume == "auto" and ckpts.latest() is not None:
        start = int(ckpts.load(policies={ROLE: rm}, tokenizer_fingerprint=fingerprint)["step"])
        log.info("resumed the reward model from %s (step %d of %d)", ckpts.latest(), start, total)
    metrics = MetricsLogger(cfg.train.run_dir, tensorboard=cfg.logging.tensorboard, console_every=cfg.logging.console_every,
                            rank=layout.rank, resume_step=start, console_keys=CONSOLE_KEYS)
    save = dict(policies={ROLE: rm}, config_dict=config_to_dict(cfg), tokenizer_fingerprint=fingerprint)
    bar = progress(total, "reward model", enabled=cfg.logging.progress_bar, rank=layout.rank)
    bar.update(start)
    try:
        for step in range(start + 1, total + 1):
            t0 = time.perf_counter()
            idx = step_pairs(step, len(train), rt.batch_size, cfg.train.seed)
            mine = idx.tensor_split(layout.dp)[layout.dp_rank].tolist()
            n = float(len(idx))
            out = rm.train_step(pair_batch([train[i] for i in mine], pad_id),
                                lambda c, r, rows: bradley_terry_loss(c, r, num_pairs=n))
            row = {f"rm/{k}": out[k] for k in ("loss", "accuracy", "margin", "chosen", "rejected", "grad_norm", "lr")}
            row["rm/epoch"] = (step - 1) // (len(train) // rt.batch_size)
            if held_out and (step == total or (rt.eval_every and step % rt.eval_every == 0)):
                row.update(evaluate(rm, held_out, layout, pad_id))
            row["time/step"] = time.perf_counter() - t0
            if not math.isfinite(row["rm/loss"]):
                raise ValueError(f"reward-model loss is not finite at step {step} ({row['rm/loss']}): lower optim.lr")
            metrics.log(step, row)
            bar.update(1)
            if step == total or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
                ckpts.save(step, extra={"step": step}, **save)
    finally:
        bar.close()
        metrics.close()
    if cfg.checkpoint.save_hf_at_end:

        save_hf(rm.models, os.path.join(cfg.train.run_dir, "hf"), hf_config=export_config,
                tokenizer_dir=tokenizer_source(cfg.data, cfg.model.hf_path)[0])
    return 0
