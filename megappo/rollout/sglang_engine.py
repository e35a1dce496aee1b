"""``rollout.engine: sglang``: an ``sglang.Engine`` sharing the trainer's GPUs.

Supported: sglang >= 0.5.18, < 0.5.22 (``megappo.rollout.sglang_protocol``). SGLang is
imported when the engine is built, never at import time; without it the error says
``pip install megappo[sglang]``. CUDA only.

Placement: like every engine, one per data-parallel replica, held by the replica's
tp0/pp0 rank, with ``tp_size`` GPUs from that rank's local GPU on (default: the trainer's
TP size; ``rollout.sglang`` overrides any ``ServerArgs`` field and is checked against
SGLang's own ``ServerArgs``). Defaults we set: ``load_format=dummy`` (the weights come
from the first sync), ``skip_tokenizer_init`` (token ids in and out),
``enable_memory_saver`` (for release / resume) and ``random_seed``.

Weights: each bucket becomes one ``FlattenedTensorBucket`` on this GPU, serialized with
SGLang's ``MultiprocessingSerializer`` (CUDA IPC handles; SGLang's
``monkey_patch_torch_reductions`` applied first) once per SGLang TP rank and loaded with
``update_weights_from_tensor(load_format="flattened_bucket", flush_cache=False)``; on
0.5.21 inside ``begin_weight_update`` / ``end_weight_update``; the radix cache is flushed
once at the end. Memory: ``release_memory`` frees weights, KV cache and CUDA graphs
(``release_memory_occupation``); a weight update first resumes the weights, generation
resumes everything.

``weights_checksum`` is a spot-check read back from the engine (``sglang_protocol``):
SGLang keeps fused, sharded parameters that are not HF-named, so only a few tensors' first
rows are read, with ``get_weights_by_name`` (Llama-like models only in 0.5.21). Progress:
``Engine.generate`` returns all prompts at once, so ``on_progress`` is told at the end.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch

from megappo.rollout.engine import Bucket, Progress, RolloutEngine, RolloutEngineError, Sample, SamplingParams
from megappo.rollout.sglang_protocol import (
    check_result,
    check_server_args,
    choose_spots,
    generate_request,
    import_sglang,
    parse_samples,
    spot_check,
    weights_by_name_request,
)

log = logging.getLogger("megappo")


def engine_server_args(hf_dir: str, user_args: dict[str, Any], *, tp_size: int, gpu_id: int, seed: int) -> dict[str, Any]:
    """Our defaults overlaid with ``rollout.sglang`` (unchecked; see ``check_server_args``)."""
    args: dict[str, Any] = {
        "model_path": hf_dir,
        "tp_size": tp_size,
        "base_gpu_id": gpu_id,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "enable_memory_saver": True,
        "random_seed": seed,
    }
    args.update(user_args)
    return args


def flattened_bucket_payload(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """``[{"flattened_tensor", "metadata"}]`` as SGLang's ``update_weights_from_tensor``
    with ``load_format=flattened_bucket`` reads it (one dict per dtype when the installed
    ``FlattenedTensorBucket`` cannot mix dtypes)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    groups: list[list[tuple[str, torch.Tensor]]]
    if getattr(FlattenedTensorBucket, "supports_multi_dtypes", False):
        groups = [list(named_tensors)]
    else:
        by_dtype: dict[torch.dtype, list] = {}
        for name, t in named_tensors:
            by_dtype.setdefault(t.dtype, []).append((name, t))
        groups = list(by_dtype.values())
    payloads = []
    for group in groups:
        bucket = FlattenedTensorBucket(named_tensors=group)
        payloads.append({"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()})
    return payloads


class SGLangEngine(RolloutEngine):
    """A colocated ``sglang.Engine`` (module docstring)."""

    spot_checked = True

    def __init__(self, hf_dir: str, *, server_args: dict[str, Any], eos_token_ids: Sequence[int], tp_size: int, gpu_id: int, seed: int = 0):
        sglang = import_sglang()
        from sglang.srt.server_args import ServerArgs

        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would report pre-temperature log-probs; unset it")
        args = engine_server_args(hf_dir, server_args, tp_size=tp_size, gpu_id=gpu_id, seed=seed)
        check_server_args(args, ServerArgs)
        self.name = f"sglang engine (GPU {args['base_gpu_id']}, tp_size {args['tp_size']})"
        self.eos_token_ids = tuple(eos_token_ids)
        self._tp_size = int(args["tp_size"])
        self._device = torch.device("cuda", int(args["base_gpu_id"]))
        self._released: set[str] = set()
        self._ready = False
        self._spots: dict[str, tuple[int, ...]] | None = None
        try:
            self._engine = sglang.Engine(**args)
        except Exception as e:
            raise RolloutEngineError(f"{self.name}: failed to start: {type(e).__name__}: {e}") from e

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            result = fn(*args, **kwargs)
        except RolloutEngineError:
            raise
        except Exception as e:
            raise RolloutEngineError(f"{self.name}: {what} failed: {type(e).__name__}: {e}") from e
        check_result(result, what, self.name)
        return result

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_progress: Progress | None = None
    ) -> list[list[Sample]]:
        if not self._ready:
            raise RolloutEngineError(f"{self.name}: no complete weight sync yet (or the last one failed); cannot generate")
        self.resume_memory()
        out = self._call("generate", self._engine.generate, **generate_request(prompts, params, self.eos_token_ids))
        samples = parse_samples(out, len(prompts), params.n, self.name)
        if on_progress is not None:
            on_progress(len(prompts))
        return samples

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        from sglang.srt.utils import MultiprocessingSerializer

        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

            monkey_patch_torch_reductions()
        except ImportError:  # pragma: no cover - older SGLang
            pass
        self._resume(["weights"])
        self._ready = False
        session = hasattr(self._engine, "begin_weight_update")
        if session:
            self._call("begin_weight_update", self._engine.begin_weight_update)
        self._spots = None
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            for bucket in buckets:
                named = [(name, t.detach().to(self._device).contiguous()) for name, t in bucket]
                shapes.update((name, tuple(t.shape)) for name, t in named)
                for payload in flattened_bucket_payload(named):
                    serialized = MultiprocessingSerializer.serialize(payload, output_str=True)
                    self._call(
                        "update_weights_from_tensor",
                        self._engine.update_weights_from_tensor,
                        named_tensors=[serialized] * self._tp_size,
                        load_format="flattened_bucket",
                        flush_cache=False,
                    )
                del named
        except BaseException:
            if session:  # close the session; the weights stay marked incomplete
                try:
                    self._engine.end_weight_update()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.exception("%s: end_weight_update after a failed update", self.name)
            raise
        if session:
            self._call("end_weight_update", self._engine.end_weight_update)
        self._call("flush_cache", self._engine.flush_cache)
        self._spots = {name: shapes[name] for name in choose_spots(shapes)}
        self._ready = True

    def checksum_scope(self) -> tuple[str, ...] | None:
        return tuple(self._spots) if self._spots is not None else None

    def weights_checksum(self) -> float:
        """A spot-check of the weights the engine holds (module docstring)."""
        if self._spots is None:
            raise RolloutEngineError(f"{self.name}: no complete weight sync yet")
        self._resume(["weights"])

        def read(name: str):
            return self._call(f"get_weights_by_name({name!r})", self._engine.get_weights_by_name, **weights_by_name_request(name))

        return spot_check(read, self._spots, self.name)

    def _resume(self, tags: list[str] | None) -> None:
        todo = sorted(self._released if tags is None else self._released & set(tags))
        if todo:
            self._call("resume_memory_occupation", self._engine.resume_memory_occupation, tags=todo)
            self._released -= set(todo)

    def release_memory(self) -> None:
        if not self._released:
            self._call("flush_cache", self._engine.flush_cache)
            self._call("release_memory_occupation", self._engine.release_memory_occupation)
            self._released = {"weights", "kv_cache", "cuda_graph"}

    def resume_memory(self) -> None:
        self._resume(None)

    def health(self) -> None:
        self._call("get_server_info", self._engine.get_server_info)

    def shutdown(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        self._ready = False
        if engine is not None:
            engine.shutdown()
