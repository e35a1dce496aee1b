"""Offline conversion between HF directories and Megatron distributed checkpoints (the
logic behind ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``).

Both run as a plain process (world of one, TP=1 / PP=1) or under ``torchrun`` at a given
TP / PP; a distributed checkpoint reshards on load, so the layout only bounds memory and
time. The HF side streams one tensor at a time (``load_hf_into_model`` / ``save_hf``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger("megappo")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's Megatron weights are and what describes them."""

    dist_dir: str
    spec_dict: dict
    hf_config: Optional[dict]
    tokenizer_dir: Optional[str]


def _build_actor(spec, tp: int, pp: int, vpp: Optional[int], dtype: torch.dtype):
    from megappo.models.builder import BuildOptions, build_model_chunks
    from megappo.parallel.state import init_parallel

    layout = init_parallel(tp, pp, vpp)
    chunks = build_model_chunks(spec, "actor", BuildOptions(tp=tp, pp=pp, vpp=vpp, dtype=dtype))
    if layout.device.type == "cuda":
        chunks = [c.cuda(layout.device) for c in chunks]
    return chunks


def convert_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    dtype: Optional[torch.dtype] = torch.float32,
) -> None:
    """Write the HF model ``hf_dir`` as a Megatron distributed checkpoint ``out_dir``
    (with ``megappo_model.json``: spec, HF config, source directory). ``dtype=None``
    keeps the dtype ``config.json`` declares when it is bfloat16 or float32 (else float32)."""
    from megappo.models.spec import ModelSpec
    from megappo.weights.hf_io import HFCheckpoint
    from megappo.weights.megatron_ckpt import save_megatron_model
    from megappo.weights.model_io import load_hf_into_model, validate_hf_dir

    spec = ModelSpec.from_hf_dir(hf_dir)
    with HFCheckpoint(hf_dir) as ckpt:  # fail on a bad directory before starting Megatron
        validate_hf_dir(spec, ckpt)
        hf_config = ckpt.config
    if dtype is None:
        declared = config_dtype(hf_config)
        dtype = declared if declared in (torch.bfloat16, torch.float32) else torch.float32
    chunks = _build_actor(spec, tp, pp, vpp, dtype)
    load_hf_into_model(chunks, hf_dir)
    save_megatron_model(chunks, out_dir, hf_config=hf_config, source_dir=os.path.abspath(hf_dir))


def resolve_model_source(path: str, *, role: str = "actor", hf_config_dir: Optional[str] = None) -> ModelSource:
    """A model checkpoint (``megappo_model.json``), a training checkpoint ``step_N`` or a
    checkpoint directory (its ``latest``). The HF config (and tokenizer) come from
    ``hf_config_dir`` when given, else from what the checkpoint recorded."""
    from megappo.checkpoint import LATEST, META, CheckpointManager, read_meta
    from megappo.weights.megatron_ckpt import MODEL_META, read_model_meta

    if os.path.isfile(os.path.join(path, LATEST)):
        path = CheckpointManager(path).latest()
    if os.path.isfile(os.path.join(path, MODEL_META)):
        meta = read_model_meta(path)
        dist_dir, spec_dict, hf_config, src = path, meta["spec"], meta.get("hf_config"), meta.get("source_dir")
    elif os.path.isfile(os.path.join(path, META)):
        meta = read_meta(path)
        if role not in meta["roles"]:
            raise ValueError(f"{path} has no {role} (it holds {', '.join(meta['roles'])})")
        dist_dir, spec_dict, hf_config = os.path.join(path, role), meta["spec"], None
        src = ((meta.get("config") or {}).get("model") or {}).get("hf_path")
    else:
        raise ValueError(f"{path}: neither a model checkpoint ({MODEL_META}) nor a training checkpoint ({META}, {LATEST})")
    if hf_config_dir is not None:
        src = hf_config_dir
    if src is not None and os.path.isfile(os.path.join(src, "config.json")) and (hf_config is None or hf_config_dir):
        with open(os.path.join(src, "config.json")) as f:
            hf_config = json.load(f)
    if hf_config is None:
        raise ValueError(f"{path} records no HF config.json; pass the original model directory (--hf-config DIR)")
    tokenizer_dir = src if src is not None and os.path.isdir(src) else None
    return ModelSource(dist_dir, spec_dict, hf_config, tokenizer_dir)


def config_dtype(hf_config: dict) -> Optional[torch.dtype]:
    """The dtype an HF config declares (``dtype`` or the older ``torch_dtype``), if any."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def convert_megatron_to_hf(
    ckpt: str,
    out_dir: str,
    *,
    hf_config_dir: Optional[str] = None,
    role: str = "actor",
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: Optional[int] = None,
) -> None:
    """Export a model checkpoint or a training checkpoint's ``role`` as an HF directory,
    in ``dtype`` (default: the dtype the HF config declares, else float32)."""
    from megappo.models.spec import ModelSpec
    from megappo.weights.export import DEFAULT_MAX_SHARD_BYTES, save_hf
    from megappo.weights.megatron_ckpt import load_megatron_model

    if role != "actor":
        raise ValueError(f"only the actor converts to an HF causal LM (got role {role!r})")
    src = resolve_model_source(ckpt, role=role, hf_config_dir=hf_config_dir)
    chunks = _build_actor(ModelSpec(**src.spec_dict), tp, pp, None, torch.float32)
    load_megatron_model(chunks, src.dist_dir, spec_dict=src.spec_dict)
    if src.tokenizer_dir is None:
        log.warning("no tokenizer directory known for %s: the export has no tokenizer files (pass --hf-config DIR)", ckpt)
    save_hf(
        chunks,
        out_dir,
        hf_config=src.hf_config,
        tokenizer_dir=src.tokenizer_dir,
        dtype=dtype or config_dtype(src.hf_config),
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
    )
