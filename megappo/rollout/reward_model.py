"""The reward model in the RL loop (``reward.model``): score this rank's rollouts with the
frozen Megatron reward model, and combine the score with the rule reward by weights.

Shape legend: B = responses of this data-parallel rank, S = prompt + response positions.

Where it runs: on every rank, after the rollout batch reached all ranks of the replica
(the reward model is a Megatron model: TP and PP ranks must run it together), micro-batched by
the same token budget as the other forward passes. Its layout is
``reward.model.tensor_model_parallel_size`` x ``pipeline_model_parallel_size`` (default: the
actor's). At the actor's layout each data-parallel shard scores its own rows; at another one the
rows of all shards are dealt to the reward model's replicas and the scores handed back
(``megappo.parallel.model_groups``).

What it sees: prompt + response tokens, the response ending with EOS when it finished
(the engine's stop token) and without one when truncated, the way ``megappo.train_rm``
presents its pairs. When the reward model's tokenizer is not the policy's (a different
vocabulary fingerprint), each row is re-tokenized: the prompt decoded by the policy's
tokenizer with its special tokens (the chat markup it was given), the response decoded
without them, both encoded by the reward model's tokenizer without adding special tokens,
then its EOS for a finished response. The prompt keeps the policy's chat template; a reward
model trained on another template sees that text as it is.

Normalization: the combined reward replaces the batch's scores before the objective
shapes them, so ``algo.reward_norm: running`` (the checkpointed running mean / std of
``megappo.algo.shaping.RunningMeanStd``) normalizes it like any rule reward.

Failures: a non-finite score is a ``ValueError`` naming the reward model and the rows,
never a silent 0; a reward model whose vocabulary differs from the policy's and that has
no tokenizer is an error before the model is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional

import torch
from torch import Tensor

from megappo.models.batch import TokenBatch
from megappo.models.builder import BuildOptions
from megappo.models.reward_model import RewardModel, SequenceBatch
from megappo.parallel.collectives import global_masked_mean_var
from megappo.weights.reward import load_hf_into_reward_model, reward_spec

log = logging.getLogger("megappo")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def vocab_fingerprint(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def resolve_reward_tokenizer(rm_dir: str, tokenizer_path: Optional[str], policy_tokenizer, rm_vocab_size: int) -> Optional[Any]:
    """The reward model's own tokenizer when the rows must be re-tokenized for it, or None
    when it reads the policy's token ids as they are (same vocabulary). ``ValueError`` when
    the vocabularies differ and the reward model has no tokenizer."""
    from transformers import AutoTokenizer

    path = tokenizer_path or (rm_dir if any(os.path.isfile(os.path.join(rm_dir, f)) for f in TOKENIZER_FILES) else None)
    if path is None:
        policy_vocab = len(policy_tokenizer)
        if policy_vocab > rm_vocab_size:
            raise ValueError(
                f"reward.model.hf_path={rm_dir!r}: its vocabulary ({rm_vocab_size}) is smaller than the policy tokenizer's "
                f"({policy_vocab}) and the directory has no tokenizer files to re-tokenize with; set reward.model.tokenizer_path"
            )
        log.warning("reward model %s has no tokenizer files: it reads the policy's token ids as they are", rm_dir)
        return None
    rm_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if vocab_fingerprint(rm_tok) == vocab_fingerprint(policy_tokenizer):
        return None
    log.info("reward model tokenizer %s differs from the policy's: responses are re-tokenized for it", path)
    return rm_tok


def retokenize(tokens: TokenBatch, truncated_B: Tensor, policy_tokenizer, rm_tokenizer) -> list[list[int]]:
    """Each row as the reward model's tokenizer writes it (see the module doc)."""
    out = []
    ids_BS = tokens.input_ids_BS.cpu()
    for i in range(tokens.B):
        p, r = int(tokens.prompt_lens_B[i]), int(tokens.response_lens_B[i])
        prompt = policy_tokenizer.decode(ids_BS[i, :p].tolist(), skip_special_tokens=False)
        response = policy_tokenizer.decode(ids_BS[i, p : p + r].tolist(), skip_special_tokens=True)
        ids = rm_tokenizer(prompt, add_special_tokens=False)["input_ids"] + rm_tokenizer(response, add_special_tokens=False)["input_ids"]
        if not bool(truncated_B[i]) and rm_tokenizer.eos_token_id is not None:
            ids.append(rm_tokenizer.eos_token_id)
        out.append(list(ids))
    return out


class LoopRewardModel:
    """The frozen reward model of a run and how to feed it the policy's rollouts."""

    def __init__(self, model_cfg, layout, policy_tokenizer, *, max_tokens_per_microbatch: int, opts=None):
        """``opts``: the ``BuildOptions`` of the run's models (``models.factory.build_options``:
        dtype, layer spec); default fp32 local at the layout's TP x PP. The reward model's own
        ``tensor_model_parallel_size`` / ``pipeline_model_parallel_size`` (None: the actor's)
        replace its TP x PP."""

        if model_cfg.hf_path is None:
            raise ValueError("reward.model.hf_path is not set")
        self.name = model_cfg.hf_path
        spec = reward_spec(model_cfg.hf_path)
        self.policy_tokenizer = policy_tokenizer
        self.rm_tokenizer = resolve_reward_tokenizer(model_cfg.hf_path, model_cfg.tokenizer_path, policy_tokenizer, spec.vocab_size)
        pad = self.rm_tokenizer.pad_token_id if self.rm_tokenizer is not None else policy_tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        opts = opts or BuildOptions(tp=layout.tp, pp=layout.pp)
        tp = model_cfg.tensor_model_parallel_size or layout.tp
        pp = model_cfg.pipeline_model_parallel_size or layout.pp
        if (tp, pp) != (layout.tp, layout.pp):  # its own process groups: no virtual stages, no expert parallelism
            opts = dataclasses.replace(opts, tp=tp, pp=pp, vpp=None, ep=1, sequence_parallel=opts.sequence_parallel and tp > 1)
        self.model = RewardModel(spec, opts, max_tokens_per_microbatch=max_tokens_per_microbatch, offload_to_cpu=model_cfg.on_cpu)
        load_hf_into_reward_model(self.model.models, model_cfg.hf_path)
        self.model.offload()

    def sequences(self, tokens: TokenBatch, truncated_B: Tensor) -> list[list[int]]:
        """Prompt + response token ids of each row, in the reward model's vocabulary."""
        if self.rm_tokenizer is not None:
            return retokenize(tokens, truncated_B, self.policy_tokenizer, self.rm_tokenizer)
        ids_BS = tokens.input_ids_BS.cpu()
        return [ids_BS[i, : int(tokens.seq_lens_B[i])].tolist() for i in range(tokens.B)]

    def score(self, tokens: TokenBatch, truncated_B: Tensor) -> Tensor:
        """float32 [B] scores of this rank's rows (collective over the model-parallel group)."""

        try:
            return self.model.score(SequenceBatch.from_lists(self.sequences(tokens, truncated_B), self.pad_id)).float().cpu()
        except ValueError as err:
            raise ValueError(f"reward model {self.name}: {err}") from err


def combine_rewards(rule_B: Optional[Tensor], model_B: Tensor, *, weight: float, rule_weight: float) -> tuple[Tensor, dict[str, float]]:
    """``rule_weight * rule_B + weight * model_B`` and the per-source metrics over the
    global batch (all data-parallel ranks): ``reward/model/mean``, ``reward/model/std``
    (population std), ``reward/rule/mean`` (when a rule reward is given). A non-finite model
    score is a ``ValueError``."""

    bad = (~torch.isfinite(model_B)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward model produced non-finite scores for rows {bad[:10]}")
    mean, var = global_masked_mean_var(model_B.double(), unbiased=False)
    metrics = {"reward/model/mean": float(mean), "reward/model/std": float(var.clamp(min=0).sqrt())}
    total_B = weight * model_B.float()
    if rule_B is not None:
        metrics["reward/rule/mean"] = float(global_masked_mean_var(rule_B.double(), unbiased=False)[0])
        if rule_weight:
            total_B = total_B + rule_weight * rule_B.float()
    return total_B, metrics
