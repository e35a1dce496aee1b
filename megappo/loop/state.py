"""What a run saves and resumes: the train state the checkpointer walks.

``TrainState`` is made of parts that save and load themselves:

  policies   the actor and (PPO) the critic, each with its optimizer and LR scheduler
             (Megatron distributed checkpoints, ``megappo.checkpoint``)
  parts      everything else that carries state from step to step, each with
             ``state_dict()`` / ``load_state_dict()``: the prompt cursor (``data``) and the
             objective (``objective``: the KL controller, the running reward statistics)
  rng        the RNG states (saved and restored by the checkpointer itself)

The reference policy is frozen and rebuilt from its source at start-up, so it is not saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from megappo.checkpoint import CheckpointManager
from megappo.models import MegatronPolicy, ModelSpec

log = logging.getLogger("megappo")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, so a resume with another tokenizer is caught."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    checkpoints: CheckpointManager
    policies: dict[str, MegatronPolicy]
    """The trained policies by role (``actor``, and ``critic`` for PPO)."""
    parts: dict[str, Stateful]
    """The other stateful parts by name (``data``, ``objective``)."""
    spec: ModelSpec
    tokenizer_fingerprint: str
    config_dict: dict = field(default_factory=dict)
    """The resolved config, recorded with every checkpoint."""

    def save(self, step: int) -> None:
        """Write checkpoint ``step`` (collective over all ranks)."""
        t0 = time.perf_counter()
        self.checkpoints.save(
            step,
            policies=self.policies,
            extra={"step": step, **{name: part.state_dict() for name, part in self.parts.items()}},
            config_dict=self.config_dict,
            spec_dict=self.spec.to_dict(),
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )
        log.info("checkpoint step %d saved in %.1f s", step, time.perf_counter() - t0)

    def restore(self, path: Optional[str] = None, *, allow_algo_change: bool = False) -> int:
        """Load checkpoint ``path`` (default: ``latest``) into every part; returns its step.
        The run's config is compared with the checkpoint's: every changed key is logged, new
        optimizer and scheduler settings apply, an ``algo`` change is refused unless allowed."""
        extra: dict[str, Any] = self.checkpoints.load(
            path,
            policies=self.policies,
            spec_dict=self.spec.to_dict(),
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            config_dict=self.config_dict,
            allow_algo_change=allow_algo_change,
        )
        for name, part in self.parts.items():
            part.load_state_dict(extra[name])
        log.info("resumed from %s at step %d", path or self.checkpoints.latest(), extra["step"])
        return int(extra["step"])
