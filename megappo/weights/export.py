"""``save_hf``: the actor as an HF model directory that ``from_pretrained`` loads.

Every rank calls it. On data-parallel rank 0 the TP ranks of each pipeline stage gather
their stage's tensors (``iter_hf_tensors``) and TP rank 0 writes them into size-bounded
safetensors files of a temporary directory next to ``out_dir`` (on a filesystem all
ranks share). Rank 0 then names the files ``model-0000k-of-0000n.safetensors`` (or
``model.safetensors`` when there is one), writes the index, ``config.json`` (with the
saved dtype), ``generation_config.json`` and the tokenizer files from ``tokenizer_dir``,
syncs them and renames the directory into place, so ``out_dir`` is either the old
complete export or the new complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from megappo.models.spec import ModelSpec
from megappo.weights.base import table_for
from megappo.weights.validate import spec_differences
from megappo.weights.hf_io import INDEX, SINGLE, ShardWriter
from megappo.weights.model_io import iter_hf_tensors, model_chunks

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def is_hf_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory ``save_hf`` could have written: ``config.json``, the
    weights (``model.safetensors`` or an index with ``model-*-of-*.safetensors`` shards),
    and otherwise only the tokenizer and generation-config files it copies. Tools replace
    such a directory without asking; anything else in it may be a user's own work."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    if "config.json" not in names or not ({SINGLE, INDEX} & names):
        return False
    known = {"config.json", SINGLE, INDEX, "generation_config.json", *TOKENIZER_FILES}
    shard = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
    return all(n in known or shard.fullmatch(n) for n in names) and all(os.path.isfile(os.path.join(path, n)) for n in names)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str, out: str) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is replaced only after."""
    old = None
    if os.path.exists(out):
        old = os.path.join(os.path.dirname(out), f".old-{os.path.basename(out)}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(os.path.dirname(out))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def hf_config_for(hf_config: dict, spec: ModelSpec, dtype: torch.dtype) -> dict:
    """``hf_config`` checked against the model and stamped with the saved dtype."""
    cfg_spec = ModelSpec.from_hf_config(hf_config, source="hf_config")
    diffs = spec_differences(spec, cfg_spec, labels=("model", "hf_config"))
    if diffs:
        raise ValueError("hf_config does not describe the model being saved: " + "; ".join(diffs))
    cfg = dict(hf_config)
    cfg.setdefault("architectures", [table_for(spec).architectures[0]])
    cfg["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = _dtype_name(dtype)
    return cfg


def save_hf(
    models,
    out_dir: str | os.PathLike,
    *,
    hf_config: dict,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> None:
    """Write this actor (all pipeline stages) as an HF model directory ``out_dir``.

    Collective over all ranks. ``hf_config``: the source ``config.json`` as a dict (checked
    against the model). ``dtype``: of the saved tensors (default: the parameters').
    ``tokenizer_dir``: tokenizer files and ``generation_config.json`` are copied from it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    chunks, _ = model_chunks(models)
    if chunks[0].megappo_role == "critic":
        raise ValueError("save_hf writes a causal LM; the critic's value head has no HF counterpart")
    spec = chunks[0].megappo_spec
    dtype = dtype or next(chunks[0].parameters()).dtype
    config = hf_config_for(hf_config, spec, dtype)

    out = os.path.abspath(os.fspath(out_dir))
    tmp = os.path.join(os.path.dirname(out), f".tmp-{os.path.basename(out)}")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()

    weight_map: dict[str, str] = {}
    total = 0
    # Data-parallel rank 0 writes; with expert parallelism the other ranks of its EP group
    # (expert-data-parallel rank 0) take part in gathering the experts.
    writes = mpu.get_data_parallel_rank() == 0
    if writes or mpu.get_expert_data_parallel_rank() == 0:
        writer = None
        if writes and mpu.get_tensor_model_parallel_rank() == 0:
            writer = ShardWriter(tmp, f"stage{mpu.get_pipeline_model_parallel_rank():03d}", max_shard_bytes)
        for name, tensor in iter_hf_tensors(chunks, dtype=dtype, dst=0):  # only the writer needs them
            if writer is not None:
                writer.add(name, tensor)
        if writer is not None:
            writer.flush()
            weight_map, total = writer.weight_map, writer.total_bytes
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (weight_map, total))

    if rank == 0:
        _finish(tmp, out, parts, config, tokenizer_dir)
    dist.barrier()


def _finish(tmp: str, out: str, parts: list, config: dict, tokenizer_dir) -> None:
    weight_map = {name: f for wm, _ in parts for name, f in wm.items()}
    total = sum(t for _, t in parts)
    files = sorted(set(weight_map.values()))
    if len(files) == 1:
        renames = {files[0]: SINGLE}
    else:
        renames = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renames.items():
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: renames[f] for n, f in sorted(weight_map.items())}}
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES + ("generation_config.json",):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
    fsync_tree(tmp)
    replace_dir(tmp, out)
