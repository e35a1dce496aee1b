"""The engine shared by every model family: a declarative table of which HF tensors make up
which Megatron tensor, and the pure functions that apply it to one rank's shard.

A family (``llama.py``, ``qwen2.py``, ...) is a ``FamilyTable``: a list of ``TensorRule``.
Each rule names one Megatron tensor, the HF tensors it is made of, how they are fused
(``identity``, ``qkv``, ``concat``) and along which dimension every HF input is split over
tensor-parallel ranks. Everything else (TP shards, vocabulary padding, pipeline stages,
virtual chunks, tied embeddings, the critic, the reward model, local vs Transformer Engine
names) is handled here once, so a new family is a new table. A mixture-of-experts family
adds rules whose names carry an ``{expert}`` field (``moe.py``): ``plan`` expands them over
this expert-parallel rank's experts (local index in the Megatron name, global index in the
HF names) and applies a rule only to the layers of its kind (``layer_kind``: the routed
layers of ``ModelSpec.moe_layers`` or the dense ones); dense families see every layer dense.

Why fusing and sharding commute: every HF input of a fused tensor is split into contiguous
chunks along ``tp_dim``, and rank r's Megatron shard is ``fuse(chunk_r(inputs))``:
- QKV: Megatron's ``linear_qkv`` rows are grouped per KV head (query group g: its q heads,
  then its k head, then its v head). Query groups ``[r*G/tp, (r+1)*G/tp)`` live on rank r,
  and their q, k and v rows are contiguous chunks of ``q_proj``, ``k_proj``, ``v_proj``.
- SwiGLU fc1: rank r holds ``[gate_r; up_r]``, so the full fc1 is not a contiguous split
  of ``[gate; up]``, but fusing the chunks is.
Exporting does the inverse per shard (split each shard, concatenate the pieces of every HF
tensor along ``tp_dim``), so one rule serves load, export and weight sync.

Vocabulary rows are padded to a multiple of TP (``ModelSpec.padded_vocab_size``): padded
rows are zero on load and dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from megappo.models.spec import ModelSpec

Fuse = Literal["identity", "qkv", "concat"]
Condition = Literal["qkv_bias", "qk_norm", "untied_head", "tied_head_copy", "score_head"]
HEADLESS_ROLES = ("critic", "reward")
"""Roles whose last layer is not the LM head: the critic's value head (not from HF) and the
reward model's ``score`` head (``*ForSequenceClassification``). Neither ties embeddings."""
Stage = Literal["first", "last", "layer"]
LayerKind = Literal["any", "dense", "moe"]


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor and the HF tensors it is made of.

    ``megatron``: the name under the model (``stage`` first / last) or under
    ``decoder.layers.N.`` (``stage`` layer). ``hf``: HF names; ``{layer}`` is the global
    layer number. ``tp_dim``: the dimension every HF input is split along over TP ranks
    (None: replicated). ``vocab``: rows are the vocabulary (padded to a multiple of TP).
    ``when``: present only under this condition. ``te_name``: the name under the
    Transformer Engine layer spec when it differs (norms fused into the next linear).
    ``export``: False for a copy that another rule already exports (the tied head).
    ``shapes``: each HF input's shape in symbols of the spec (``vocab``, ``hidden``, ``ffn``,
    ``q`` = heads x head_dim, ``kv`` = KV heads x head_dim, ``head_dim``, ``labels`` = 1,
    the one output of a reward model's ``score`` head, ``experts``, ``moe_ffn`` = one
    expert's intermediate size). ``layer_kind``: only in dense or only in routed layers.
    """

    megatron: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    stage: Stage = "layer"
    fuse: Fuse = "identity"
    tp_dim: int | None = None
    vocab: bool = False
    when: Condition | None = None
    te_name: str | None = None
    export: bool = True
    layer_kind: LayerKind = "any"


@dataclass(frozen=True)
class FamilyTable:
    """How one HF model family maps onto Megatron's GPTModel."""

    family: str
    architectures: tuple[str, ...]
    rules: tuple[TensorRule, ...]
    reward_architectures: tuple[str, ...] = ()
    """The ``*ForSequenceClassification`` class of the family (role ``reward``)."""
    ignored_hf: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    """Regexes of HF tensors that carry no weights (older checkpoints store RoPE buffers)."""
    config_problems: Callable[[dict], list[str]] = field(default=lambda cfg: [])
    """Settings the HF config may have that this mapping cannot represent, as messages."""


@dataclass(frozen=True)
class Placement:
    """Which part of the model one rank's module holds: TP rank, layers, first / last stage."""

    tp: int = 1
    tp_rank: int = 0
    first_layer: int = 0
    num_layers: int | None = None
    pre_process: bool = True
    post_process: bool = True
    ep: int = 1
    ep_rank: int = 0

    def local_experts(self, spec: ModelSpec) -> range:
        """Global numbers of the experts this expert-parallel rank holds (contiguous, as Megatron)."""
        n = spec.num_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    def layers(self, spec: ModelSpec) -> range:
        n = spec.num_layers - self.first_layer if self.num_layers is None else self.num_layers
        return range(self.first_layer, self.first_layer + n)

    @classmethod
    def of_stage(
        cls,
        spec: ModelSpec,
        *,
        tp: int = 1,
        tp_rank: int = 0,
        pp: int = 1,
        pp_rank: int = 0,
        vpp: int | None = None,
        vp_stage: int | None = None,
        ep: int = 1,
        ep_rank: int = 0,
    ) -> "Placement":
        """Megatron's even split: chunk c of stage p holds layers ``[(c*pp + p) * n, ...)``
        with ``n = L / (pp * vpp)``."""
        spec.check_parallel(tp, pp, vpp, ep)
        chunks, chunk = vpp or 1, vp_stage or 0
        n = spec.num_layers // (pp * chunks)
        return cls(
            tp=tp,
            tp_rank=tp_rank,
            first_layer=(chunk * pp + pp_rank) * n,
            num_layers=n,
            pre_process=pp_rank == 0 and chunk == 0,
            post_process=pp_rank == pp - 1 and chunk == chunks - 1,
            ep=ep,
            ep_rank=ep_rank,
        )


@dataclass(frozen=True)
class Entry:
    """A rule resolved for one module: its local Megatron name and concrete HF names."""

    megatron: str
    hf: tuple[str, ...]
    rule: TensorRule
    layer: int | None
    expert: int | None = None
    """The global expert number of a per-expert tensor."""


def _holds(rule: TensorRule, spec: ModelSpec, role: str, placement: Placement) -> bool:
    if rule.stage == "first" and not placement.pre_process:
        return False
    if rule.stage == "last" and not placement.post_process:
        return False
    if rule.when == "qkv_bias":
        return spec.qkv_bias
    if rule.when == "qk_norm":
        return spec.qk_norm
    # The critic's value head (not from HF) and the reward model's score head replace the
    # LM head, and neither ties embeddings.
    tied = spec.tie_word_embeddings and role not in HEADLESS_ROLES
    if rule.when == "score_head":
        return role == "reward"
    if rule.when == "untied_head":
        return role not in HEADLESS_ROLES and not spec.tie_word_embeddings
    if rule.when == "tied_head_copy":
        # A tied head is the embedding itself on a stage that holds both; a last stage
        # without the embedding keeps its own copy (Megatron syncs it by all-reduce).
        return tied and not placement.pre_process
    return True


def plan(
    table: FamilyTable,
    spec: ModelSpec,
    placement: Placement,
    *,
    role: str = "actor",
    transformer_impl: str = "local",
) -> list[Entry]:
    """Every Megatron tensor of this module that comes from HF, in a fixed order (the same
    on every TP rank: export gathers in this order)."""
    te = transformer_impl == "transformer_engine"
    rules = [r for r in table.rules if _holds(r, spec, role, placement)]
    out = [Entry(_name(r, te), r.hf, r, None) for r in rules if r.stage == "first"]
    moe_layers = set(spec.moe_layers)
    for local, layer in enumerate(placement.layers(spec)):
        kind = "moe" if layer in moe_layers else "dense"
        for r in (r for r in rules if r.stage == "layer" and r.layer_kind in ("any", kind)):
            name = f"decoder.layers.{local}.{_name(r, te)}"
            if "{expert}" not in name:
                out.append(Entry(name, tuple(n.format(layer=layer) for n in r.hf), r, layer))
                continue
            for i, e in enumerate(placement.local_experts(spec)):
                hf = tuple(n.format(layer=layer, expert=e) for n in r.hf)
                out.append(Entry(name.format(expert=i), hf, r, layer, e))
    out += [Entry(_name(r, te), r.hf, r, None) for r in rules if r.stage == "last"]
    return out


def with_expert(entry: Entry, expert: int) -> Entry:
    """``entry`` (a per-expert tensor) for global expert ``expert`` (another EP rank's)."""
    assert entry.expert is not None, entry.megatron
    hf = tuple(n.format(layer=entry.layer, expert=expert) for n in entry.rule.hf)
    return Entry(entry.megatron, hf, entry.rule, entry.layer, expert)


def _name(rule: TensorRule, te: bool) -> str:
    return rule.te_name if te and rule.te_name else rule.megatron


def hf_shapes(rule: TensorRule, spec: ModelSpec) -> list[tuple[int, ...]]:
    """The shapes of a rule's HF inputs for ``spec``."""
    sizes = {
        "vocab": spec.vocab_size,
        "hidden": spec.hidden_size,
        "ffn": spec.ffn_hidden_size,
        "q": spec.num_attention_heads * spec.head_dim,
        "kv": spec.num_kv_heads * spec.head_dim,
        "head_dim": spec.head_dim,
        "labels": 1,
        "experts": spec.num_experts,
        "moe_ffn": spec.moe_ffn_hidden_size,
        "shared_ffn": spec.moe_shared_expert_ffn,
    }
    return [tuple(sizes[d] for d in shape) for shape in rule.shapes]


# ---- fusing ---------------------------------------------------------------------------


def fuse(rule: TensorRule, spec: ModelSpec, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Megatron tensor (or TP shard) made of the given HF tensors (or their TP chunks)."""
    if rule.fuse == "identity":
        return parts[0]
    if rule.fuse == "concat":
        return torch.cat(list(parts), dim=rule.tp_dim or 0)
    q, k, v = parts
    d, per_group = spec.head_dim, spec.num_attention_heads // spec.num_kv_heads
    groups = k.shape[0] // d
    rest = tuple(q.shape[1:])
    return torch.cat(
        [q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1
    ).reshape(groups * (per_group + 2) * d, *rest)


def split(rule: TensorRule, spec: ModelSpec, fused: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of ``fuse`` on one shard."""
    if rule.fuse == "identity":
        return [fused]
    if rule.fuse == "concat":
        return list(fused.chunk(len(rule.hf), dim=rule.tp_dim or 0))
    d, per_group = spec.head_dim, spec.num_attention_heads // spec.num_kv_heads
    rest = tuple(fused.shape[1:])
    groups = fused.shape[0] // ((per_group + 2) * d)
    grouped = fused.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


# ---- one rank's shard <-> HF tensors ---------------------------------------------------

Reader = Callable[[str, int | None, int, int], torch.Tensor]
"""``read(hf_name, dim, start, stop)``: rows ``[start, stop)`` of the HF tensor along
``dim`` (the whole tensor when ``dim`` is None)."""


def shard_from_hf(entry: Entry, spec: ModelSpec, placement: Placement, read: Reader) -> torch.Tensor:
    """This rank's shard of ``entry``'s Megatron tensor, reading only its chunk of each HF input."""
    rule, tp, r = entry.rule, placement.tp, placement.tp_rank
    parts = []
    for name, shape in zip(entry.hf, hf_shapes(rule, spec)):
        if rule.tp_dim is None:
            parts.append(read(name, None, 0, 0))
            continue
        if rule.vocab:
            rows = spec.padded_vocab_size(tp) // tp
            start, stop = r * rows, (r + 1) * rows
            real = read(name, 0, start, min(stop, spec.vocab_size)) if start < spec.vocab_size else None
            pad = stop - max(start, spec.vocab_size)
            if pad > 0:
                zeros = torch.zeros(pad, spec.hidden_size, dtype=real.dtype if real is not None else torch.float32)
                real = zeros if real is None else torch.cat([real, zeros])
            parts.append(real)
            continue
        total = shape[rule.tp_dim]
        if total % tp:
            raise ValueError(f"{name}: dimension {rule.tp_dim} of size {total} does not split over TP={tp}")
        chunk = total // tp
        parts.append(read(name, rule.tp_dim, r * chunk, (r + 1) * chunk))
    return fuse(rule, spec, parts)


def hf_from_shards(entry: Entry, spec: ModelSpec, shards: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The full HF tensors of ``entry`` from its TP shards (in TP-rank order)."""
    rule = entry.rule
    pieces = [split(rule, spec, s) for s in shards]
    out = []
    for i, name in enumerate(entry.hf):
        if rule.tp_dim is None or len(shards) == 1:
            full = pieces[0][i]
        else:
            full = torch.cat([p[i] for p in pieces], dim=rule.tp_dim)
        if rule.vocab:
            full = full[: spec.vocab_size]
        out.append((name, full))
    return out


# ---- pure functions on state dicts -----------------------------------------------------


def dict_reader(hf_state: dict[str, torch.Tensor]) -> Reader:
    def read(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        if name not in hf_state:
            raise KeyError(f"HF state has no tensor {name!r}")
        t = hf_state[name]
        return t if dim is None else t.narrow(dim, start, stop - start)

    return read


def hf_to_megatron_state(
    hf_state: dict[str, torch.Tensor],
    spec: ModelSpec,
    placement: Placement | None = None,
    *,
    role: str = "actor",
    transformer_impl: str = "local",
    table: FamilyTable | None = None,
) -> dict[str, torch.Tensor]:
    """One rank's Megatron state (local layer numbers, its TP shard) from a full HF state
    dict. The default placement is the whole model at TP=1 (global layer numbers)."""
    table = table or table_for(spec)
    placement = placement or Placement()
    read = dict_reader(hf_state)
    return {
        e.megatron: shard_from_hf(e, spec, placement, read).clone()
        for e in plan(table, spec, placement, role=role, transformer_impl=transformer_impl)
    }


def megatron_to_hf_state(
    tp_states: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    spec: ModelSpec,
    placement: Placement | None = None,
    *,
    role: str = "actor",
    transformer_impl: str = "local",
    table: FamilyTable | None = None,
) -> dict[str, torch.Tensor]:
    """The HF tensors (global layer numbers, vocabulary unpadded) of one pipeline chunk from
    its Megatron states, one per TP rank in rank order (a single dict at TP=1).
    ``placement.tp_rank`` is ignored."""
    table = table or table_for(spec)
    states = [tp_states] if isinstance(tp_states, dict) else list(tp_states)
    placement = placement or Placement(tp=len(states))
    if placement.tp != len(states):
        raise ValueError(f"placement says TP={placement.tp} but {len(states)} TP states were given")
    out = {}
    for e in plan(table, spec, placement, role=role, transformer_impl=transformer_impl):
        if e.rule.export:
            out.update(hf_from_shards(e, spec, [s[e.megatron] for s in states]))
    return out


# ---- the family registry ---------------------------------------------------------------


def table_for(spec_or_family: ModelSpec | str) -> FamilyTable:
    """The mapping table of a family (``spec.family``)."""
    from megappo.weights import llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe  # deferred: the family tables import this module

    family = spec_or_family if isinstance(spec_or_family, str) else spec_or_family.family
    tables = {t.family: t for t in (llama.TABLE, qwen2.TABLE, qwen3.TABLE, mistral.TABLE, qwen3_moe.TABLE, mixtral.TABLE, qwen2_moe.TABLE)}
    if family not in tables:
        raise ValueError(f"no weight mapping for model family {family!r} (supported: {', '.join(tables)})")
    return tables[family]
