"""Rollout routing replay ("R3", ``algo.routing_replay_source: rollout``) without Megatron: the
configuration's rules, the experts the embedded engine reports against transformers' own
routing, and ``RolloutBatch`` carrying them. The trainer's side is in
``tests/test_moe_routing_replay.py`` (one process) and ``tests/test_moe_parallel.py`` (EP, PP)."""

from __future__ import annotations

import pytest

from megappo.config import config_from_dict
from megappo.config.errors import ConfigError
from megappo.config.validate import validate


def test_rollout_source_needs_replay_and_an_engine_that_reports():
    with pytest.raises(ConfigError, match="needs algo.routing_replay=true"):
        validate(config_from_dict({"algo": {"routing_replay_source": "rollout"}}))
    with pytest.raises(ConfigError, match="rollout.engine=sglang reports .*rollout.sglang.enable_return_routed_experts"):
        validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"}, "rollout": {"engine": "sglang"}}))
    validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"},
                               "rollout": {"engine": "sglang", "sglang": {"enable_return_routed_experts": True}}}))
    validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"}}))  # embedded
    with pytest.raises(ConfigError, match="routing_replay_source"):
        validate(config_from_dict({"algo": {"routing_replay_source": "engine"}}))
