"""Reward models (HF ``*ForSequenceClassification`` with one label) into Megatron chunks.

The family tables (``dense.DENSE_RULES``) map a reward model like a causal LM whose LM head
is replaced by ``score.weight`` [1, hidden] (no bias): the rule's condition ``score_head``
holds for the role ``reward``. This module adds what only a reward model needs: the checks
of its ``config.json`` (the architecture is the family's sequence classifier, one label)
and of its tensors, and the load of an HF directory into this rank's chunks. Export needs
nothing new: ``iter_hf_tensors`` and ``save_hf`` walk the same table for the role
``reward`` and yield ``score.weight`` (replicated, so every TP rank holds all of it).
"""

from __future__ import annotations

import logging
import os
import re

import torch

from megappo.models.spec import ModelSpec
from megappo.weights.base import Placement, hf_shapes, plan, shard_from_hf, table_for
from megappo.weights.hf_io import HFCheckpoint
from megappo.weights.model_io import placement_of, unwrap, validate_hf_dir
from megappo.weights.validate import spec_differences

log = logging.getLogger("megappo")

ROLE = "reward"


def num_labels(cfg: dict) -> int:
    """The number of labels an HF config declares: ``num_labels``, else the size of
    ``id2label``, else 2 (transformers' default for a config that names neither)."""
    if isinstance(cfg.get("num_labels"), int):
        return cfg["num_labels"]
    if isinstance(cfg.get("id2label"), dict):
        return len(cfg["id2label"])
    return 2


def reward_config_problems(cfg: dict, *, source: str) -> list[str]:
    """Why an HF ``config.json`` is not a reward model megappo can load (empty: it is)."""
    spec = ModelSpec.from_hf_config(cfg, source=source)
    table = table_for(spec)
    problems = table.config_problems(cfg)
    archs = cfg.get("architectures") or []
    causal = [a for a in archs if a in table.architectures]
    if causal:
        problems.append(
            f"architectures {archs} is a causal LM, not a reward model (it has an lm_head, no score head); "
            f"a reward model is a {' or '.join(table.reward_architectures)} with num_labels=1"
        )
    elif archs and any(a not in table.reward_architectures for a in archs):
        problems.append(f"unsupported architecture {', '.join(archs)} for a {spec.family} reward model "
                        f"(supported: {', '.join(table.reward_architectures)})")
    labels = num_labels(cfg)
    if labels != 1:
        problems.append(f"num_labels={labels} (id2label {cfg.get('id2label')}); a reward model scores with one label")
    return problems


def reward_spec(hf_dir: str | os.PathLike) -> ModelSpec:
    """The ``ModelSpec`` of a reward-model directory; ``ValueError`` naming the directory and
    every problem when it is not one (a causal LM, more than one label, ...)."""
    spec = ModelSpec.from_hf_dir(hf_dir)
    cfg_path = os.path.join(hf_dir, "config.json")
    with HFCheckpoint(hf_dir) as ckpt:
        problems = reward_config_problems(ckpt.config, source=cfg_path)
        if not problems:
            problems = tensor_problems(spec, ckpt.shapes())
    if problems:
        raise ValueError(f"{hf_dir} is not a usable reward model:\n  " + "\n  ".join(problems))
    return spec


def expected_reward_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a complete HF reward model of ``spec``, with its shape."""
    table = table_for(spec)
    shapes: dict[str, tuple[int, ...]] = {}
    for e in plan(table, spec, Placement(), role=ROLE):
        if e.rule.export:
            shapes.update(zip(e.hf, hf_shapes(e.rule, spec)))
    return shapes


def tensor_problems(spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing tensors, wrong shapes and unexpected tensors of a reward-model checkpoint."""
    expected = expected_reward_shapes(spec)
    ignored = [re.compile(p) for p in table_for(spec).ignored_hf]
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            hint = " (a causal LM has lm_head.weight instead; this is not a reward model)" if name == "score.weight" else ""
            problems.append(f"missing tensor {name} (expected shape {list(shape)}){hint}")
        elif tuple(shapes[name]) != shape:
            problems.append(f"{name}: shape {list(shapes[name])} in the checkpoint, config implies {list(shape)}")
    for name in shapes:
        if name not in expected and not any(p.search(name) for p in ignored):
            problems.append(f"unexpected tensor {name} (a reward model has no {name})")
    if "score.bias" in shapes:
        problems.append("score.bias present: the score head of a reward model has no bias")
    return problems


@torch.no_grad()
def load_hf_into_reward_model(chunks: list, hf_dir: str | os.PathLike) -> None:
    """Fill this rank's reward-model chunks (built by ``megappo.models.reward_model``) from
    an HF ``*ForSequenceClassification`` directory, its TP shard of its layers, streaming
    one tensor at a time. Every problem is a ``ValueError`` naming the directory."""

    chunks = [unwrap(c) for c in chunks]
    if not chunks:
        raise ValueError("load_hf_into_reward_model needs at least one model chunk")
    spec = chunks[0].megappo_spec
    file_spec = reward_spec(hf_dir)
    diffs = spec_differences(spec, file_spec, labels=("model", "config.json"))
    if diffs:
        raise ValueError(f"{hf_dir}/config.json does not match the reward model being loaded: " + "; ".join(diffs))
    with HFCheckpoint(hf_dir) as ckpt:
        for model in chunks:
            if model.megappo_role != ROLE:
                raise ValueError(f"load_hf_into_reward_model needs reward-model chunks, got role {model.megappo_role!r}")
            placement = placement_of(model)
            params = dict(model.named_parameters())
            entries = plan(table_for(spec), spec, placement, role=ROLE, transformer_impl=model.megappo_transformer_impl)
            uncovered = set(params) - {e.megatron for e in entries}
            assert not uncovered, f"the {spec.family} mapping has no HF source for {sorted(uncovered)}"
            for e in entries:
                shard = shard_from_hf(e, spec, placement, ckpt.read)
                param = params[e.megatron]
                if tuple(shard.shape) != tuple(param.shape):
                    raise AssertionError(f"{e.megatron}: HF shard shape {tuple(shard.shape)} vs parameter {tuple(param.shape)}")
                param.data.copy_(shard)


@torch.no_grad()
def load_backbone_from_causal_lm(chunks: list, hf_dir: str | os.PathLike) -> None:
    """Start a reward model from a causal LM (``*ForCausalLM``): every weight but the score
    head, which keeps its initialization; the LM head is not used. The directory is checked
    as the actor's load checks it (config, names, shapes)."""

    chunks = [unwrap(c) for c in chunks]
    spec = chunks[0].megappo_spec
    with HFCheckpoint(hf_dir) as ckpt:
        validate_hf_dir(spec, ckpt)
        for model in chunks:
            placement = placement_of(model)
            params = dict(model.named_parameters())
            for e in plan(table_for(spec), spec, placement, role=ROLE, transformer_impl=model.megappo_transformer_impl):
                if e.rule.when == "score_head":
                    continue
                params[e.megatron].data.copy_(shard_from_hf(e, spec, placement, ckpt.read))
