"""Typed configuration: the schema, YAML recipes with overrides, presets, validation.

    from megappo.config import load_config
    cfg = load_config("recipes/gsm8k_liteppo.yaml", ["train.steps=10"], world_size=8)

`cfg` is a frozen `Config` tree (see ``schema.py`` and ``docs/config.md``); errors in the
recipe or the overrides are `ConfigError`s (``ValueError``) that name the field.
"""

from megappo.config.errors import ConfigError, ConfigFileNotFoundError
from megappo.config.loader import config_from_dict, config_to_dict, config_to_yaml, load_config
from megappo.config.presets import PRESET_SUMMARIES, PRESETS, uses_critic
from megappo.config.schema import Config
from megappo.config.preflight import check_runnable
from megappo.config.validate import data_parallel_size, validate

__all__ = [
    "Config",
    "ConfigError",
    "ConfigFileNotFoundError",
    "PRESETS",
    "PRESET_SUMMARIES",
    "check_runnable",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "data_parallel_size",
    "load_config",
    "uses_critic",
    "validate",
]
