"""Offline conversion between HF directories and Megatron distributed checkpoints (the
logic behind ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``).

Both run as a plain process (world of one, TP=1 / PP=1) or under ``torchrun`` at a given
TP / PP; a distributed checkpoint reshards on load, so the layout only bounds memory and
time. The HF side streams one tensor at a time (``load_hf_into_model`` / ``save_hf``).
A reward model (an HF ``*ForSequenceClassification``, or a checkpoint of role ``reward``)
goes to ``megappo.toolkit.convert_reward_model``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megappo.checkpoint import LATEST, META, CheckpointManager, read_meta
from megappo.models.builder import BuildOptions, build_model_chunks
from megappo.models.spec import ModelSpec
from megappo.parallel.state import init_parallel
from megappo.rm_trainer import is_reward_model_dir
from megappo.toolkit.convert_reward_model import convert_reward_hf_to_megatron, export_reward_source, is_reward_checkpoint
from megappo.weights.export import DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES, is_hf_export, save_hf
from megappo.weights.hf_io import HFCheckpoint
from megappo.weights.megatron_ckpt import MODEL_META, load_megatron_model, read_model_meta, save_megatron_model
from megappo.weights.model_io import load_hf_into_model, validate_hf_dir

log = logging.getLogger("megappo")


def quiet_fallback_warnings() -> None:
    """For the tools (call before Megatron is imported): megatron-core warns once per module
    that apex / Transformer Engine are missing (six ``UserWarning``s per process); that the
    plain-torch fallbacks run is no news to a conversion. ``megappo.train`` does the same."""
    import warnings

    warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's Megatron weights are and what describes them."""

    dist_dir: str
    spec_dict: dict
    hf_config: Optional[dict]
    tokenizer_dir: Optional[str]


def _build_actor(spec, tp: int, pp: int, vpp: Optional[int], dtype: torch.dtype, ep: int = 1):

    layout = init_parallel(tp, pp, vpp, ep=ep)
    chunks = build_model_chunks(spec, "actor", BuildOptions(tp=tp, pp=pp, vpp=vpp, dtype=dtype, ep=ep))
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
    ep: int = 1,
) -> None:
    """Write the HF model ``hf_dir`` as a Megatron distributed checkpoint ``out_dir``
    (with ``megappo_model.json``: spec, HF config, source directory). ``ep``: expert-parallel
    size of this run (mixture-of-experts models; each rank reads only its experts; the
    checkpoint reshards to any layout on load). ``dtype=None``
    keeps the dtype ``config.json`` declares when it is bfloat16 or float32 (else float32)."""

    check_megatron_out(out_dir)
    if is_reward_model_dir(hf_dir):  # a *ForSequenceClassification: score head, role "reward"
        if vpp is not None or ep != 1:
            raise ValueError("--vpp / --ep: a reward model has no virtual pipeline stages and no experts (convert it at TP / PP)")
        if dtype is None:
            with open(os.path.join(hf_dir, "config.json")) as f:
                declared = config_dtype(json.load(f))
            dtype = declared if declared in (torch.bfloat16, torch.float32) else torch.float32
        convert_reward_hf_to_megatron(hf_dir, out_dir, tp=tp, pp=pp, dtype=dtype)
        return
    spec = ModelSpec.from_hf_dir(hf_dir)
    with HFCheckpoint(hf_dir) as ckpt:  # fail on a bad directory before starting Megatron
        validate_hf_dir(spec, ckpt)
        hf_config = ckpt.config
    if dtype is None:
        declared = config_dtype(hf_config)
        dtype = declared if declared in (torch.bfloat16, torch.float32) else torch.float32
    spec.check_parallel(tp, pp, vpp, ep)
    chunks = _build_actor(spec, tp, pp, vpp, dtype, ep)
    load_hf_into_model(chunks, hf_dir)
    save_megatron_model(chunks, out_dir, hf_config=hf_config, source_dir=os.path.abspath(hf_dir))


def check_megatron_out(out_dir: str) -> None:
    """``out_dir`` for a new Megatron checkpoint: absent or an empty directory (checked
    before Megatron starts; ``save_megatron_model`` checks again when it writes)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: is a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"--out {out_dir} is not empty; refusing to write a checkpoint over it (choose a new directory)")


def _checkpoint_marker(path: str) -> Optional[str]:

    return next((m for m in (MODEL_META, META, LATEST, "metadata.json") if os.path.exists(os.path.join(path, m))), None)


def check_hf_out(out_dir: str, *, ckpt: str, overwrite: bool = False) -> None:
    """Refuse an HF export target that would destroy something (``save_hf`` replaces the
    whole directory): the checkpoint being converted, a directory inside it or holding
    it, any checkpoint, a file; and, unless ``overwrite``, a non-empty directory that is
    not an earlier HF export (``is_hf_export``). Runs before Megatron starts."""

    out, src = os.path.realpath(out_dir), os.path.realpath(ckpt)
    if out == src:
        raise ValueError(f"--out {out_dir} is the checkpoint being converted (--ckpt {ckpt}); choose another directory")
    if out.startswith(src + os.sep):
        raise ValueError(f"--out {out_dir} is inside the checkpoint being converted (--ckpt {ckpt}); choose a directory outside it")
    if src.startswith(out + os.sep):
        raise ValueError(f"--out {out_dir} holds the checkpoint being converted (--ckpt {ckpt}): replacing it would delete the checkpoint")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"--out {out_dir}: is a file, not a directory")
    marker = _checkpoint_marker(out)
    if marker is not None:
        raise ValueError(f"--out {out_dir} holds a checkpoint ({marker}); refusing to replace it, even with --overwrite")
    names = sorted(os.listdir(out))
    if names and not is_hf_export(out) and not overwrite:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(
            f"--out {out_dir} is not empty and is not an earlier HF export (it holds {shown}); the export replaces the "
            "whole directory: pass --overwrite to allow that, or choose another directory"
        )


def _read_hf_config_dir(hf_config_dir: str) -> Optional[dict]:
    """``--hf-config``'s ``config.json`` (None when it has only tokenizer files); a missing
    directory, or one with neither, is an error, not an export without a tokenizer."""

    if not os.path.isdir(hf_config_dir):
        raise ValueError(f"--hf-config {hf_config_dir}: no such directory")
    cfg_path = os.path.join(hf_config_dir, "config.json")
    has_tokenizer = any(os.path.isfile(os.path.join(hf_config_dir, n)) for n in TOKENIZER_FILES)
    if not os.path.isfile(cfg_path):
        if not has_tokenizer:
            raise ValueError(f"--hf-config {hf_config_dir}: neither a config.json nor tokenizer files (expected the original HF model directory)")
        return None
    if not has_tokenizer:
        log.warning("--hf-config %s has no tokenizer files: the export has none", hf_config_dir)
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None


def resolve_model_source(path: str, *, role: str = "actor", hf_config_dir: Optional[str] = None) -> ModelSource:
    """A model checkpoint (``megappo_model.json``), a training checkpoint ``step_N`` or a
    checkpoint directory (its ``latest``). The HF config (and tokenizer) come from
    ``hf_config_dir`` when given, else from what the checkpoint recorded."""

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
        hf_config = _read_hf_config_dir(hf_config_dir) or hf_config
    elif src is not None and os.path.isfile(os.path.join(src, "config.json")) and hf_config is None:
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
    overwrite: bool = False,
) -> None:
    """Export a model checkpoint or a training checkpoint's ``role`` as an HF directory,
    in ``dtype`` (default: the dtype the HF config declares, else float32). ``out_dir``
    is replaced whole: see ``check_hf_out`` for what is refused (``overwrite`` allows a
    non-empty directory that is not an earlier export)."""

    if role == "actor" and is_reward_checkpoint(ckpt):  # a reward model: a *ForSequenceClassification export
        role = "reward"
    if role not in ("actor", "reward"):
        raise ValueError(f"only the actor (an HF causal LM) or a reward model converts to HF (got role {role!r})")
    src = resolve_model_source(ckpt, role=role, hf_config_dir=hf_config_dir)
    check_hf_out(out_dir, ckpt=ckpt, overwrite=overwrite)
    if role == "reward":
        export_reward_source(src, ckpt, out_dir, tp=tp, pp=pp, dtype=dtype or config_dtype(src.hf_config), max_shard_bytes=max_shard_bytes)
        return
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
