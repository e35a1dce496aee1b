"""The rules of a routed mixture-of-experts MLP block, shared by Qwen3-MoE and Mixtral.

Megatron's MoE layer holds a router (``mlp.router.weight``, [experts, hidden], replicated on
TP ranks) and this expert-parallel rank's experts: ``SequentialMLP`` on the local spec
(``mlp.experts.local_experts.{i}.linear_fc1/fc2.weight``) or TE's grouped GEMM on the
Transformer Engine spec (``mlp.experts.linear_fc1.weight{i}``), ``i`` the local expert
number. Each expert is a SwiGLU MLP whose fc1 is ``[gate; up]`` and fc2 is ``down``, split
over (expert-)tensor-parallel ranks like a dense MLP. HF stores one tensor per expert and
projection on disk (transformers 5 fuses them in memory only); the families differ in the
names alone. The pre-MLP norm of a routed layer is a separate module under both specs (TE
fuses it into fc1 only in dense layers).
"""

from __future__ import annotations

from megappo.weights.base import TensorRule, table_for

L = "model.layers.{layer}."
H, E, F = "hidden", "experts", "moe_ffn"


def moe_rules(block: str, gate: str, up: str, down: str) -> tuple[TensorRule, ...]:
    """Rules of one family: ``block`` the HF MoE module (``mlp``, ``block_sparse_moe``) and the
    names of an expert's gate / up / down projections (``gate_proj`` or Mixtral's ``w1``...)."""
    ex = L + block + ".experts.{expert}."
    return (
        TensorRule("pre_mlp_layernorm.weight", (L + "post_attention_layernorm.weight",), ((H,),), layer_kind="moe"),
        TensorRule("mlp.router.weight", (L + block + ".gate.weight",), ((E, H),), layer_kind="moe"),
        TensorRule(
            "mlp.experts.local_experts.{expert}.linear_fc1.weight",
            (ex + gate + ".weight", ex + up + ".weight"),
            ((F, H), (F, H)),
            fuse="concat",
            tp_dim=0,
            layer_kind="moe",
            te_name="mlp.experts.linear_fc1.weight{expert}",
        ),
        TensorRule(
            "mlp.experts.local_experts.{expert}.linear_fc2.weight",
            (ex + down + ".weight",),
            ((H, F),),
            tp_dim=1,
            layer_kind="moe",
            te_name="mlp.experts.linear_fc2.weight{expert}",
        ),
    )


def shared_expert_rules() -> tuple[TensorRule, ...]:
    """Qwen2-MoE's shared expert (``mlp.shared_expert.*``, a SwiGLU split over TP like a dense
    MLP) and its sigmoid gate (``mlp.shared_expert_gate``, [1, hidden], replicated) as
    Megatron's ``SharedExpertMLP`` holds them."""
    S = "shared_ffn"
    return (
        TensorRule(
            "mlp.shared_experts.linear_fc1.weight",
            (L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"),
            ((S, H), (S, H)),
            fuse="concat",
            tp_dim=0,
            layer_kind="moe",
        ),
        TensorRule("mlp.shared_experts.linear_fc2.weight", (L + "mlp.shared_expert.down_proj.weight",), ((H, S),), tp_dim=1, layer_kind="moe"),
        TensorRule("mlp.shared_experts.gate_weight", (L + "mlp.shared_expert_gate.weight",), (("labels", H),), layer_kind="moe"),
    )


def fused_expert_keys(spec) -> list[str]:
    """The in-memory keys of transformers 5's routed layers that ``fused_expert_views``
    replaces: each routed layer's fused experts (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``) and its router (``mlp.gate.weight``, the on-disk name for
    Qwen3-MoE and Qwen2-MoE, ``block_sparse_moe.gate.weight`` on disk for Mixtral)."""
    keys = []
    for layer in spec.moe_layers:
        prefix = f"model.layers.{layer}.mlp."
        keys += [prefix + "experts.gate_up_proj", prefix + "experts.down_proj", prefix + "gate.weight"]
    return keys


def fused_expert_views(state: dict, spec) -> dict:
    """The on-disk per-expert HF names of ``spec``'s routed layers, each a view into
    transformers 5's fused in-memory expert tensors (``mlp.experts.gate_up_proj`` [E, 2F, H],
    gate rows first; ``mlp.experts.down_proj`` [E, H, F]) or its router (``mlp.gate.weight``);
    ``fused_expert_keys`` lists the in-memory keys they stand for.

    For an engine that holds a transformers model (the embedded engine): these names in
    place of those keys let it take the per-expert tensors weight sync streams (the names
    SGLang and the checkpoints use) with an in-place copy into the views. The names come
    from the family's rules, the one place they are spelled."""
    rules = {r.megatron: r for r in table_for(spec).rules if r.layer_kind == "moe"}
    fc1 = rules["mlp.experts.local_experts.{expert}.linear_fc1.weight"]
    fc2 = rules["mlp.experts.local_experts.{expert}.linear_fc2.weight"]
    router = rules["mlp.router.weight"]
    keys = iter(fused_expert_keys(spec))
    out = {}
    for layer in spec.moe_layers:
        gate_up, down, gate_weight = (state[k] for k in (next(keys), next(keys), next(keys)))
        half = gate_up.shape[1] // 2
        for e in range(spec.num_experts):
            gate, up = (n.format(layer=layer, expert=e) for n in fc1.hf)
            out[gate], out[up] = gate_up[e, :half], gate_up[e, half:]
            out[fc2.hf[0].format(layer=layer, expert=e)] = down[e]
        out[router.hf[0].format(layer=layer)] = gate_weight
    return out
