"""Checks before converting: an HF config and checkpoint against the model spec.

Every mismatch is named in one ``ValueError``: missing and unexpected tensors, shapes the
config does not imply, architecture fields that differ, settings a family's mapping cannot
represent (e.g. an ``o_proj`` bias).
"""

from __future__ import annotations

import re

from megappo.models.spec import ModelSpec
from megappo.weights.base import FamilyTable, Placement, hf_shapes, plan


def expected_hf_shapes(table: FamilyTable, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete HF checkpoint of ``spec`` holds, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    full = Placement()
    for e in plan(table, spec, full, role="actor"):
        if not e.rule.export:
            continue
        for name, shape in zip(e.hf, hf_shapes(e.rule, spec)):
            shapes[name] = shape
    return shapes


def check_hf_tensors(
    table: FamilyTable,
    spec: ModelSpec,
    shapes: dict[str, tuple[int, ...]],
    *,
    source: str,
    strict: bool = True,
) -> list[str]:
    """Compare a checkpoint's tensor names and shapes with what ``spec`` needs. Raises one
    ``ValueError`` naming every missing tensor, shape mismatch and (``strict``) unexpected
    tensor; returns the unexpected names it tolerated."""
    expected = expected_hf_shapes(table, spec)
    ignored = [re.compile(p) for p in table.ignored_hf]
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(shapes[name]) != shape:
            problems.append(f"{name}: shape {list(shapes[name])} in the checkpoint, config implies {list(shape)}")
    unexpected = [n for n in shapes if n not in expected and not any(p.search(n) for p in ignored)]
    if spec.tie_word_embeddings and "lm_head.weight" in unexpected:
        # Some tied checkpoints store the head anyway; it equals the embedding.
        unexpected.remove("lm_head.weight")
    if strict:
        problems += [f"unexpected tensor {n} (not used by a {table.family} model with this config)" for n in unexpected]
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise ValueError(f"{source}: the weights do not match the config:\n  " + "\n  ".join(shown))
    return unexpected


_SPEC_FIELDS_THAT_SHAPE_WEIGHTS = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "qkv_bias",
    "qk_norm",
    "rms_norm_eps",
    "rope_theta",
    "rope_type",
    "rope_factor",
    "sliding_window",
    "num_experts",
    "moe_topk",
    "moe_ffn_hidden_size",
    "moe_norm_topk_prob",
    "moe_layers",
    "moe_shared_expert_ffn",
)


def spec_differences(ours: ModelSpec, theirs: ModelSpec, *, labels: tuple[str, str] = ("model", "checkpoint")) -> list[str]:
    """The architecture fields where two specs disagree, as ``field: model X, checkpoint Y``."""
    a, b = labels
    return [
        f"{f}: {a} {getattr(ours, f)!r}, {b} {getattr(theirs, f)!r}"
        for f in _SPEC_FIELDS_THAT_SHAPE_WEIGHTS
        if getattr(ours, f) != getattr(theirs, f)
    ]


def check_config(table: FamilyTable, cfg: dict, *, source: str) -> None:
    """Architecture name and family-specific settings of an HF ``config.json``."""
    problems = []
    archs = cfg.get("architectures") or []
    bad = [a for a in archs if a not in table.architectures]
    if bad:
        problems.append(
            f"unsupported architecture {', '.join(bad)} for model_type {table.family!r} "
            f"(supported: {', '.join(table.architectures)})"
        )
    problems += table.config_problems(cfg)
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
