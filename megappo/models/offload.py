"""Trainer offload for colocated rollout (``train.offload``): the policies' parameters,
DDP gradient buffers and optimizer state leave the GPU while the engine generates.

Colocated, the engine and the trainer share each GPU; releasing only the engine's memory
during training is not enough at 7B+: during generation the actor, critic, reference, the
optimizer's fp32 master weights and Adam moments and the DDP gradient buffers would all
stay resident while SGLang re-maps its KV cache. slime and verl move them to pinned host
memory around rollout; so does ``TrainerOffload``.

What moves: every distinct *storage* on the policies' device behind
  - the unwrapped model chunks' parameters (``param.data``; with the distributed optimizer
    these are views into the DDP ``param_data`` buffer, whose whole storage moves),
  - the DDP buffers (``_ParamAndGradBuffer.param_data`` / ``grad_data``, expert buffers too),
  - the optimizer's own tensors: its torch optimizers' parameters (fp32 master weights, or
    shards of them) and their state (``exp_avg``, ``exp_avg_sq``, ...).
Megatron's own tensors stay the same Python objects: each storage is copied into a pinned
host buffer (allocated once, reused every step) and then resized to 0 bytes, which returns
its memory to the caching allocator; ``torch.cuda.empty_cache()`` then hands it back to the
driver before the engine resumes. ``onload`` resizes each storage back and copies the bytes
in, so every view (``param.main_grad``, bucket views, optimizer shards) is valid again with
its old values, bit for bit. Gradient buffers are not copied: ``train_step`` zeroes them
before use, so they come back zeroed (as Megatron's ``restore_grad_buffers`` does).

Tensors on another device (a reference with ``offload_to_cpu`` keeps its weights on the CPU
between uses) are left alone. On a CPU device the same round trip runs (it frees and
restores the storages, so the CPU tests check exactly the mechanism the GPU uses); it saves
nothing there.

Usage (the loop, colocated):
    offload = TrainerOffload([actor, critic, reference])   # once, after the policies exist
    ... sync weights ...
    with offload.offloaded():                              # before the engine resumes
        batch = rollout.sample(step)
    ... train ...
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

if TYPE_CHECKING:
    from megappo.models.policy import MegatronPolicy

log = logging.getLogger("megappo")


@dataclass
class MemorySnapshot:
    """Device memory at one point (bytes; CUDA's allocator counters, 0 on CPU)."""

    allocated: int = 0
    reserved: int = 0

    @staticmethod
    def take(device: torch.device) -> "MemorySnapshot":
        if device.type != "cuda":
            return MemorySnapshot()
        torch.cuda.synchronize(device)
        return MemorySnapshot(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


@dataclass
class OffloadStats:
    """One offload/onload cycle."""

    offloaded_bytes: int = 0
    """Bytes copied to the host (parameters, master weights, optimizer state)."""
    freed_bytes: int = 0
    """Device bytes released (the above plus the gradient buffers)."""
    num_storages: int = 0
    offload_seconds: float = 0.0
    onload_seconds: float = 0.0
    memory: dict[str, MemorySnapshot] = field(default_factory=dict)
    """``before`` offload, ``offloaded`` (after ``empty_cache``), ``after`` onload."""


@dataclass
class _Slot:
    storage: torch.UntypedStorage
    nbytes: int
    keep: bool
    """Copy the bytes (False: a gradient buffer, restored as zeros)."""
    host: Optional[torch.Tensor] = None
    """uint8 [nbytes], pinned when the device is CUDA; allocated on the first offload."""


def _as_bytes(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class TrainerOffload:
    """Moves the given policies' device memory to host memory and back (module doc)."""

    def __init__(self, policies: Sequence[Optional["MegatronPolicy"]]):
        self.policies = [p for p in policies if p is not None]
        if not self.policies:
            raise ValueError("TrainerOffload needs at least one policy")
        devices = {p.device for p in self.policies}
        if len(devices) != 1:
            raise ValueError(f"the policies live on different devices: {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._slots: Optional[list[_Slot]] = None
        self.is_offloaded = False
        self.last = OffloadStats()

    # ------------------------------------------------------------------ public

    @contextmanager
    def offloaded(self) -> Iterator[OffloadStats]:
        """Offload on entry, onload on exit (also when the body raises)."""
        stats = self.offload()
        try:
            yield stats
        finally:
            self.onload()

    def offload(self) -> OffloadStats:
        import time

        if self.is_offloaded:
            raise RuntimeError("TrainerOffload.offload called twice without onload")
        start = time.perf_counter()
        stats = OffloadStats(memory={"before": MemorySnapshot.take(self.device)})
        slots = self._collect()
        cuda = self.device.type == "cuda"
        for slot in slots:
            if slot.keep:
                if slot.host is None or slot.host.numel() != slot.nbytes:
                    slot.host = torch.empty(slot.nbytes, dtype=torch.uint8, pin_memory=cuda)
                slot.host.copy_(_as_bytes(slot.storage, self.device), non_blocking=cuda)
                stats.offloaded_bytes += slot.nbytes
            stats.freed_bytes += slot.nbytes
        if cuda:
            # The copies must land before their source memory can be reused by anyone.
            torch.cuda.synchronize(self.device)
        for slot in slots:
            slot.storage.resize_(0)
        if cuda:
            torch.cuda.empty_cache()
        stats.num_storages = len(slots)
        stats.offload_seconds = time.perf_counter() - start
        stats.memory["offloaded"] = MemorySnapshot.take(self.device)
        self._slots, self.is_offloaded, self.last = slots, True, stats
        log.info(
            "offload: %.2f GB to host, %.2f GB of device memory released (%d storages, %.2f s)",
            stats.offloaded_bytes / 1e9, stats.freed_bytes / 1e9, stats.num_storages, stats.offload_seconds,
        )
        return stats

    def onload(self) -> OffloadStats:
        import time

        if not self.is_offloaded:
            raise RuntimeError("TrainerOffload.onload called without a preceding offload")
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        for slot in self._slots:
            slot.storage.resize_(slot.nbytes)
            data = _as_bytes(slot.storage, self.device)
            if slot.keep:
                data.copy_(slot.host, non_blocking=cuda)
            else:
                data.zero_()
        if cuda:
            torch.cuda.synchronize(self.device)
        self.is_offloaded = False
        self.last.onload_seconds = time.perf_counter() - start
        self.last.memory["after"] = MemorySnapshot.take(self.device)
        return self.last

    # ------------------------------------------------------------------ internals

    def _collect(self) -> list[_Slot]:
        """Distinct device storages of the policies, grad-only ones marked not to copy. The
        set is recomputed each time (the optimizer creates its state at its first step)."""
        keep: dict[int, torch.UntypedStorage] = {}
        grads: dict[int, torch.UntypedStorage] = {}

        def add(t: Optional[torch.Tensor], into: dict) -> None:
            if t is None or not isinstance(t, torch.Tensor) or t.device != self.device:
                return
            st = t.untyped_storage()
            if st.nbytes() > 0:
                into.setdefault(st.data_ptr(), st)

        for policy in self.policies:
            for model in policy.models:
                for p in model.parameters():
                    add(p.data, keep)
            for chunk in policy.chunks:
                # DDP's lists of _ParamAndGradBuffer (a bare module's ``buffers`` is nn.Module's method).
                ddp_buffers = [b for name in ("buffers", "expert_parallel_buffers")
                               if isinstance(getattr(chunk, name, None), list) for b in getattr(chunk, name)]
                for buf in ddp_buffers:
                    add(getattr(buf, "param_data", None), keep)
                    add(getattr(buf, "grad_data", None), grads)
            if policy.optimizer is not None:
                for opt in _torch_optimizers(policy.optimizer):
                    for group in opt.param_groups:
                        for p in group["params"]:
                            add(p.data, keep)
                    for state in opt.state.values():
                        for v in state.values():
                            add(v, keep)
        # A storage holding parameters and gradients (MXFP8's shared buffer) is copied.
        slots = [_Slot(st, st.nbytes(), True) for st in keep.values()]
        slots += [_Slot(st, st.nbytes(), False) for ptr, st in grads.items() if ptr not in keep]
        self._reuse_host_buffers(slots)
        return slots

    def _reuse_host_buffers(self, slots: list[_Slot]) -> None:
        """Pinned host buffers survive across cycles (pinning GBs takes seconds each time)."""
        pool: dict[int, list[torch.Tensor]] = {}
        for s in self._slots or []:
            if s.host is not None:
                pool.setdefault(s.nbytes, []).append(s.host)
        for s in slots:
            if s.keep and pool.get(s.nbytes):
                s.host = pool[s.nbytes].pop()


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    parts = chained if chained is not None else [optimizer]
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]
