"""A model as a Megatron distributed checkpoint (``megatron.core.dist_checkpointing``),
loadable at any TP / PP / VPP: tensors are stored by global key and resharded on load.

Layout of a model checkpoint written by ``save_megatron_model`` (and by
``tools/convert_hf_to_megatron.py``)::

    DIR/
      metadata.json, common.pt, *.distcp   dist_checkpointing (torch_dist) files
      megappo_model.json                   {"format", "role", "spec", "hf_config", "source_dir", "saved_layout"}

``load_megatron_model`` checks ``megappo_model.json``'s spec against the models before
loading. A training checkpoint's ``step_N/actor`` directory holds the same model keys
(next to the optimizer's), so ``load_megatron_model`` reads it too, given the spec.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from megappo.models.spec import ModelSpec
from megappo.weights.validate import spec_differences
from megappo.weights.model_io import model_chunks, unwrap

MODEL_META = "megappo_model.json"
MODEL_FORMAT = "megappo-megatron-model/1"

_DCP_DEPRECATIONS = (
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`load_state_dict` is deprecated and will be removed",
)
"""FutureWarnings torch.distributed.checkpoint raises from inside megatron-core's own calls
(its ShardedTensor-based strategy, its use of the old ``load_state_dict``): nothing a user
can act on, printed on every rank at every load."""


@contextmanager
def quiet_dist_checkpointing() -> Iterator[None]:
    """Silence ``_DCP_DEPRECATIONS`` around a ``dist_checkpointing.save`` / ``load`` (and
    nothing else: other warnings still show)."""
    with warnings.catch_warnings():
        for message in _DCP_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


def sharded_model_state(models: Sequence) -> dict[str, Any]:
    """``{"model": ...}`` (or ``model0``, ``model1``, ... per virtual chunk) of the chunks'
    ``sharded_state_dict``, as Megatron-LM lays out its checkpoints. The keys inside are
    global, so a checkpoint saved with one VPP loads with another."""
    chunks = [unwrap(m) for m in models]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(chunks)}


def load_model_state(models: Sequence, state: dict[str, Any], *, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Copy the loaded ``sharded_model_state`` layout into the chunks: strict, except that
    parameters under ``skip_prefixes`` (left out of the load) keep their values."""
    chunks = [unwrap(m) for m in models]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        result = chunk.load_state_dict(state[key], strict=not skip_prefixes)
        if skip_prefixes:
            missing = [k for k in result.missing_keys if not k.startswith(skip_prefixes)]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"checkpoint keys do not match the model: missing {missing}, unexpected {result.unexpected_keys}")


def save_megatron_model(
    models, out_dir: str | os.PathLike, *, hf_config: dict | None = None, source_dir: str | None = None
) -> None:
    """Save this rank's chunks into the distributed checkpoint ``out_dir`` (collective over
    all ranks; ``out_dir`` must be empty or absent) and the metadata file, which records
    the HF config and the HF directory it came from (for its tokenizer)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    chunks, _ = model_chunks(models)
    out = os.fspath(out_dir)
    if dist.get_rank() == 0:
        if os.path.isdir(out) and os.listdir(out):
            raise ValueError(f"{out} is not empty; refusing to write a checkpoint over it")
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    with quiet_dist_checkpointing():
        dist_checkpointing.save(sharded_model_state(chunks), out)
    if dist.get_rank() == 0:
        meta = {
            "format": MODEL_FORMAT,
            "role": chunks[0].megappo_role,
            "spec": chunks[0].megappo_spec.to_dict(),
            "hf_config": hf_config,
            "source_dir": source_dir,
            "saved_layout": {
                "tp": mpu.get_tensor_model_parallel_world_size(),
                "pp": mpu.get_pipeline_model_parallel_world_size(),
                "vpp": len(chunks) if len(chunks) > 1 else None,
            },
        }
        with open(os.path.join(out, MODEL_META), "w") as f:
            json.dump(meta, f, indent=2)
    dist.barrier()


def read_model_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, MODEL_META)
    if not os.path.isfile(path):
        raise ValueError(f"{ckpt_dir}: no {MODEL_META} (not a model checkpoint written by megappo)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    return meta


def check_spec(model_spec: ModelSpec, saved: dict, *, source: str) -> None:
    """A checkpoint's architecture must be the model's: name every field that differs."""
    diffs = spec_differences(model_spec, ModelSpec(**saved), labels=("this run", "checkpoint"))
    if diffs:
        raise ValueError(f"{source}: the checkpoint's architecture differs from the model's: " + "; ".join(diffs))


def load_megatron_model(models, ckpt_dir: str | os.PathLike, *, spec_dict: dict | None = None, trunk_only: bool = False) -> None:
    """Load a model checkpoint (any saved layout) into this rank's chunks or a policy's
    (then its optimizer's fp32 copy is refreshed too). The spec comes from
    ``megappo_model.json`` or, for a training checkpoint's role directory, ``spec_dict``.
    ``trunk_only``: everything but the output layer (a critic's trunk from a policy
    checkpoint: its value head keeps its initialization)."""
    from megatron.core import dist_checkpointing

    chunks, optimizer = model_chunks(models)
    if spec_dict is None:
        spec_dict = read_model_meta(ckpt_dir)["spec"]
    check_spec(chunks[0].megappo_spec, spec_dict, source=os.fspath(ckpt_dir))
    skip = (_OUTPUT_LAYER,) if trunk_only else ()
    wanted = {key: {k: v for k, v in part.items() if not k.startswith(skip)} if skip else part
              for key, part in sharded_model_state(chunks).items()}
    with quiet_dist_checkpointing():
        state = dist_checkpointing.load(wanted, os.fspath(ckpt_dir))
    load_model_state(chunks, state, skip_prefixes=skip)
    if optimizer is not None:
        optimizer.reload_model_params()


_OUTPUT_LAYER = "output_layer."
