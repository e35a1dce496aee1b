"""The embedded engine: a ``transformers`` model in the trainer process, CPU or GPU.

Shape legend: B = prompts of a chunk, L = longest prompt, r = rows being decoded
(prompts x samples, finished rows removed), V = vocabulary.

The model is built from the HF config (float32, SDPA attention) with uninitialized
weights; weights arrive only through ``update_weights`` (the trainer's first sync), so the
engine never reads a checkpoint and refuses to generate before a complete sync.

Decoding: prompts are left-padded into one batch with an attention mask and position ids
counted from each prompt's first real token; one prefill per prompt fills a
``DynamicCache``, which is then repeated ``n`` times, and each step feeds the last token
of every unfinished row. Rows that end (EOS / stop id, kept in the response, or
``max_new_tokens``) leave the batch. Token choice and log-probs: ``megappo.rollout.sampling``
(full-vocabulary ``log_softmax(logits / T)`` of the same float32 logits the token is drawn
from; greedy at T = 0 with T = 1 log-probs). Sample j of prompt i (counted over the whole
call) draws from its own generator seeded by ``row_seed(seed, i, j)``, so a call is
deterministic under ``SamplingParams.seed`` whatever ``max_batch_rows`` is.

Mixture-of-experts models: a forward hook on each routed layer's router (transformers 5's
``*TopKRouter``, ``model.layers.N.mlp.gate``, whose output is ``(logits, weights, top-k
indices)``) keeps the experts every token was routed to, prefill and decode alike, and each
``Sample`` carries them (``Sample.routed_experts``: [prompt + response - 1, routed layers,
top-k], what SGLang's routed-experts return holds) for rollout routing replay
(``algo.routing_replay_source: rollout``).

Pause / continue / abort (another thread calls them while ``generate`` runs): decoding
checks before each forward pass; a paused call waits there, holding its KV cache (a weight
update made meanwhile applies to later forward passes; the cached keys and values of earlier
tokens stay those of the old weights: ``retract`` and ``in_place`` behave alike here). An
abort ends every row of every call then in flight with ``finish_reason="abort"`` and the
tokens drawn so far; calls started later are not affected.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch

from megappo.models.spec import ModelSpec
from megappo.rollout.engine import (
    PAUSE_MODES,
    Bucket,
    PauseMode,
    Progress,
    RolloutEngine,
    RolloutEngineError,
    Sample,
    SamplingParams,
    checksum_of,
)
from megappo.rollout.sampling import choose_tokens, row_seed
from megappo.weights.moe import fused_expert_keys, fused_expert_views

if TYPE_CHECKING:
    from megappo.parallel.state import ParallelLayout


def resolve_engine_device(requested: str, layout: Optional["ParallelLayout"]) -> torch.device:
    """``rollout.device``: ``auto`` follows the trainer's device (``parallel.device``)."""
    local_rank = layout.local_rank if layout is not None else 0
    if requested == "auto":
        return layout.device if layout is not None else torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("rollout.device is 'cuda' but no CUDA GPU is visible (set rollout.device=cpu or auto)")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"rollout.device must be one of auto, cpu, cuda; got {requested!r}")


def _build_model(hf_config: Any, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(hf_config, PretrainedConfig):
        config = hf_config
    else:
        cfg = {k: v for k, v in dict(hf_config).items() if k not in ("dtype", "torch_dtype", "transformers_version")}
        if "model_type" not in cfg:
            raise ValueError("the HF config of the embedded engine has no model_type")
        config = AutoConfig.for_model(**cfg)
    try:  # skip the random init: every weight is overwritten by the first sync
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    return model.eval().requires_grad_(False)


class _RoutingTap:
    """Forward hooks on a transformers MoE model's routers (in layer order) that keep the
    top-k expert indices of the last forward pass, one [tokens, k] tensor per routed layer."""

    def __init__(self, model: torch.nn.Module):
        found = [(int(name.split(".layers.")[1].split(".")[0]), m) for name, m in model.named_modules()
                 if type(m).__name__.endswith("TopKRouter") and ".layers." in name]
        self.routers = [m for _, m in sorted(found, key=lambda x: x[0])]
        self._last: list[Optional[torch.Tensor]] = [None] * len(self.routers)
        for i, router in enumerate(self.routers):
            router.register_forward_hook(functools.partial(self._keep, i))

    def _keep(self, i: int, module, args, output) -> None:
        self._last[i] = output[2]

    def take(self) -> torch.Tensor:
        """int32 [tokens, routed layers, k] of the last forward pass (batch-major tokens), on the CPU."""
        assert all(t is not None for t in self._last), "a router did not run"
        out = torch.stack(self._last, dim=1).to(device="cpu", dtype=torch.int32)
        self._last = [None] * len(self.routers)
        return out


class EmbeddedEngine(RolloutEngine):
    """Batched KV-cached generation with a ``transformers`` causal LM (see module docstring).

    ``max_batch_rows`` bounds prompts x samples decoded at once (None: the whole call).
    """

    def __init__(
        self,
        hf_config: Any,
        *,
        device: torch.device | str = "cpu",
        eos_token_ids: Sequence[int] = (),
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        max_batch_rows: Optional[int] = None,
    ):
        self.device = torch.device(device)
        self.name = f"embedded engine ({self.device})"
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch_rows = max_batch_rows
        self.model = _build_model(hf_config, dtype, attn_implementation).to(self.device)
        self.vocab_size = int(self.model.config.vocab_size)
        # transformers renamed the KV-cache argument (``past_key_values`` -> ``cache``, 5.x);
        # pass it by the name this model's forward takes.
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # transformers 5 fuses a routed layer's experts in memory; weight sync streams them
        # per expert under their on-disk names (``_targets``).
        fused = any(n.endswith(".mlp.experts.gate_up_proj") for n, _ in self.model.named_parameters())
        self._moe_spec = ModelSpec.from_hf_config(self.model.config.to_dict()) if fused else None
        buffers = {n for n, _ in self.model.named_buffers()}
        self._expected = frozenset(c for _, c in self._targets().values() if c not in buffers)
        self._tap = _RoutingTap(self.model)
        self._ready = False
        self._offloaded = False
        self._closed = False
        self._control = threading.Condition()
        self._paused = False
        self._aborts = 0  # abort_requests calls so far; a call in flight notes the count it started at

    # ------------------------------------------------- partial-rollout controls

    def pause_generation(self, mode: PauseMode = "retract") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation mode must be one of {PAUSE_MODES}; got {mode!r}")
        with self._control:
            self._paused = True
            if mode == "abort":
                self._aborts += 1
            self._control.notify_all()

    def continue_generation(self) -> None:
        with self._control:
            self._paused = False
            self._control.notify_all()

    def abort_requests(self) -> None:
        with self._control:
            self._aborts += 1
            self._control.notify_all()

    def _may_go_on(self, aborts_at_start: int) -> bool:
        """Wait while paused; False once an abort came after the call started."""
        with self._control:
            self._control.wait_for(lambda: not self._paused or self._aborts != aborts_at_start)
            return self._aborts == aborts_at_start

    # ---------------------------------------------------------------- weights

    def _targets(self) -> dict[str, tuple[torch.Tensor, str]]:
        """Every name the engine takes -> (tensor, the name it counts as when received): each
        state-dict key (a tied head's alias counts as the parameter it aliases) and, for a
        mixture-of-experts model, each expert projection and router of a routed layer under
        its on-disk name, a view into transformers' fused tensors
        (``weights.moe.fused_expert_views``) counted on its own, so that a sync is complete
        only when every expert arrived. The fused in-memory keys are not taken."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        state = self.model.state_dict(keep_vars=True)
        targets = {k: (t, by_id.get(id(t), k)) for k, t in state.items()}
        if self._moe_spec is not None:
            for key in fused_expert_keys(self._moe_spec):
                del targets[key]
            targets.update((n, (v, n)) for n, v in fused_expert_views(state, self._moe_spec).items())
        return targets

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        self._check_open()
        self.resume_memory()
        self._ready = False
        targets = self._targets()
        received: set[str] = set()
        for bucket in buckets:
            for name, tensor in bucket:
                target = targets.get(name)
                if target is None:
                    close = difflib.get_close_matches(name, targets, n=3)
                    raise RolloutEngineError(f"{self.name}: unknown weight {name!r}" + (f"; did you mean {close}?" if close else ""))
                param, canonical = target
                if tuple(param.shape) != tuple(tensor.shape):
                    raise RolloutEngineError(
                        f"{self.name}: weight {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}"
                    )
                try:
                    param.copy_(tensor)
                except Exception as e:
                    raise RolloutEngineError(f"{self.name}: loading {name!r} failed: {type(e).__name__}: {e}") from e
                received.add(canonical)
        missing = sorted(self._expected - received)
        if missing:
            raise RolloutEngineError(
                f"{self.name}: the sync delivered {len(received)} of {len(self._expected)} weights; "
                f"missing {len(missing)}, e.g. {missing[:4]}"
            )
        self._ready = True

    def weights_checksum(self) -> float:
        """Over the model's own parameters as they are now, under the names the trainer sends
        (a tied head once, as the embedding; a mixture-of-experts model's experts one by one)."""
        self._check_open()
        held = {c: t for t, c in self._targets().values() if c in self._expected}
        return checksum_of(held.items())

    # ------------------------------------------------------------- generation

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_progress: Optional[Progress] = None
    ) -> list[list[Sample]]:
        self._check_open()
        self._check_prompts(prompts)
        if not self._ready:
            raise RolloutEngineError(f"{self.name}: no complete weight sync yet (or the last one failed); cannot generate")
        self.resume_memory()
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        per_chunk = max(1, (self.max_batch_rows or len(prompts) * params.n) // params.n)
        results: list[list[Sample]] = []
        with self._control:
            aborts = self._aborts
        try:
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start : start + per_chunk]
                if not self._may_go_on(aborts):
                    results.extend([Sample([], [], "abort") for _ in range(params.n)] for _ in chunk)
                    if on_progress is not None:
                        on_progress(len(chunk))
                    continue
                results.extend(self._generate_chunk(chunk, start, params, seed, on_progress, aborts))
        except RolloutEngineError:
            raise
        except Exception as e:
            raise RolloutEngineError(f"{self.name}: generation failed: {type(e).__name__}: {e}") from e
        return results

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if len(prompts) == 0:
            raise ValueError(f"{self.name}: generate() needs at least one prompt")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"{self.name}: prompt {i} is empty")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{self.name}: prompt {i} has token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")

    @torch.no_grad()
    def _generate_chunk(
        self,
        prompts: Sequence[Sequence[int]],
        first: int,
        params: SamplingParams,
        seed: int,
        on_progress: Optional[Progress],
        aborts: int,
    ) -> list[list[Sample]]:
        from transformers import DynamicCache

        dev, n = self.device, params.n
        B, L = len(prompts), max(len(p) for p in prompts)
        pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        ids_BL = torch.full((B, L), pad, dtype=torch.long)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_BL[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask_BL[i, L - len(p) :] = 1
        ids_BL, mask_BL = ids_BL.to(dev), mask_BL.to(dev)
        pos_BL = (mask_BL.cumsum(-1) - 1).clamp_min(0)

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, use_cache=True, logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        logits_rV = out.logits[:, -1, :]
        prompt_routes = None
        if self._tap.routers:  # [B, L, layers, k] -> each prompt's real positions
            routes_BL = self._tap.take().view(B, L, len(self._tap.routers), -1)
            prompt_routes = [routes_BL[i, L - len(p) :] for i, p in enumerate(prompts)]
        mask_rS, next_pos_r = mask_BL, pos_BL[:, -1] + 1
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits_rV, mask_rS, next_pos_r = (x.repeat_interleave(n, dim=0) for x in (logits_rV, mask_rS, next_pos_r))

        rows = list(range(B * n))  # output row of each batch row
        gens = []
        for r in rows:
            g = torch.Generator(device=dev)
            g.manual_seed(row_seed(seed, first + r // n, r % n))
            gens.append(g)
        stop = set(self.eos_token_ids) | set(params.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in rows]
        routes: list[list[torch.Tensor]] = [[] for _ in rows]  # per row: [layers, k] of each decoded token
        logps: list[list[float]] = [[] for _ in rows]
        reasons: list[str] = ["length"] * len(rows)
        unfinished = [n] * B  # rows of each prompt still decoding
        for step in range(params.max_new_tokens):
            tok_r, lp_r = choose_tokens(logits_rV, params, [gens[r] for r in rows])
            keep, done = [], 0
            for k, (t, lp) in enumerate(zip(tok_r.tolist(), lp_r.tolist())):
                r = rows[k]
                tokens[r].append(t)
                logps[r].append(lp)
                if t in stop:
                    reasons[r] = "stop"
                elif step + 1 < params.max_new_tokens:
                    keep.append(k)
                    continue
                unfinished[r // n] -= 1
                done += unfinished[r // n] == 0
            if done and on_progress is not None:
                on_progress(done)
            if not keep:
                break
            if not self._may_go_on(aborts):
                for k in keep:
                    reasons[rows[k]] = "abort"
                if on_progress is not None:
                    on_progress(sum(1 for u in unfinished if u > 0))
                break
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask_rS, next_pos_r, tok_r = mask_rS[idx], next_pos_r[idx], tok_r[idx]
                rows = [rows[k] for k in keep]
            mask_rS = torch.cat([mask_rS, mask_rS.new_ones(len(rows), 1)], dim=1)
            out = self.model(
                input_ids=tok_r[:, None], attention_mask=mask_rS, position_ids=next_pos_r[:, None],
                use_cache=True, **{self._cache_arg: cache},
            )
            logits_rV = out.logits[:, -1, :]
            if prompt_routes is not None:
                for r, step_routes in zip(rows, self._tap.take()):
                    routes[r].append(step_routes)
            next_pos_r = next_pos_r + 1
        samples = [Sample(tokens[r], logps[r], reasons[r], routed_experts=None if prompt_routes is None else
                          torch.cat([prompt_routes[r // n], *[x[None] for x in routes[r]]])) for r in range(B * n)]
        return [samples[i * n : (i + 1) * n] for i in range(B)]

    # ------------------------------------------------------- memory, lifecycle

    def release_memory(self) -> None:
        """On a GPU, move the weights to host memory during training; no-op on the CPU."""
        if self.device.type != "cpu" and not self._offloaded and not self._closed:
            self.model.to("cpu")
            self._offloaded = True
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if self._offloaded:
            self.model.to(self.device)
            self._offloaded = False

    def health(self) -> None:
        self._check_open()

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._ready = False
            del self.model

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutEngineError(f"{self.name}: the engine was shut down")
