"""Process-group initialization: the one place megappo touches torch.distributed setup and
Megatron's ``parallel_state``.

Under ``torchrun`` the rendezvous comes from the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A plain ``python`` process becomes a world of one
on a private TCP port, so tools and tests run the same code without a launcher. With
rollout ranks apart (``parallel.rollout_world_size``, ``megappo.parallel.placement``) the
default group spans the trainer ranks only.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megappo.parallel.placement import get_placement, set_cpu_threads

log = logging.getLogger("megappo")


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    vpp: int | None
    device: torch.device
    ep: int = 1
    """Expert-parallel size: the experts of every MoE layer split over ``ep`` ranks of a
    data-parallel group (expert tensor parallelism equals TP)."""
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


_LAYOUT: ParallelLayout | None = None


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``address`` now (a rendezvous, a weight-update group)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU. ``cuda`` without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("parallel.device is 'cuda' but no CUDA GPU is visible (set parallel.device=cpu or auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device != "cpu":
        raise ValueError(f"parallel.device must be one of auto, cpu, cuda; got {device!r}")
    return torch.device("cpu")


def seed_rank(seed: int, pp_rank: int) -> None:
    """The one seeding rule of a run, applied once by ``init_parallel``.

    Python's ``random``, numpy's and torch's global generators get ``seed + 100 * pp_rank``
    (as Megatron-LM): the CPU generator initializes the weights (``use_cpu_initialization``),
    so pipeline stages must differ (or they would repeat each other's new layers, e.g. a
    critic's value head) while every tensor-parallel rank and data-parallel replica of a stage
    shares the seed, builds the same full tensors and takes its own shard of them. Megatron's
    model-parallel RNG tracker (dropout) is seeded separately by
    ``model_parallel_cuda_manual_seed(seed)`` with its own per-TP-rank offsets.

    Nothing after start-up draws from these global generators on purpose: rollout sampling
    seeds are a function of (seed, step, round, replica) (``megappo.loop.rollout_side``) and
    the prompt order of (seed, epoch) (``megappo.data.loader``), so a resumed run samples
    what the uninterrupted one would."""
    value = seed + 100 * pp_rank
    random.seed(value)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    *,
    seed: int = 1234,
    device: str = "auto",
    backend: str = "auto",
    timeout_minutes: int = 30,
    ep: int = 1,
) -> ParallelLayout:
    """Initialize torch.distributed and Megatron's model-parallel groups; idempotent.

    Applies the CPU patches for megatron-core when the device is the CPU. Raises
    ``ValueError`` when the world size is not a multiple of ``tp * pp``, and when the CPU
    is asked for while CUDA is visible (the patches cannot share a process with CUDA: set
    ``CUDA_VISIBLE_DEVICES=``). ``ep``: expert-parallel size (mixture-of-experts models);
    it must divide the data-parallel size, since expert-parallel ranks are data-parallel
    ranks for everything but the experts.
    """
    global _LAYOUT
    if _LAYOUT is not None:
        if (_LAYOUT.tp, _LAYOUT.pp, _LAYOUT.vpp, _LAYOUT.ep) != (tp, pp, vpp, ep):
            raise RuntimeError(f"parallel state already initialized as TP={_LAYOUT.tp} PP={_LAYOUT.pp} EP={_LAYOUT.ep}")
        return _LAYOUT

    dev = resolve_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cpu" and torch.cuda.is_available():
        # cpu_patches rewrite process-wide torch.cuda calls (current_device, Tensor.cuda), which
        # would silently keep any CUDA user of this process on the CPU; so they refuse.
        raise ValueError(
            f"parallel.device=cpu but CUDA is visible ({torch.cuda.device_count()} GPU(s)): megatron-core runs on "
            "the CPU only through process-wide patches of torch.cuda that cannot share a process with CUDA; "
            "hide the GPUs with CUDA_VISIBLE_DEVICES= (empty) in the environment of every rank, or use "
            "parallel.device=cuda (or auto)"
        )
    if dev.type == "cpu":
        from megappo.parallel import cpu_patches  # deferred: megatron-core's CPU patches, only on CPU

        cpu_patches.apply()
        set_cpu_threads()
    else:
        torch.cuda.set_device(dev)

    placement = get_placement()
    if placement is not None and not dist.is_initialized():
        assert not placement.is_rollout, "a rollout rank trains nothing"
        dist.init_process_group(  # over the trainer ranks only, on their own prefix of the launch's store
            backend=backend, store=placement.prefixed("trainers/"), rank=placement.rank,
            world_size=placement.trainer_world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp} x {pp}"
        )
    check_expert_parallel(world, tp, pp, ep)
    if vpp is not None and pp == 1:
        raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")

    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_rank(seed, mpu.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _LAYOUT = ParallelLayout(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        vpp=vpp,
        device=dev,
        ep=ep,
        ep_rank=mpu.get_expert_model_parallel_rank(),
    )
    log.debug("parallel layout: %s", _LAYOUT)
    return _LAYOUT


def check_expert_parallel(world: int, tp: int, pp: int, ep: int) -> None:
    """``ValueError`` naming the sizes when expert parallelism cannot lay out: ``ep`` must
    divide the data-parallel size (world / (TP x PP)); the number of experts is checked
    against ``ep`` with the model (``ModelSpec.check_parallel``)."""
    if ep < 1:
        raise ValueError(f"expert_model_parallel_size must be >= 1, got {ep}")
    dp = world // (tp * pp)
    if dp % ep:
        raise ValueError(
            f"expert_model_parallel_size {ep} does not divide the data-parallel size {dp} "
            f"(world size {world} / (tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp}))"
        )


def get_layout() -> ParallelLayout:
    if _LAYOUT is None:
        raise RuntimeError("megappo.parallel.init_parallel() has not been called")
    return _LAYOUT


def destroy_parallel(*, keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups and the default process group (tests, tools).

    ``keep_process_group`` keeps torch.distributed up, so that ``init_parallel`` can lay
    the same processes out differently (tests compare TP / PP layouts in one launch).
    """
    global _LAYOUT
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
    _LAYOUT = None
