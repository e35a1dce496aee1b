"""Offline conversion of reward models between HF ``*ForSequenceClassification``
directories and Megatron distributed checkpoints (the reward-model half of
``megappo.toolkit.convert``, which dispatches here; bit-exact both ways, any TP / PP on
either side).

A model checkpoint records the role ``reward`` in ``megappo_model.json``; a training
checkpoint of ``megappo.train_rm`` holds it under ``step_N/reward``, whose HF config is
the starting model's made a one-label classifier (``rm_trainer.reward_hf_config``).
This module does not import ``convert`` (which imports it): the checkpoint is resolved
there and handed over as a ``ModelSource``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from megappo.checkpoint import LATEST, META, CheckpointManager, read_meta
from megappo.models.builder import BuildOptions
from megappo.models.reward_model import build_reward_chunks
from megappo.models.spec import ModelSpec
from megappo.parallel.state import init_parallel
from megappo.rm_trainer import reward_hf_config
from megappo.weights.export import DEFAULT_MAX_SHARD_BYTES, save_hf
from megappo.weights.megatron_ckpt import MODEL_META, load_megatron_model, read_model_meta, save_megatron_model
from megappo.weights.reward import ROLE, load_hf_into_reward_model, reward_config_problems, reward_spec

log = logging.getLogger("megappo")


def is_reward_checkpoint(path: str) -> bool:
    """Whether ``path`` (a model checkpoint, a training checkpoint ``step_N`` or a checkpoint
    directory) holds a reward model: role ``reward`` in ``megappo_model.json``, or a
    training checkpoint whose roles are ``reward`` and no actor (``megappo.train_rm``)."""
    if os.path.isfile(os.path.join(path, LATEST)):
        path = CheckpointManager(path).latest()
    if os.path.isfile(os.path.join(path, MODEL_META)):
        return read_model_meta(path).get("role") == ROLE
    if os.path.isfile(os.path.join(path, META)):
        roles = read_meta(path).get("roles") or []
        return ROLE in roles and "actor" not in roles
    return False


def _build(spec, tp: int, pp: int, dtype: torch.dtype) -> list:

    layout = init_parallel(tp, pp)
    chunks = build_reward_chunks(spec, BuildOptions(tp=tp, pp=pp, dtype=dtype))
    if layout.device.type == "cuda":
        chunks = [c.cuda(layout.device) for c in chunks]
    for c in chunks:
        c.requires_grad_(False)
    return chunks


def convert_reward_hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32) -> None:
    """Write the HF reward model ``hf_dir`` as a Megatron model checkpoint ``out_dir``. A
    causal LM, or a classifier with more than one label, is a ``ValueError`` naming it."""

    spec = reward_spec(hf_dir)  # fails on a bad directory before starting Megatron
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    chunks = _build(spec, tp, pp, dtype)
    load_hf_into_reward_model(chunks, hf_dir)
    save_megatron_model(chunks, out_dir, hf_config=hf_config, source_dir=os.path.abspath(hf_dir))


def export_reward_source(
    src, ckpt: str, out_dir: str, *, tp: int = 1, pp: int = 1, dtype: Optional[torch.dtype] = None,
    max_shard_bytes: Optional[int] = None,
) -> None:
    """Export the reward model of ``src`` (a ``convert.ModelSource`` resolved with role
    ``reward`` from ``ckpt``) as an HF ``*ForSequenceClassification`` directory."""

    hf_config = src.hf_config
    if reward_config_problems(hf_config, source="hf_config"):  # a train_rm run that started from a causal LM
        from transformers import AutoTokenizer

        if src.tokenizer_dir is None:
            raise ValueError(f"{ckpt}: its HF config is a causal LM's and no tokenizer directory is known (pass --hf-config DIR)")
        hf_config = reward_hf_config(hf_config, AutoTokenizer.from_pretrained(src.tokenizer_dir))
    chunks = _build(ModelSpec(**src.spec_dict), tp, pp, torch.float32)
    load_megatron_model(chunks, src.dist_dir, spec_dict=src.spec_dict)
    save_hf(chunks, out_dir, hf_config=hf_config, tokenizer_dir=src.tokenizer_dir, dtype=dtype,
            max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
