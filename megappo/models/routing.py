"""Routing replay for mixture-of-experts policies (``algo.routing_replay``) and router metrics.

Why: the PPO ratio pi_theta / pi_old compares two forward passes. In an MoE model a token
near a routing tie can take different experts in the two passes (different micro-batch
shapes change float rounding; later, the update itself moves the router), so the ratio's
numerator and denominator come from different sub-networks and the first step's ratio is
not 1. Replay (as in slime / verl's "R2", and Megatron's ``RouterReplay``) records each
token's top-k experts in the actor's forward-only pass (the old log-probs) and makes the
update's forward passes use those experts, with the router's current scores at them (the
router still learns through its probabilities).

How: every ``TopKRouter`` of the policy gets a ``_LayerRouting`` as its ``router_replay``
(megatron-core 0.16's hook inside ``topk_routing_with_score_function``: it is asked for the
top-k). Recorded experts are kept per sequence, keyed by the sequence's tokens, so the
trainer may regroup rows into any mini- and micro-batches between the passes. The store is
replaced by every recording pass. A row's padding is recorded too and replayed where the
row comes back with padding as long (rows regrouped with other padding route it to experts
0..k-1, which changes nothing of the real tokens but the float rounding of the experts'
GEMMs, ~1e-6). Right-padded micro-batches only (``packed_sequences``
concatenates rows, which this keying does not follow). A row without a recording routes
freely and is counted in ``moe/replay_missing_rows``.

Rollout routing replay (``source="rollout"``; slime / verl's "R3", Ma et al. 2025, "Stabilizing
MoE RL by aligning training and inference routers", arXiv 2510.11370): the rollout engine
reports the experts it routed every token to (``Sample.routed_experts``, carried by
``TokenBatch.routed_experts_BSLK``) and both training passes, the old log-probs and the
update, replay those, so the trainer's log-probs come from the sub-network that sampled the
tokens. Each router finds its column of the batch by its global layer number
(``TopKRouter.layer_number``, 1-based, PP stages included) among the routed HF layers
(``moe_layers``); expert ids are global, so under EP each rank's router replays them before
the dispatcher sends tokens to the experts' ranks. Positions the engine did not report (a
row's last token, padding) route freely. A micro-batch without rollout routing falls back
to the recording above.

Without replay (``RoutingReplay(replay=False)``) the routers are only observed. Metrics of the
training passes (means over routed layers and micro-batches, padding tokens included):
``moe/routing_changed_frac`` (tokens whose free top-k differs from the replayed one; with the
rollout source, from the engine's, counted over the positions it reported),
``moe/rollout_routing_changed_frac`` (whenever the batch carries the engine's routing: tokens
whose free top-k in the trainer differs from the engine's, replayed or not),
``moe/router_entropy`` (nats, of the softmax over all experts), ``moe/expert_load_max_over_mean``
(tokens per expert, max / mean, per layer).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


class _LayerRouting:
    """One router's replay state (the ``router_replay`` protocol of megatron-core 0.16)."""

    def __init__(self, pre_softmax: bool, stats: dict, moe_index: int):
        self.pre_softmax = pre_softmax
        self.moe_index = moe_index
        """This router's column of ``routed_experts_BSLK`` (its rank among the routed HF layers)."""
        self.mode: Optional[str] = None
        self.recorded: Optional[Tensor] = None
        self.target: Optional[Tensor] = None
        """[tokens, k] experts to replay; -1 rows route freely."""
        self.rollout: Optional[Tensor] = None
        """[tokens, k] the engine's experts (-1: unreported), for ``rollout_routing_changed_frac``."""
        self.stats = stats

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, idx = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.mode is None:
            return probs, idx
        with torch.no_grad():
            self._observe(scores, idx)
            if self.rollout is not None:
                self._changed("rollout_routing_changed_frac", idx, self.rollout.to(idx.device))
        if self.mode == "record":
            self.recorded = idx.detach()
        if self.target is None:
            return probs, idx
        target = self.target.to(scores.device)
        if target.shape[0] != idx.shape[0]:
            raise ValueError(f"routing replay: {target.shape[0]} replayed tokens for a router that sees {idx.shape[0]} "
                             "(sequence parallelism or context parallelism split the tokens; replay does not follow them)")
        with torch.no_grad():
            self._changed("routing_changed_frac", idx, target)
        target = torch.where(target >= 0, target, idx)
        return scores.gather(1, target), target

    def _changed(self, name: str, idx: Tensor, target: Tensor) -> None:
        known = target[:, 0] >= 0
        if bool(known.any()):
            changed = (idx.sort(dim=-1).values != target.sort(dim=-1).values).any(dim=-1)
            self._add(name, changed[known].float().mean())

    def _observe(self, scores: Tensor, idx: Tensor) -> None:
        p = scores.float() if self.pre_softmax else torch.softmax(scores.float(), dim=-1)
        self._add("router_entropy", -(p * p.clamp_min(1e-30).log()).sum(-1).mean())
        load = torch.bincount(idx.flatten(), minlength=scores.shape[-1]).float()
        self._add("expert_load_max_over_mean", load.max() / load.mean().clamp_min(1e-30))

    def _add(self, name: str, value: Tensor) -> None:
        total, n = self.stats.get(name, (0.0, 0))
        self.stats[name] = (total + float(value), n + 1)


class RoutingReplay:
    """The routers of one policy's model chunks, their recordings and metrics."""

    def __init__(self, chunks: list, replay: bool = True, source: str = "old", moe_layers: tuple[int, ...] = ()):
        from megatron.core.transformer.moe.router import TopKRouter

        if source not in ("old", "rollout"):
            raise ValueError(f"algo.routing_replay_source must be old or rollout, got {source!r}")
        self.replay = replay
        self.source = source
        self.stats: dict = {}
        self.missing_rows = 0
        self._last_mode: Optional[str] = None
        self.routers: dict[int, list[_LayerRouting]] = {}
        self.store: dict[bytes, list[Tensor]] = {}
        offset = 0
        self._offsets: dict[int, int] = {}
        for chunk in chunks:
            layers = []
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    hf_layer = m.layer_number - 1 if m.layer_number is not None else None
                    moe_index = list(moe_layers).index(hf_layer) if hf_layer in moe_layers else len(layers)
                    m.router_replay = _LayerRouting(m.config.moe_router_pre_softmax, self.stats, moe_index)
                    layers.append(m.router_replay)
            self.routers[id(chunk)] = layers
            self._offsets[id(chunk)] = offset
            offset += len(layers)

    @contextlib.contextmanager
    def pass_(self, mode: Optional[str]):
        """Routers record (``record``), replay (``replay``) or route freely (None) for the
        passes inside. Consecutive record passes add to one store (the trainer scores a step
        mini-batch by mini-batch); the first record pass after a replay starts a new one."""
        if not self.replay and mode is not None:
            mode = "observe" if mode == "replay" else None
        if mode == "record" and self._last_mode != "record":
            self.store = {}
        if mode is not None:
            self._last_mode = mode
        if mode in ("replay", "observe"):
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()  # Megatron's per-layer sums of the router losses, this pass only
        self._set(mode)
        try:
            yield
        finally:
            self._set(None)

    def _set(self, mode: Optional[str]) -> None:
        for layers in self.routers.values():
            for r in layers:
                r.mode, r.recorded, r.target, r.rollout = mode, None, None, None

    def check_batch(self, routed_BSLK: Optional[Tensor]) -> None:
        """An old-log-prob pass with the rollout source needs the engine's routing."""
        if self.source == "rollout" and self.replay and routed_BSLK is None:
            raise ValueError(
                "algo.routing_replay_source=rollout, but the rollout batch carries no routed experts: the engine did not "
                "report them (SGLang servers need --enable-return-routed-experts; SGLang on CPU cannot return them: "
                "its routed-experts buffer registers CUDA host memory); use algo.routing_replay_source=old")

    def before(self, model, input_ids_bS: Tensor, seq_lens_b: Tensor, routed_bSLK: Optional[Tensor] = None) -> None:
        """Replay pass: give this chunk's routers the recorded experts of the micro-batch; with
        the rollout source and the engine's routing (``routed_bSLK``), those, in any pass."""
        layers = self._layers(model)
        if not layers or layers[0].mode is None:
            return
        for r in layers:
            r.target = r.rollout = None
        if routed_bSLK is not None:
            b, S = input_ids_bS.shape
            per_layer = _rollout_targets(routed_bSLK, S, [r.moe_index for r in layers])
            use = self.source == "rollout" and self.replay
            if use and layers[0].mode == "replay":
                self.missing_rows += int((routed_bSLK[:, 0, 0, 0] < 0).sum())
            for r, target in zip(layers, per_layer):
                r.rollout = target
                r.target = target if use else None
            if use:
                return
        if layers[0].mode != "replay":
            return
        keys = _keys(input_ids_bS, seq_lens_b)
        if any(k not in self.store for k in keys):
            self.missing_rows += sum(k not in self.store for k in keys)
            for r in layers:
                r.target = None
            return
        b, S = input_ids_bS.shape
        first = self._offsets[_unwrap_id(model, self.routers)]
        for i, r in enumerate(layers):
            k = self.store[keys[0]][first + i].shape[-1]
            target = torch.arange(k).expand(S, b, k).clone()
            for j, key in enumerate(keys):
                rec = self.store[key][first + i][:S]
                target[: rec.shape[0], j] = rec
            r.target = target.reshape(S * b, k)

    def after(self, model, input_ids_bS: Tensor, seq_lens_b: Tensor) -> None:
        """Recording pass: file this chunk's recorded experts under each row's tokens."""
        layers = self._layers(model)
        if not layers or layers[0].mode != "record":
            return
        b, S = input_ids_bS.shape
        first = self._offsets[_unwrap_id(model, self.routers)]
        for j, key in enumerate(_keys(input_ids_bS, seq_lens_b)):
            row = self.store.setdefault(key, [None] * sum(len(v) for v in self.routers.values()))
            for i, r in enumerate(layers):
                # The whole padded row: a replay in the same grouping then routes padding
                # as before too, so every expert's GEMM sees the same tokens, bit for bit.
                row[first + i] = r.recorded.view(S, b, -1)[:, j].cpu()

    def metrics(self, num_microbatches: int = 1) -> dict[str, float]:
        """The ``moe/*`` metrics since the last call (then reset); with the router losses
        Megatron tracked in the training pass (``moe/load_balancing_loss``, ``moe/z_loss``
        when enabled: unscaled, mean over this rank's routed layers and micro-batches)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        out = {f"moe/{k}": total / n for k, (total, n) in self.stats.items() if n}
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            values = entry["values"]
            if bool((values != 0).any()):
                out[f"moe/{name}"] = float(values[values != 0].mean()) / max(num_microbatches, 1)
        if self.missing_rows:
            out["moe/replay_missing_rows"] = float(self.missing_rows)
        self.stats.clear()
        self.missing_rows = 0
        return out

    def _layers(self, model) -> list:
        return self.routers.get(_unwrap_id(model, self.routers), [])


def _unwrap_id(model, known: dict) -> int:
    while id(model) not in known and hasattr(model, "module"):
        model = model.module
    return id(model)


def _rollout_targets(routed_bSLK: Tensor, S: int, columns: list[int]) -> list[Tensor]:
    """Per router: the engine's experts of its column as [S * b, K] in Megatron's token order
    (sequence-major), -1 beyond the reported positions (``S`` may exceed the batch's width:
    padding to a multiple)."""
    b, width, _, K = routed_bSLK.shape
    out = []
    for col in columns:
        t = torch.full((S, b, K), -1, dtype=torch.long, device=routed_bSLK.device)
        t[: min(S, width)] = routed_bSLK[:, :S, col].transpose(0, 1)
        out.append(t.reshape(S * b, K))
    return out


def _keys(input_ids_bS: Tensor, seq_lens_b: Tensor) -> list[bytes]:
    ids = input_ids_bS.cpu()
    return [ids[j, : int(n)].numpy().tobytes() for j, n in enumerate(seq_lens_b.tolist())]
