"""``rollout.engine: sglang``: an ``sglang.Engine`` sharing the trainer's devices.

Supported: sglang >= 0.5.18, <= 0.5.23 (``megappo.rollout.sglang_protocol``). SGLang is
imported when the engine is built, never at import time; without it the error says how to
install it. On GPUs it is the colocated production engine. On CPU (no CUDA visible, or
``rollout.sglang.device: cpu``) it runs for tests and debugging only, tiny models with
SGLang's ``torch_native`` attention: ``megappo.parallel.sglang_cpu`` is applied first (the
only CPU special case; its ``cpu_server_args`` are defaults that ``rollout.sglang`` overrides).

Placement: like every engine, one per data-parallel replica, held by the replica's
tp0/pp0 rank, with ``tp_size`` GPUs from that rank's local GPU on (default: the trainer's
TP size; ``rollout.sglang`` overrides any ``ServerArgs`` field and is checked against
SGLang's own ``ServerArgs``). Defaults we set: ``load_format=dummy`` (the weights come
from the first sync), ``skip_tokenizer_init`` (token ids in and out),
``enable_memory_saver`` (for release / resume; GPU only), ``random_seed``, and per-replica
``port`` / ``nccl_port`` that cannot clash with another replica's engine on the node nor
with the trainer's ``MASTER_PORT`` (``megappo.rollout.sglang_ports``, which also says how
to override them).

Every call into the engine runs on one worker thread and is bounded by ``timeout_s``
(``rollout.server_timeout_s``): a call that does not return in time raises
``RolloutEngineError`` naming the call, and the engine is then refused for good (its
worker is stuck in SGLang); ``run_on_holder`` turns that into an error on every rank.

Weights: each bucket becomes one ``FlattenedTensorBucket`` on the engine's device,
serialized with SGLang's ``MultiprocessingSerializer`` (CUDA IPC handles on GPU, shared
memory on CPU; SGLang's ``monkey_patch_torch_reductions`` applied first) once per SGLang TP
rank and loaded with ``update_weights_from_tensor(load_format="flattened_bucket",
flush_cache=False)``; from 0.5.21 on inside ``begin_weight_update`` / ``end_weight_update``;
the radix cache is flushed once at the end. Memory: ``release_memory`` frees weights, KV
cache and CUDA graphs (``release_memory_occupation``; on CPU it frees nothing, as SGLang's
memory saver hooks CUDA allocations only); a weight update first resumes the weights,
generation resumes everything.

``weights_checksum`` is a spot-check read back from the engine (``sglang_protocol``):
SGLang keeps fused, sharded parameters that are not HF-named, so only a few tensors' first
rows are read, with ``get_weights_by_name`` (Llama-like models only). Progress:
``Engine.generate`` returns all prompts at once, so ``on_progress`` is told at the end.

Concurrent calls: SGLang's ``Engine`` runs each call with ``loop.run_until_complete`` on one
asyncio loop, so a ``generate`` in flight would hold it. We run that loop forever on its own
thread instead (``_LoopThread``): every call submits its coroutine there, so calls from several
threads overlap as requests do in SGLang's HTTP server (one loop serving them all). Pause /
continue / abort are SGLang's tokenizer-manager calls (what the server's routes call; the
``Engine`` has no methods for them). A weight update while a ``generate`` is paused works as
with the server: SGLang skips its update lock while paused, and in ``retract`` mode every
later token is computed with the new weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Iterable, Sequence

import torch

from megappo.parallel import sglang_cpu
from megappo.parallel.sglang_cpu import cpu_server_args
from megappo.rollout.engine import (
    PAUSE_MODES,
    Bucket,
    PauseMode,
    Progress,
    RolloutEngine,
    RolloutEngineError,
    Sample,
    SamplingParams,
)
from megappo.rollout.sglang_ports import engine_ports, local_slot, own_rendezvous
from megappo.rollout.sglang_protocol import (
    check_result,
    check_server_args,
    choose_spots,
    RoutingLayout,
    generate_request,
    import_sglang,
    parse_samples,
    spot_check,
    weights_by_name_request,
)

log = logging.getLogger("megappo")


def engine_server_args(
    hf_dir: str, user_args: dict[str, Any], *, tp_size: int, gpu_id: int, seed: int, slot: int = 0, on_cpu: bool = False
) -> dict[str, Any]:
    """Our defaults overlaid with ``rollout.sglang`` (unchecked; see ``check_server_args``).
    ``slot``: the replica's slot on its node (``sglang_ports.local_slot``), which picks its
    ports; ``on_cpu``: SGLang's CPU-path arguments (``sglang_cpu.cpu_server_args``) first."""

    args: dict[str, Any] = {}
    if on_cpu:

        args.update(cpu_server_args())
    args.update(
        {
            "model_path": hf_dir,
            # On CPU SGLang's own TP=2 needs SGLANG_CPU_OMP_THREADS_BIND (one NUMA node here):
            # a CPU engine is TP 1 whatever the trainer's TP (rollout.sglang.tp_size overrides).
            "tp_size": 1 if on_cpu else tp_size,
            "base_gpu_id": 0 if on_cpu else gpu_id,  # on CPU SGLang binds NUMA node <gpu id> (one here)
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "enable_memory_saver": not on_cpu,  # torch_memory_saver hooks CUDA allocations only
            "random_seed": seed,
        }
    )
    args.update(user_args)
    args.update(engine_ports(slot, user_args))
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


def _in_daemon_thread(fn, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` on a daemon thread: a call stuck in SGLang must not keep the
    process from exiting (a ``ThreadPoolExecutor`` worker is joined at exit)."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="sglang-engine-call").start()
    return future


class _LoopThread:
    """Stands in for ``Engine.loop``: runs SGLang's loop forever on a daemon thread, and
    ``run_until_complete(awaitable)`` (all that ``Engine``'s methods call on it) submits the
    awaitable there and waits for it, from any thread (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        threading.Thread(target=loop.run_forever, daemon=True, name="sglang-engine-loop").start()

    def run_until_complete(self, awaitable):
        async def wait():
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _fresh_event_loop_if_taken() -> None:
    """``sglang.Engine`` takes this thread's asyncio loop. An earlier engine's loop still runs
    on its ``_LoopThread`` (never stopped after a hang), so a new engine gets a new loop."""
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        loop = None
    if loop is None or loop.is_running() or loop.is_closed():
        asyncio.set_event_loop(asyncio.new_event_loop())


class SGLangEngine(RolloutEngine):
    """A colocated ``sglang.Engine`` (module docstring)."""

    spot_checked = True

    def __init__(
        self,
        hf_dir: str,
        *,
        server_args: dict[str, Any],
        eos_token_ids: Sequence[int],
        tp_size: int,
        gpu_id: int,
        seed: int = 0,
        slot: int | None = None,
        timeout_s: float = 600.0,
        routing: RoutingLayout | None = None,
    ):

        on_cpu = sglang_cpu.sglang_runs_on_cpu(server_args)
        if on_cpu:
            sglang_cpu.apply()  # before SGLang is imported: it reads its CPU switch at import
        sglang = import_sglang()
        from sglang.srt.server_args import ServerArgs

        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would report pre-temperature log-probs; unset it")
        check_server_args(server_args, ServerArgs)
        if slot is None:  # replicas' first ranks are at least tp_size local ranks apart: distinct slots
            slot = local_slot(gpu_id, tp_size)
        args = engine_server_args(hf_dir, server_args, tp_size=tp_size, gpu_id=gpu_id, seed=seed, slot=slot, on_cpu=on_cpu)
        check_server_args(args, ServerArgs)
        where = "CPU" if on_cpu else f"GPU {args['base_gpu_id']}"
        self.name = f"sglang engine ({where}, tp_size {args['tp_size']}, port {args['port']})"
        self.server_args = args
        self.eos_token_ids = tuple(eos_token_ids)
        # A mixture-of-experts model's routed experts, when SGLang was asked to keep them.
        self._routing = routing if args.get("enable_return_routed_experts") else None
        self.timeout_s = float(timeout_s)
        self._tp_size = int(args["tp_size"])
        self._device = torch.device("cpu") if on_cpu else torch.device("cuda", int(args["base_gpu_id"]))
        self._released: set[str] = set()
        self._ready = False
        self._stuck: str | None = None
        self._spots: dict[str, tuple[int, ...]] | None = None
        self._died: str | None = None
        self._aborts = 0  # abort_requests / pause("abort") calls so far (parse_samples' aborted)
        _fresh_event_loop_if_taken()
        try:
            with own_rendezvous():  # under torchrun SGLang's TP rendezvous would wait forever (sglang_ports)
                self._engine = sglang.Engine(**args)  # main thread: SGLang installs signal handlers here
        except Exception as e:
            raise RolloutEngineError(f"{self.name}: failed to start: {type(e).__name__}: {e}") from e
        self._engine.loop = _LoopThread(self._engine.loop)
        self._watch_children()

    def _watch_children(self) -> None:
        """SGLang's children send SIGQUIT to this process when they fail (a scheduler that hit
        an error); SGLang's own handler then kills this whole process tree, the trainer with
        it. Ours records the death so the pending call raises ``RolloutEngineError`` instead
        (the child's traceback is in the log). Only the main thread can set handlers."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_child_failure(signum, frame):
            self._died = "an SGLang child process failed (SIGQUIT; its traceback is in the log above)"

        signal.signal(signal.SIGQUIT, on_child_failure)

    def _check_usable(self, what: str) -> None:
        if self._died is not None:
            raise RolloutEngineError(f"{self.name}: refused: {self._died}")
        if self._stuck is not None:
            raise RolloutEngineError(f"{self.name}: refused: an earlier call ({self._stuck}) never returned")
        if self._engine is None:
            raise RolloutEngineError(f"{self.name}: {what} after shutdown")

    def _call(self, what: str, method: Any, *args, **kwargs) -> Any:
        """``Engine.<method>(*args, **kwargs)`` (or ``method(...)`` when callable) on a worker
        thread, bounded by ``timeout_s``; SGLang's failures (exceptions, ``(False, message)``
        answers) become ``RolloutEngineError``. Calls may overlap (``_LoopThread``)."""
        self._check_usable(what)
        fn = getattr(self._engine, method) if isinstance(method, str) else method
        return self._wait(what, _in_daemon_thread(fn, *args, **kwargs))

    def _wait(self, what: str, future: Future) -> Any:
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:  # wake every second to notice a child's death (SIGQUIT) before the timeout
                try:
                    result = future.result(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                    break
                except FutureTimeout as e:
                    if self._died is not None:
                        self._stuck, self._ready = what, False
                        raise RolloutEngineError(f"{self.name}: {what} failed: {self._died}") from e
                    if time.monotonic() >= deadline:
                        self._stuck, self._ready = what, False
                        raise RolloutEngineError(
                            f"{self.name}: {what} did not return within {self.timeout_s:g} s (rollout.server_timeout_s)"
                        ) from e
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
        aborts = self._aborts
        request = generate_request(prompts, params, self.eos_token_ids, routed_experts=self._routing is not None)
        out = self._call("generate", "generate", **request)
        samples = parse_samples(out, len(prompts), params.n, self.name, aborted=self._aborts != aborts, prompts=prompts,
                                routing=self._routing)
        if on_progress is not None:
            on_progress(len(prompts))
        return samples

    # ------------------------------------------------- partial-rollout controls

    def _control(self, what: str, make_coro) -> None:
        """Run a coroutine of SGLang's tokenizer manager on the engine's loop, bounded like any call."""
        self._call(what, lambda: self._engine.loop.run_until_complete(make_coro()))

    def pause_generation(self, mode: PauseMode = "retract") -> None:
        """``RolloutEngine.pause_generation`` through SGLang's tokenizer manager (SGLang's
        ``Engine`` has no such method; its HTTP server calls the same)."""
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation mode must be one of {PAUSE_MODES}; got {mode!r}")
        manager = self._engine.tokenizer_manager
        self._aborts += mode == "abort"
        self._control(f"pause_generation({mode!r})", lambda: manager.pause_generation(PauseGenerationReqInput(mode=mode)))

    def continue_generation(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        manager = self._engine.tokenizer_manager
        self._control("continue_generation", lambda: manager.continue_generation(ContinueGenerationReqInput()))

    def abort_requests(self) -> None:
        manager = self._engine.tokenizer_manager
        self._aborts += 1

        async def abort_all():
            manager.abort_request(abort_all=True)

        self._control("abort_requests", abort_all)

    # ---------------------------------------------------------------- weights

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        from sglang.srt.utils import MultiprocessingSerializer

        if self._device.type == "cuda":  # SGLang's patch rewrites CUDA IPC handles; it breaks CPU tensors
            try:
                from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

                monkey_patch_torch_reductions()
            except ImportError:  # pragma: no cover - older SGLang
                pass
        self._resume(["weights"])
        self._ready = False
        session = hasattr(self._engine, "begin_weight_update")
        if session:
            self._call("begin_weight_update", "begin_weight_update")
        self._spots = None
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            for bucket in buckets:
                named = [(name, t.detach().to(self._device).contiguous()) for name, t in bucket]
                shapes.update((name, tuple(t.shape)) for name, t in named)
                for payload in flattened_bucket_payload(named):
                    serialized = MultiprocessingSerializer.serialize(payload, output_str=True)
                    self._call(
                        "update_weights_from_tensor", "update_weights_from_tensor",
                        named_tensors=[serialized] * self._tp_size,
                        load_format="flattened_bucket",
                        flush_cache=False,
                    )
                del named
        except BaseException:
            if session and self._stuck is None:  # close the session; the weights stay marked incomplete
                try:
                    self._call("end_weight_update", "end_weight_update")
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.exception("%s: end_weight_update after a failed update", self.name)
            raise
        if session:
            self._call("end_weight_update", "end_weight_update")
        self._call("flush_cache", "flush_cache")
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
            return self._call(f"get_weights_by_name({name!r})", "get_weights_by_name", **weights_by_name_request(name))

        return spot_check(read, self._spots, self.name)

    def _resume(self, tags: list[str] | None) -> None:
        todo = sorted(self._released if tags is None else self._released & set(tags))
        if todo:
            self._call("resume_memory_occupation", "resume_memory_occupation", tags=todo)
            self._released -= set(todo)

    def release_memory(self) -> None:
        if not self._released:
            self._call("flush_cache", "flush_cache")
            self._call("release_memory_occupation", "release_memory_occupation")
            self._released = {"weights", "kv_cache", "cuda_graph"}

    def resume_memory(self) -> None:
        self._resume(None)

    def health(self) -> None:
        self._call("get_server_info", "get_server_info")

    def shutdown(self) -> None:
        """Stop SGLang's processes (bounded like every call; a stuck engine's worker thread is
        left behind, its processes are still ended by SGLang's own ``shutdown``)."""
        engine, self._engine = getattr(self, "_engine", None), None
        self._ready = False
        if engine is None:
            return
        if self._stuck is None:
            future = _in_daemon_thread(engine.shutdown)
            try:
                future.result(timeout=self.timeout_s)
            except FutureTimeout as e:
                raise RolloutEngineError(f"{self.name}: shutdown did not return within {self.timeout_s:g} s") from e
        else:
            engine.shutdown()
        engine.loop.stop()
