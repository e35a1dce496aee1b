"""HF weights into and out of this rank's Megatron model chunks.

``load_hf_into_model`` validates an HF directory against the models' ``ModelSpec`` (the
config, then every tensor's name and shape), then streams each rank's TP chunk of each
tensor from safetensors straight into the parameters: peak memory is the model plus one
tensor. ``iter_hf_tensors`` gathers the TP shards of this pipeline stage's parameters (to
every TP rank, or to one) and yields full HF-named tensors with global layer numbers, one
at a time (weight sync and HF export both use it).

Both take a list of model chunks or a policy (an object with ``.models`` and
``.optimizer``, e.g. ``MegatronPolicy``). Given a policy, loading ends with
``optimizer.reload_model_params()``: a bf16 or distributed optimizer keeps its own fp32
copy of the weights, which would otherwise still hold the random init and overwrite the
loaded weights at the first step.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from megappo.models.spec import ModelSpec
from megappo.weights.base import Entry, Placement, hf_from_shards, plan, shard_from_hf, table_for, with_expert
from megappo.weights.validate import check_config, check_hf_tensors, spec_differences
from megappo.weights.hf_io import HFCheckpoint

log = logging.getLogger("megappo")


def unwrap(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "megappo_spec") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "megappo_spec"):
        raise ValueError("expected a GPTModel built by megappo.models.builder.build_model (it has no megappo_spec)")
    return model


def model_chunks(models) -> tuple[list, object]:
    """The unwrapped chunks of a chunk list or a policy, and the policy's optimizer (or None)."""
    if hasattr(models, "models"):
        return [unwrap(m) for m in models.models], getattr(models, "optimizer", None)
    return [unwrap(m) for m in models], None


def placement_of(model) -> Placement:
    """Where this chunk sits: TP rank from Megatron's parallel state (or from the model's
    own layout, ``megappo_groups``: a dense model without expert parallelism), layers from
    the chunk's own (global, 1-based) layer numbers."""
    from megatron.core import parallel_state as mpu

    layers = model.decoder.layers
    numbers = [layer.layer_number - 1 for layer in layers]
    first = numbers[0] if numbers else 0
    assert numbers == list(range(first, first + len(numbers))), f"non-consecutive layers {numbers}"
    own = getattr(model, "megappo_groups", None)
    return Placement(
        tp=own.tp if own else mpu.get_tensor_model_parallel_world_size(),
        tp_rank=own.tp_rank if own else mpu.get_tensor_model_parallel_rank(),
        first_layer=first,
        num_layers=len(numbers),
        pre_process=model.pre_process,
        post_process=model.post_process,
        ep=1 if own else mpu.get_expert_model_parallel_world_size(),
        ep_rank=0 if own else mpu.get_expert_model_parallel_rank(),
    )


def _entries(model) -> tuple[ModelSpec, Placement, list[Entry], dict[str, torch.nn.Parameter]]:
    spec = model.megappo_spec
    placement = placement_of(model)
    entries = plan(
        table_for(spec), spec, placement, role=model.megappo_role, transformer_impl=model.megappo_transformer_impl
    )
    params = dict(model.named_parameters())
    absent = [e.megatron for e in entries if e.megatron not in params]
    assert not absent, f"the {spec.family} mapping names parameters the model lacks: {absent}"
    covered = {e.megatron for e in entries}
    # The critic's value head is new: it keeps its initialization.
    uncovered = [n for n in params if n not in covered and not (model.megappo_role == "critic" and n.startswith("output_layer."))]
    assert not uncovered, f"the {spec.family} mapping has no HF source for {uncovered}"
    return spec, placement, entries, params


def validate_hf_dir(spec: ModelSpec, ckpt: HFCheckpoint, *, strict: bool = True) -> list[str]:
    """Check an HF directory against ``spec`` before converting: the config's family,
    architecture and every field that shapes the weights, then each tensor's name and
    shape. Raises ``ValueError`` naming every mismatch; returns tolerated unexpected names."""
    cfg_path = os.path.join(ckpt.path, "config.json")
    file_spec = ModelSpec.from_hf_config(ckpt.config, source=cfg_path)
    table = table_for(file_spec)
    check_config(table, ckpt.config, source=cfg_path)
    diffs = spec_differences(spec, file_spec, labels=("model", "config.json"))
    if diffs:
        raise ValueError(f"{cfg_path} does not match the model being loaded: " + "; ".join(diffs))
    unexpected = check_hf_tensors(table, spec, ckpt.shapes(), source=ckpt.path, strict=strict)
    if spec.tie_word_embeddings and "lm_head.weight" in ckpt.files:
        _warn_tied_head_dropped(ckpt)
    return unexpected


_TIED_HEAD_WARNED: set[str] = set()


def _warn_tied_head_dropped(ckpt: HFCheckpoint) -> None:
    """A tied model's file that also stores ``lm_head.weight``: that tensor is not loaded
    (the output layer is the embedding). Harmless when it equals the embedding, as some
    exporters write it; a head trained apart from the embedding would be silently lost, so
    say which case this is. Once per directory, on global rank 0 only (every rank and
    every role loads the same file); the tensors are compared in row blocks so memory stays
    bounded."""
    import torch.distributed as dist

    if ckpt.path in _TIED_HEAD_WARNED or (dist.is_initialized() and dist.get_rank() != 0):
        return
    _TIED_HEAD_WARNED.add(ckpt.path)
    shapes = ckpt.shapes()
    head, emb = shapes["lm_head.weight"], shapes.get("model.embed_tokens.weight")
    if head != emb:
        verdict = f"its shape {list(head)} is not the embedding's {list(emb) if emb else None}"
    else:
        worst = 0.0
        for start in range(0, head[0], 4096):
            stop = min(start + 4096, head[0])
            a, b = ckpt.read("lm_head.weight", 0, start, stop), ckpt.read("model.embed_tokens.weight", 0, start, stop)
            worst = max(worst, float((a.float() - b.float()).abs().max()))
        verdict = "it equals the embedding" if worst == 0.0 else f"it DIFFERS from the embedding (max |diff| {worst:.3g})"
    log.warning(
        "%s: config.json sets tie_word_embeddings=true, so the file's lm_head.weight is not loaded (the output "
        "layer is model.embed_tokens.weight); %s. If the head was trained separately, set tie_word_embeddings=false.",
        ckpt.path, verdict,
    )


@torch.no_grad()
def load_hf_into_model(models, hf_dir: str | os.PathLike, *, strict: bool = True) -> None:
    """Fill this rank's model chunks (or a policy's, see the module docstring) from an HF
    directory: its TP shard of its layers.

    ``strict``: tensors the model does not use are an error (else a warning). Missing
    tensors, shape mismatches, an unsupported architecture or a config that disagrees
    with the model are always errors. The critic's value head keeps its initialization.
    """
    chunks, optimizer = model_chunks(models)
    if not chunks:
        raise ValueError("load_hf_into_model needs at least one model chunk")
    spec = chunks[0].megappo_spec
    with HFCheckpoint(hf_dir) as ckpt:
        unexpected = validate_hf_dir(spec, ckpt, strict=strict)
        if unexpected:
            log.warning("%s: ignoring %d tensors the model does not use: %s", ckpt.path, len(unexpected), unexpected[:5])
        for model in chunks:
            spec, placement, entries, params = _entries(model)
            for e in entries:
                shard = shard_from_hf(e, spec, placement, ckpt.read)
                param = params[e.megatron]
                if tuple(shard.shape) != tuple(param.shape):
                    raise AssertionError(f"{e.megatron}: HF shard shape {tuple(shard.shape)} vs parameter {tuple(param.shape)}")
                param.data.copy_(shard)
    if optimizer is not None:
        optimizer.reload_model_params()


@torch.no_grad()
def iter_hf_tensors(models, *, dtype: torch.dtype | None = None, dst: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for this pipeline stage's weights (every chunk,
    global layer numbers, vocabulary unpadded), one tensor at a time; with expert
    parallelism every expert of the stage, gathered one local expert index at a time.

    Collective over the tensor-parallel group of this stage (and, with EP > 1, its
    expert-parallel group): every such rank must iterate to the end, in step. ``dst`` None: every TP rank receives the same tensors (all-gather).
    ``dst`` a TP rank: only that rank receives them (gather); the others send their shards
    and yield nothing, so they neither build nor hold full tensors. The tensors are the
    same either way, bit for bit. A tied head is yielded once (as the embedding, by the
    first stage); the critic's value head is not an HF tensor and is skipped. ``dtype``:
    cast to it (default: the parameter dtype). Tensors are contiguous and on the
    parameters' device.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    tp = mpu.get_tensor_model_parallel_world_size()
    if dst is not None and not 0 <= dst < tp:
        raise ValueError(f"iter_hf_tensors: dst must be a tensor-parallel rank in [0, {tp}), got {dst}")
    receives = dst is None or mpu.get_tensor_model_parallel_rank() == dst
    ep = mpu.get_expert_model_parallel_world_size()
    for model in model_chunks(models)[0]:
        spec, _, entries, params = _entries(model)
        for e in entries:
            if not e.rule.export:
                continue
            local = params[e.megatron].detach().contiguous()
            if e.expert is None or ep == 1:
                peers = [(e, local)]
            else:
                # Expert parallelism: local expert i of EP rank r is global expert r*n + i.
                # One all-gather over the EP group per local expert streams experts without
                # ever holding more than ``ep`` of them.
                gathered = [torch.empty_like(local) for _ in range(ep)]
                dist.all_gather(gathered, local, group=mpu.get_expert_model_parallel_group())
                n = spec.num_experts // ep
                first = e.expert - mpu.get_expert_model_parallel_rank() * n
                peers = [(with_expert(e, r * n + first), t) for r, t in enumerate(gathered)]
            for entry, tensor in peers:
                shards = _gather_tp(tensor, entry, tp, group, dst, receives)
                if not receives:
                    continue
                for name, full in hf_from_shards(entry, spec, shards):
                    yield name, (full if dtype is None else full.to(dtype)).contiguous()


def _gather_tp(local: torch.Tensor, e: Entry, tp: int, group, dst: int | None, receives: bool) -> list[torch.Tensor] | None:
    """The TP shards of one tensor, in rank order, on the receiving rank(s) (None elsewhere)."""
    import torch.distributed as dist

    if tp == 1 or e.rule.tp_dim is None:
        return [local]
    shards = [torch.empty_like(local) for _ in range(tp)] if receives else None
    if dst is None:
        dist.all_gather(shards, local, group=group)
    else:
        dist.gather(local, shards, dst=dist.get_global_rank(group, dst), group=group)
    return shards
