"""The few patches megatron-core 0.16.1 needs to run forward, backward, the optimizer and
distributed checkpointing on a CPU (gloo) process group.

Megatron-core assumes CUDA in a handful of places. Each patch below names the call site
and why it is safe. They are applied by ``megappo.parallel.init_parallel`` only when the
trainer's device is the CPU; nothing else in megappo knows about them. They touch private
internals of the pinned version, so ``apply()`` checks the version and the attributes it
replaces and fails loudly when megatron-core changes under it.

Measured on 2 cores (see ``shared/notes/megatron-cpu.md``): a global TorchFunctionMode that
rewrites every ``cuda`` device made forward/backward ~13x slower, so instead each module
with a literal ``device="cuda"`` gets a thin stand-in for its module-level ``torch`` whose
tensor factories map CUDA devices to the CPU; every other attribute is the real torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

SUPPORTED_MEGATRON = ("0.16.",)

# Modules whose own code builds tensors with a literal device="cuda" on the paths megappo uses:
#   pipeline_parallel.schedules      total_num_tokens counter of every schedule
#   distributed.param_and_grad_buffer warm-up tensor of the grad buffers
#   optimizer.optimizer              found_inf / _scale tensors of the FP32 and mixed-precision optimizers
#   optimizer.clip_grads             the gradient-norm all-reduce buffers
#   transformer.utils                the default causal and sliding-window masks
#   utils                            local_multi_tensor_l2_norm, the gradient norm (clip_grad) without apex/TE
#   dist_checkpointing.*             torch.cuda.synchronize() before writing (filesystem_async, async_utils,
#                                    fully_parallel, tensor_aware_state_dict), the save-verification flags
#                                    (state_dict_saver), and the shard-exchange buffers of fully parallel
#                                    loading (exchange_utils, mapping's ShardedTensor.init_data("cuda"))
#   pipeline_parallel.p2p_communication  torch.cuda.synchronize() around the shape exchange
#   transformer.moe.token_dispatcher the all-to-all dispatcher's device-to-host side stream (torch.cuda.Stream,
#                                    current_stream, stream(), record_event): one null stream on CPU
#   transformer.moe.moe_utils        the aux-loss tracker's buffers (device="cuda")
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.mapping",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like")

_applied = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """A module-local ``torch`` whose tensor factories put CUDA tensors on the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


class _NullStream:
    """The one "stream" of a CPU: work is already ordered, so waiting and events are no-ops."""

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *a, **k) -> "_NullStream":
        return self


_NULL_STREAM = _NullStream()


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by the patched modules: synchronization is a no-op on CPU."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda *a, **k: None
        self.current_device = lambda: torch.device("cpu")
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)
        self.Stream = lambda *a, **k: _NULL_STREAM
        self.current_stream = lambda *a, **k: _NULL_STREAM

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _patch_rng_tracker():
    """Megatron's model-parallel RNG tracker saves and restores ``torch.cuda`` generator
    states to fork dropout / init randomness per TP rank. On CPU the same forking is done
    on the CPU generator: the tracked states become CPU generator states."""
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker", "initialize_rng_tracker"):
        if not hasattr(rnd, name):
            raise RuntimeError(f"megatron-core changed: tensor_parallel.random.{name} is gone; update megappo/parallel/cpu_patches.py")

    rnd._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(rnd.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    rnd.CudaRNGStatesTracker = CpuRNGStatesTracker
    rnd.initialize_rng_tracker(force_reset=True)
    # model_parallel_cuda_manual_seed seeds torch.cuda as well; on a CPU build that call is
    # queued lazily and never runs, so it needs no patch.


def _patch_causal_masks():
    """``get_default_causal_mask`` (used when attention_mask is None) builds its mask with
    device="cuda" and is imported by name into fused_softmax."""
    tutils = importlib.import_module("megatron.core.transformer.utils")
    fsoft = importlib.import_module("megatron.core.fusions.fused_softmax")

    @functools.lru_cache(maxsize=8)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = get_default_causal_mask
    fsoft.get_default_causal_mask = get_default_causal_mask


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``Tensor.type()`` (no arguments) names CPU float tensors as their CUDA
    counterparts; conversions (``type(dtype)``) are untouched."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_type_checks():
    """The optimizers sort parameters by ``param.type()`` strings and accept only
    ``'torch.cuda.*Tensor'`` (``clip_grad_by_total_norm_fp32`` asserts it; the distributed
    and the mixed-precision optimizer raise ``TypeError`` on anything else). Only these
    three calls see CPU tensors under their CUDA names, and only while they run."""
    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    opt = importlib.import_module("megatron.core.optimizer.optimizer")
    dopt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if opt.clip_grad_by_total_norm_fp32 is not clip.clip_grad_by_total_norm_fp32:
        raise RuntimeError("megatron-core changed: optimizer.clip_grad_by_total_norm_fp32 is not clip_grads'")
    clip.clip_grad_by_total_norm_fp32 = opt.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        clip.clip_grad_by_total_norm_fp32
    )
    for cls in (dopt.DistributedOptimizer, opt.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)


_TE_MOE_NAMES = (
    "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute", "fused_permute_with_probs",
    "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
    "fused_unpermute", "te_general_gemm",
)


def _patch_moe_without_te():
    """``moe_utils`` imports its TE kernels in a ``try`` and, without TE, leaves the names
    undefined; the router's gating GEMM then tests ``te_general_gemm is not None`` and
    raises ``NameError``. Defining them as None selects the torch paths it already has."""
    mu = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if getattr(mu, "HAVE_TE", None) is not False:
        return
    for name in _TE_MOE_NAMES:
        if not hasattr(mu, name):
            setattr(mu, name, None)


class _ListSplitsDistributed(types.ModuleType):
    """``torch.distributed`` whose ``all_to_all_single`` takes split sizes as lists of ints."""

    def __init__(self):
        super().__init__("torch.distributed")

    @staticmethod
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        as_list = lambda s: None if s is None else [int(x) for x in s]  # noqa: E731
        return torch.distributed.all_to_all_single(
            output, input, output_split_sizes=as_list(output_split_sizes), input_split_sizes=as_list(input_split_sizes), **kwargs
        )

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _MappingsTorch(types.ModuleType):
    """The ``torch`` of ``tensor_parallel.mappings``: its distributed all-to-all is the one above."""

    def __init__(self):
        super().__init__("torch")
        self.distributed = _ListSplitsDistributed()

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_expert_all_to_all():
    """The all-to-all token dispatcher (expert parallelism) passes its split sizes as numpy
    arrays, which gloo's ``all_to_all_single`` binding rejects (``incompatible function
    arguments``); they become lists of ints. Gloo itself has every collective the MoE layer
    uses on torch 2.13 (uneven all-to-all, all-gather and reduce-scatter into a tensor were
    checked on two ranks); the CUDA-only parts are the dispatcher's side stream (a null
    stream, ``_CpuCuda``) and the TE kernels (``_patch_moe_without_te``)."""
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    if getattr(mappings, "torch", None) is not torch:
        raise RuntimeError("megatron-core changed: tensor_parallel.mappings no longer imports torch as a module global")
    mappings.torch = _MappingsTorch()


def apply() -> None:
    """Apply every CPU patch once. Call before building models or optimizers."""
    global _applied
    if _applied:
        return
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(SUPPORTED_MEGATRON):
        raise RuntimeError(
            f"megatron-core {version} is not supported on CPU; the CPU patches were written for "
            f"{', '.join(v + 'x' for v in SUPPORTED_MEGATRON)} (pip install megatron-core==0.16.1)"
        )
    if torch.cuda.is_available():
        raise RuntimeError("megappo.parallel.cpu_patches must not be applied when CUDA is available")

    # torch.cuda.current_device() is used as device= at ~100 call sites (attention buffers,
    # TP all-gather outputs, rotary embeddings, p2p shape exchange). On a CPU-only torch build
    # every such call raises, so answering with the CPU device changes no working behaviour.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Tensor.cuda() moves the shared embedding to the device before the first/last-stage
    # all-reduce (LanguageModule.setup_embeddings_and_output_layer), and dist_checkpointing's
    # shard exchange does the same; on a CPU-only build it raises, so the tensor stays put.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    cpu_torch = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is not torch:
            raise RuntimeError(f"megatron-core changed: {name} no longer imports torch as a module global")
        mod.torch = cpu_torch

    _patch_rng_tracker()
    _patch_causal_masks()
    _patch_tensor_type_checks()
    _patch_moe_without_te()
    _patch_expert_all_to_all()
    _applied = True
