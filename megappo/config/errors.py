"""The one exception type of configuration problems."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe, an override or a combination of settings is wrong; the message names the
    field, what was expected and what was given."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The recipe file does not exist (a `ConfigError` and a `FileNotFoundError`)."""
