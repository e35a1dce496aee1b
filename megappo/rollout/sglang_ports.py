"""Ports of the SGLang engines and servers started on one node, chosen so they cannot clash.

Each data-parallel replica's colocated engine, and each server our launcher starts, listens
on ``port`` (SGLang's HTTP / bootstrap port) and rendezvouses its own TP ranks on
``nccl_port``; an engine spanning nodes (``nnodes > 1``) meets on ``dist_init_addr``. Left
to itself SGLang draws ``nccl_port`` at random from 22000-29999 in every process, so engines
started at once on one node can draw the same one, and any of them can draw the trainer's
rendezvous port (torchrun's default is 29500). Our rule:

- Ports come from ``PORT_LOW``..``PORT_HIGH`` (below the kernel's ephemeral range, so an
  outgoing connection cannot take one between the choice and the child's bind, as SGLang
  itself reasons), and the engine in slot ``k`` of a node (``local_slot``: replicas and
  servers on one node number 0, 1, ...) takes only ports ``p`` with ``p % SLOTS == k``:
  two slots can never pick the same port, whatever each draws.
- Within its slot a port is drawn at random (so two jobs on a node rarely meet) and kept only
  if it is free (bind probe on all interfaces) and not the trainer's ``MASTER_PORT`` nor any
  port in ``avoid``.
- Override: ``rollout.sglang`` (or the server's own flags) may set ``port``, ``nccl_port`` or
  ``dist_init_addr``; the engine in slot ``k`` then uses the given port ``+ k * USER_STRIDE``
  (so one setting serves every replica of a node), and a port equal to ``MASTER_PORT`` is an
  error naming the field.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Any, Iterable, Optional

PORT_LOW, PORT_HIGH = 20000, 32767
SLOTS = 16
USER_STRIDE = 10


def local_slot(local_rank: int, model_parallel_size: int) -> int:
    """The slot of the replica whose first rank has ``local_rank`` (replicas of
    ``model_parallel_size = tp * pp`` ranks each, numbered on the node from 0)."""
    return (local_rank // max(1, model_parallel_size)) % SLOTS


def trainer_port() -> Optional[int]:
    """The trainer's rendezvous port (torchrun's ``MASTER_PORT``), when set."""
    value = os.environ.get("MASTER_PORT")
    return int(value) if value and value.isdigit() else None


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` on any interface (SGLang's stores bind 0.0.0.0)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def draw_port(slot: int, avoid: Iterable[int] = (), *, rng: Optional[random.Random] = None, attempts: int = 200) -> int:
    """A free port of ``slot``'s share of the range, not ``MASTER_PORT`` nor in ``avoid``."""
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot must be in [0, {SLOTS}), got {slot}")
    rng = rng or random.Random()
    taken = set(avoid)
    master = trainer_port()
    if master is not None:
        taken.add(master)
    first = PORT_LOW + (slot - PORT_LOW) % SLOTS
    candidates = range(first, PORT_HIGH + 1, SLOTS)
    for port in rng.sample(candidates, min(attempts, len(candidates))):
        if port not in taken and port_is_free(port):
            return port
    raise RuntimeError(f"no free port among {attempts} tried in slot {slot} of {PORT_LOW}-{PORT_HIGH}")


def engine_ports(slot: int, user_args: dict[str, Any], *, host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> dict[str, Any]:
    """``port`` and ``nccl_port`` (and ``dist_init_addr`` when ``user_args`` has
    ``nnodes > 1``) for the engine in ``slot``, as ``ServerArgs`` fields: the user's,
    offset by the slot, or drawn (module docstring)."""
    taken = set(avoid)
    master = trainer_port()
    chosen: dict[str, Any] = {}
    for key in ("port", "nccl_port"):
        if user_args.get(key) is not None:
            value = int(user_args[key]) + slot * USER_STRIDE
            if value == master:
                raise ValueError(
                    f"rollout.sglang.{key} = {user_args[key]} gives replica slot {slot} port {value}, the trainer's "
                    f"MASTER_PORT; choose another (slot k uses the given port + {USER_STRIDE} k)"
                )
        else:
            value = draw_port(slot, taken)
        taken.add(value)
        chosen[key] = value
    if int(user_args.get("nnodes", 1) or 1) > 1:
        if user_args.get("dist_init_addr"):
            addr_host, addr_port = str(user_args["dist_init_addr"]).rsplit(":", 1)
            chosen["dist_init_addr"] = f"{addr_host}:{int(addr_port) + slot * USER_STRIDE}"
        else:
            chosen["dist_init_addr"] = f"{host}:{draw_port(slot, taken)}"
    return chosen


AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
"""torchrun sets it to ``True`` in its workers: torch then makes every ``tcp://`` rendezvous a
*client* of torchrun's agent store (``torch.distributed.rendezvous._create_c10d_store``), so a
group that hosts its own store at ``tcp://address:port`` (SGLang's TP group on ``nccl_port``,
our weight-update group) waits for a store nobody starts, until its timeout (30 minutes by
default: ``compare_logprobs --engine sglang`` under torchrun hung there). SGLang's processes
and those groups must not see it."""


@contextlib.contextmanager
def own_rendezvous():
    """Within: ``AGENT_STORE_ENV`` is unset in this process (and so in the processes it
    starts), restored after."""
    saved = os.environ.pop(AGENT_STORE_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[AGENT_STORE_ENV] = saved
