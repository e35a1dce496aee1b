"""The one rollout-engine interface, its value types, the weights checksum and the factory.

Every engine (``embedded``, ``sglang``, ``sglang_server``; see DESIGN.md's process model)
implements ``RolloutEngine``; the trainer never asks which one it has.

Log-probs (docs/CONTRACTS.md): ``Sample.logprobs[t]`` is ``log_softmax(logits / T)`` of the
sampled token over the full vocabulary, T the sampling temperature; top-p and top-k only
change which token is drawn, never the reported number. With ``temperature == 0`` the
engine decodes greedily and reports the T = 1 log-probs (SGLang does the same).

Weights arrive as an iterator of buckets, each a list of ``(hf_name, full_tensor)``; a call
to ``update_weights`` must deliver every weight of the model (a full sync). An engine whose
sync failed half-way refuses to generate until a later sync completes.

``checksum_of`` / ``RolloutEngine.weights_checksum``: a cheap fingerprint of HF-named full
tensors, computable on the trainer side from the same ``(name, tensor)`` pairs. An engine
computes it from the weights it holds, read back after loading, never from what it was
sent: the embedded engine over every weight; the SGLang engines, whose parameters are
fused and sharded, over a spot-check (``spot_checked``): the first ``SPOT_ROWS`` rows of
the few tensors ``checksum_scope()`` names, read back with SGLang's
``get_weights_by_name``. ``sync_weights(..., checksum=True)`` computes the trainer side
over the same scope, so ``SyncStats.checksum`` and ``weights_checksum()`` always compare.
Each tensor contributes ``f(name) * sum_c (c + 1) * <x_c, v>``, where ``x_c`` is the c-th chunk of
``2**20`` elements of the tensor in float64, ``v`` a fixed pseudo-random vector in
[0.5, 1.5) and ``f(name) = 1 + crc32(name) / 2**32``; the per-tensor terms are summed in
name order. It changes when an element moves within a tensor, when two tensors swap names,
and when a value changes; it does not depend on the dtype of a lossless upcast (bf16
weights held as fp32 give the same number) nor on the order the tensors arrive in. Two
computations of equal weights agree to about 1e-12 relative (float64 reductions may round
differently with different thread counts); compare with ``checksums_match``.
"""

from __future__ import annotations

import abc
import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Optional, Sequence

import torch

if TYPE_CHECKING:
    from megappo.config.schema import RolloutConfig
    from megappo.parallel.state import ParallelLayout

FinishReason = Literal["stop", "length", "abort"]
"""``abort``: ended by ``abort_requests`` (or a pause in ``abort`` mode) with the tokens
generated so far and their log-probs."""
PauseMode = Literal["retract", "abort", "in_place"]
PAUSE_MODES: tuple[str, ...] = ("retract", "abort", "in_place")
Bucket = Sequence[tuple[str, torch.Tensor]]
Progress = Callable[[int], object]
"""``on_progress(k)``: ``k`` more prompts have all their samples."""


class RolloutEngineError(RuntimeError):
    """A rollout engine failed (generation, weight update, health, timeout). The message
    starts with the engine's name (and the server URL for ``sglang_server``)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``n`` responses per prompt, at most ``max_new_tokens`` each."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response besides the engine's EOS ids (the token is kept)."""
    seed: Optional[int] = None
    """Seed of this call's sampling (the embedded engine is deterministic under it);
    None draws one from torch's global generator."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(
        cls, rollout: "RolloutConfig", *, eos_token_ids: Sequence[int] = (), seed: Optional[int] = None, evaluation: bool = False
    ) -> "SamplingParams":
        """The one builder of sampling parameters. Training: ``rollout``'s group size,
        temperature, top-p/k, response length and stop ids. ``evaluation``: one response at
        ``eval_temperature`` with top-p and top-k off (they shape exploration, not the
        policy being measured). Stop ids: ``rollout.stop_token_ids`` and ``eos_token_ids``
        (the tokenizer's EOS), so every engine stops on them whatever its own EOS list."""
        return cls(
            n=1 if evaluation else rollout.num_return_sequences_in_group,
            temperature=rollout.eval_temperature if evaluation else rollout.temperature,
            top_p=1.0 if evaluation else rollout.top_p,
            top_k=-1 if evaluation else rollout.top_k,
            max_new_tokens=rollout.response_length,
            stop_token_ids=tuple(sorted(set(rollout.stop_token_ids) | {int(t) for t in eos_token_ids if t is not None})),
            seed=seed,
        )


@dataclass(frozen=True)
class Sample:
    """One response: its tokens (a final stop token included), the log-prob of each under
    the temperature-scaled distribution, and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    token_versions: list[int] = field(default_factory=list)
    """The policy version each token was sampled under, for a response that a weight
    update interrupted and the new weights continued (``megappo.rollout.partial``); empty:
    every token is of the version of the call that returned it (engines leave it empty)."""
    routed_experts: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    """Mixture-of-experts models: int32 [prompt + response - 1, routed layers, top-k], the
    experts the engine routed each token it ran through the model to, prompt first, at each
    routed layer in layer order (the last response token is never run). SGLang's
    routed-experts return has this row count. None: the engine did not report them."""

    def __post_init__(self):
        assert len(self.token_ids) == len(self.logprobs), (len(self.token_ids), len(self.logprobs))
        assert self.finish_reason in ("stop", "length", "abort"), self.finish_reason
        assert not self.token_versions or len(self.token_versions) == len(self.token_ids), (
            len(self.token_versions), len(self.token_ids))


class RolloutEngine(abc.ABC):
    """Generation with per-token log-probs, weight updates, memory release, health."""

    name: str = "rollout engine"
    """Human-readable identity used in every error message (engine kind, device or URL)."""

    receives_weights: bool = True
    """False on an engine that shares its weights with another rank's engine (SGLang
    servers: only the first data-parallel replica sends); weight sync skips it."""

    spot_checked: bool = False
    """True when ``weights_checksum`` covers only the first ``SPOT_ROWS`` rows of the
    tensors ``checksum_scope()`` names (a spot-check); False: every weight in full."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_progress: Optional[Progress] = None
    ) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token ids), in prompt order.
        ``on_progress``: told as prompts finish (as finely as the engine can tell cheaply;
        at the latest when the call returns)."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Load every weight of the model from buckets of ``(hf_name, full_tensor)``."""

    # Partial rollouts (asynchronous RL builds on these). They may be called from another
    # thread while ``generate`` runs; ``generate`` calls made while paused wait for
    # ``continue_generation`` (or return aborted at once after ``abort_requests``).

    def pause_generation(self, mode: PauseMode = "retract") -> None:
        """Stop decoding at the next token boundary until ``continue_generation``.
        ``retract``: in-flight requests keep their tokens and go on after continue (SGLang
        recomputes their KV cache, so a weight update made while paused applies to every
        later token; the embedded engine keeps its cache, see its docstring); ``in_place``:
        they keep their KV cache as it is; ``abort``: they end now (``abort_requests``) and
        the engine stays paused."""
        raise RolloutEngineError(f"{self.name}: pause_generation is not supported")

    def continue_generation(self) -> None:
        """Resume decoding after ``pause_generation`` (a no-op when not paused)."""
        raise RolloutEngineError(f"{self.name}: continue_generation is not supported")

    def abort_requests(self) -> None:
        """End every request in flight now: each of their samples comes back from
        ``generate`` with ``finish_reason == "abort"``, the tokens generated so far and their
        log-probs (possibly none). Requests sent later run normally."""
        raise RolloutEngineError(f"{self.name}: abort_requests is not supported")

    def release_memory(self) -> None:
        """Free the engine's accelerator memory for training (no-op where not shared)."""

    def resume_memory(self) -> None:
        """Take the memory back before generating (no-op where not shared)."""

    def health(self) -> None:
        """Raise ``RolloutEngineError`` naming the engine when it cannot serve."""

    def shutdown(self) -> None:
        """Stop the engine and free what it holds; idempotent."""

    @abc.abstractmethod
    def weights_checksum(self) -> float:
        """``checksum_of`` the weights the engine holds, read back from the engine (see the
        module docstring); a spot-check when ``spot_checked``."""

    def checksum_scope(self) -> Optional[tuple[str, ...]]:
        """The HF names ``weights_checksum`` covers when ``spot_checked`` (chosen at the
        last sync); None when it covers every weight."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# ---- checksum ---------------------------------------------------------------------------

_CHUNK = 1 << 20
_VECTORS: dict[torch.device, torch.Tensor] = {}


def _weights_vector(device: torch.device) -> torch.Tensor:
    v = _VECTORS.get(device)
    if v is None:
        g = torch.Generator().manual_seed(0x5EED)
        v = (torch.rand(_CHUNK, generator=g, dtype=torch.float64) + 0.5).to(device)
        _VECTORS[device] = v
    return v


def tensor_checksum(name: str, tensor: torch.Tensor) -> float:
    """One tensor's term of ``checksum_of``."""
    flat = tensor.detach().reshape(-1)
    v = _weights_vector(flat.device)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for c, start in enumerate(range(0, flat.numel(), _CHUNK)):
        x = flat[start : start + _CHUNK].to(torch.float64)
        total += (c + 1) * torch.dot(x, v[: x.numel()])
    return float(total) * (1.0 + zlib.crc32(name.encode()) / 2**32)


SPOT_ROWS = 4
"""Rows (first-dimension slices; elements of a 1-D tensor) of each spot-checked tensor."""


def spot_checksum(name: str, tensor: torch.Tensor) -> float:
    """A spot-checked tensor's term: ``tensor_checksum`` of its first ``SPOT_ROWS`` rows."""
    return tensor_checksum(name, tensor[:SPOT_ROWS])


def combine_checksums(terms: dict[str, float]) -> float:
    """Sum of per-tensor terms in name order (so arrival order does not matter)."""
    return math.fsum(terms[k] for k in sorted(terms))


def checksum_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
    """The weights checksum of ``(hf_name, full_tensor)`` pairs (module docstring)."""
    terms: dict[str, float] = {}
    for name, tensor in named_tensors:
        if name in terms:
            raise ValueError(f"checksum_of: tensor {name!r} appears twice")
        terms[name] = tensor_checksum(name, tensor)
    return combine_checksums(terms)


def checksums_match(a: float, b: float, *, rtol: float = 1e-9) -> bool:
    """Whether two checksums of the same weights agree (float64 reduction rounding only)."""
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)


# ---- factory ----------------------------------------------------------------------------


def build_engine(
    rollout: "RolloutConfig",
    *,
    hf_config: dict,
    hf_dir: Optional[str],
    layout: Optional["ParallelLayout"],
    eos_token_ids: Sequence[int],
    seed: int = 0,
) -> Optional[RolloutEngine]:
    """The engine ``rollout.engine`` names, on the rank that holds it; None elsewhere.

    One engine per model-parallel group (each data-parallel replica), held by its rank with
    tp_rank == 0 and pp_rank == 0 (``megappo.rollout.group.holds_engine``); ``layout`` None
    means a single process that holds it. The embedded engine starts with no weights: the
    first ``sync_weights`` loads them, it never reads ``hf_dir``. SGLang needs ``hf_dir``
    for the architecture and tokenizer files (weights still come from the sync).
    """
    from megappo.rollout.group import holds_engine  # deferred: group.py imports this interface module

    if layout is not None and not holds_engine(layout):
        return None
    eos = tuple(int(t) for t in eos_token_ids)
    if rollout.engine == "embedded":
        from megappo.rollout.embedded import EmbeddedEngine, resolve_engine_device  # deferred: implements this interface

        _warn_ignored(rollout, ("sglang", "server_urls"))
        device = resolve_engine_device(rollout.device, layout)
        return EmbeddedEngine(hf_config, device=device, eos_token_ids=eos)
    if rollout.engine == "sglang":
        from megappo.rollout.sglang_engine import SGLangEngine  # deferred: SGLang, only when asked for
        from megappo.rollout.sglang_protocol import routing_layout  # deferred: implements this interface

        _warn_ignored(rollout, ("server_urls",))
        if hf_dir is None:
            raise ValueError("rollout.engine=sglang needs the HF model directory (model.hf_path) for SGLang's config and tokenizer")
        return SGLangEngine(
            hf_dir,
            server_args=dict(rollout.sglang),
            eos_token_ids=eos,
            tp_size=layout.tp if layout is not None else 1,
            gpu_id=layout.local_rank if layout is not None else 0,
            seed=seed,
            timeout_s=rollout.server_timeout_s,
            routing=routing_layout(hf_config),
        )
    if rollout.engine == "sglang_server":
        from megappo.rollout.sglang_protocol import routing_layout  # deferred: implements this interface
        from megappo.rollout.sglang_server import SGLangServerEngine  # deferred: SGLang's protocol, only when asked for

        _warn_ignored(rollout, ("sglang",))
        if not rollout.server_urls:
            raise ValueError("rollout.engine=sglang_server needs rollout.server_urls (the base URLs of the SGLang servers)")
        return SGLangServerEngine(
            list(rollout.server_urls),
            timeout_s=rollout.server_timeout_s,
            eos_token_ids=eos,
            owns_weight_updates=layout is None or layout.dp_rank == 0,
            routing=routing_layout(hf_config),
        )
    raise ValueError(f"rollout.engine must be one of embedded, sglang, sglang_server; got {rollout.engine!r}")


def _warn_ignored(rollout: "RolloutConfig", fields: tuple[str, ...]) -> None:
    import logging

    for f in fields:
        if getattr(rollout, f):
            logging.getLogger("megappo").warning("rollout.%s is ignored by rollout.engine=%s", f, rollout.engine)
