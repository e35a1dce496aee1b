"""Loading a Megatron optimizer's saved state into a fresh optimizer, with the three fixes
megatron-core 0.16.1 needs when neither Transformer Engine nor apex is installed (its
optimizer is then torch's Adam / AdamW): without them a resumed run fails to load or,
worse, drifts from the uninterrupted one (the resume tests in tests/test_checkpoint.py
compare against it bit for bit).

1. ``prepare_for_state_load``: torch's Adam creates a parameter's state (``step``
   included) only at its first step, and the distributed optimizer's ``state_dict()``
   asserts on it while building the state to load into: give every parameter a zero state
   first (the load overwrites it).
2. ``fully_reshardable`` loads copy every key of the state into place, ``step``
   included, but the loaded tensors carry no ``step`` (it lives in the param groups and
   is already set): keep the destination's (scoped to one optimizer, for one load).
3. The distributed optimizer's ``load_state_dict`` gives every parameter the *same*
   ``step`` tensor, which torch's Adam then increments in place once per parameter, so
   the bias correction drifts: give each parameter its own copy.

Each fix only acts where its condition holds (torch Adam state, the private setter of
the distributed optimizer), so with TE / apex optimizers they change nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def prepare_for_state_load(optimizer) -> None:
    """Fix 1: a zero Adam state for every parameter that has none yet."""
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` with fixes 2 and 3 (after
    ``prepare_for_state_load`` and ``dist_checkpointing.load``)."""
    with _step_from_destination(optimizer):
        optimizer.load_state_dict(state)
    for opt in _torch_optimizers(optimizer):
        for st in opt.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron (chained) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None]


@contextmanager
def _step_from_destination(optimizer):
    """Fix 2, for the duration of one load."""
    patched = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        orig = getattr(o, "_set_main_param_and_optimizer_states", None)
        if orig is None or not hasattr(o, "model_param_group_index_map"):
            continue

        def setter(model_param, tensors, _orig=orig, _o=o):
            if "step" not in tensors:
                group, order = _o.model_param_group_index_map[model_param]
                state = _o.optimizer.state[_o.optimizer.param_groups[group]["params"][order]]
                if "step" in state:
                    tensors = {**tensors, "step": state["step"]}
            return _orig(model_param, tensors)

        o._set_main_param_and_optimizer_states = setter
        patched.append(o)
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states
