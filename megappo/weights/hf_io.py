"""Reading and writing HF safetensors checkpoints one tensor (or one TP chunk) at a time.

``HFCheckpoint`` opens a model directory (``model.safetensors`` or an index with shards)
and reads row or column ranges through ``safe_open(...).get_slice``, so a rank reads only
its shard of each tensor. ``ShardWriter`` writes tensors into size-bounded files and
remembers which file holds which name (for the index).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def open_safetensors(path: str):
    """``safe_open`` on ``path``; a corrupt or truncated file is a ``ValueError`` naming it
    (safetensors' own error names neither the file nor what to do)."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError (not a ValueError), or OSError for an unreadable file
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is corrupt or "
            "truncated (an interrupted download or copy?): fetch or save it again"
        ) from e


class HFCheckpoint:
    """The tensors and ``config.json`` of an HF model directory, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"{self.path}: not a directory (expected a HuggingFace model directory)")
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{self.path}: no config.json (is this a HuggingFace model directory?)")
        with open(cfg_path) as f:
            self.config: dict[str, Any] = json.load(f)
        self.files: dict[str, str] = self._weight_map()
        self._stack = ExitStack()
        self._open: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            missing: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if not os.path.isfile(os.path.join(self.path, fname)):
                    missing.setdefault(fname, []).append(name)
            if missing:
                listed = "; ".join(f"{f} (holds {n[0]}{f' and {len(n) - 1} more' if len(n) > 1 else ''})" for f, n in missing.items())
                raise ValueError(f"{index} names shard files that are not in {self.path}: {listed}")
            return dict(weight_map)
        single = os.path.join(self.path, SINGLE)
        if os.path.isfile(single):
            with open_safetensors(single) as f:
                return {name: SINGLE for name in f.keys()}
        if any(n.endswith(".bin") for n in os.listdir(self.path)):
            raise ValueError(f"{self.path}: only PyTorch .bin weights found; megappo reads safetensors (re-save with save_pretrained)")
        raise ValueError(f"{self.path}: no {SINGLE} or {INDEX}")

    def _handle(self, fname: str):
        if fname not in self._open:
            self._open[fname] = self._stack.enter_context(open_safetensors(os.path.join(self.path, fname)))
        return self._open[fname]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers (no data is read)."""
        out, held = {}, {}
        for name, fname in self.files.items():
            f = self._handle(fname)
            if fname not in held:
                held[fname] = set(f.keys())
            if name not in held[fname]:
                raise ValueError(f"{self.path}/{INDEX} puts {name} in {fname}, which does not hold it")
            out[name] = tuple(f.get_slice(name).get_shape())
        return out

    def read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` along ``dim`` (0 or 1), or all of it (``dim`` None)."""
        if name not in self.files:
            raise ValueError(f"{self.path}: missing tensor {name}")
        sl = self._handle(self.files[name]).get_slice(name)
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise AssertionError(f"unsupported split dimension {dim}")

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes tensors into safetensors files of at most ``max_shard_bytes`` each (a larger
    single tensor gets a file of its own), named ``{prefix}-{k:05d}.safetensors``."""

    def __init__(self, out_dir: str, prefix: str, max_shard_bytes: int):
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.files: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise AssertionError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        # A private contiguous copy: views of one gathered buffer must not share storage.
        self.pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self.pending_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        for name in self.pending:
            self.weight_map[name] = fname
        self.files.append(fname)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0
