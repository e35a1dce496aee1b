"""Recipe + overrides -> one frozen, checked `Config`.

Load order (later wins): schema defaults, the preset's knob values (`algo.preset` as the
command line or else the recipe gives it), the recipe, the command-line overrides. The
recipe and the overrides are first merged into the tree of *explicit* settings; the preset
is then laid underneath it, so anything set explicitly beats the preset.

Overrides are ``section.key=value`` (``algo.adv_norm.mean_level=group``); the value is read
as YAML (``[1, 2]``, ``{mem_fraction_static: 0.7}``, ``null``/``~`` for None). ``=`` assigns
the whole field; a free-form dict field also takes one nested key
(``rollout.sglang.mem_fraction_static=0.7``), merged into what the recipe set. For a string
field the text is taken as it is when it does not read as a string or null
(``train.run_dir=2024``, ``data.system_prompt=Answer: yes``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from megappo.config.coerce import accepts_plain_string, coerce, describe, field_types, is_mapping_field, is_section
from megappo.config.errors import ConfigError
from megappo.config.passthrough import renamed_key_error
from megappo.config.presets import preset_tree
from megappo.config.schema import Config
from megappo.config.validate import validate
from megappo.config.yaml_io import StrictLoader, dump_yaml, parse_yaml, read_yaml_file


@lru_cache(maxsize=None)
def _all_paths(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted field path of the schema (sections included)."""
    out: list[str] = []
    for name, tp in field_types(cls).items():
        path = f"{prefix}{name}"
        out.append(path)
        if is_section(tp):
            out.extend(_all_paths(tp, path + "."))
    return tuple(out)


def _unknown_key(key: str, cls: type, prefix: str, source: str) -> ConfigError:
    renamed = renamed_key_error(f"{prefix}.{key}" if prefix else key, source)
    if renamed is not None:
        return renamed
    valid = list(field_types(cls))
    where = f"in section '{prefix}'" if prefix else "at the top level (sections)"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    elsewhere = [p for p in _all_paths() if p.rsplit(".", 1)[-1] == key and p != f"{prefix}.{key}"]
    hints = [f"'{c}'" for c in close] + [f"'{p}'" for p in elsewhere if p not in close]
    hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
    return ConfigError(f"unknown key '{key}' {where}{source}{hint} (valid keys: {', '.join(valid)})")


def _as_section(value: Any, path: str, source: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        what = f"section '{path}'" if path else "the top level of a config"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {type(value).__name__} {value!r}{source}")
    return value


def check_tree(tree: Any, cls: type = Config, prefix: str = "", source: str = "") -> dict[str, Any]:
    """Check a (partial) raw tree against the schema class ``cls``: unknown keys and wrong
    types are `ConfigError`s. Returns the tree with values converted (``1`` -> ``1.0`` for
    a float field, ``"1e-6"`` -> ``1e-06``)."""
    out: dict[str, Any] = {}
    types = field_types(cls)
    for key, value in _as_section(tree, prefix, source).items():
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} in section '{prefix or '<top>'}' is not a string{source}")
        if key not in types:
            raise _unknown_key(key, cls, prefix, source)
        path = f"{prefix}.{key}" if prefix else key
        tp = types[key]
        out[key] = check_tree(value, tp, path, source) if is_section(tp) else coerce(copy.deepcopy(value), tp, path, source)
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any], cls: type = Config) -> dict[str, Any]:
    """``over`` laid on ``base`` (both checked trees): sections merge key by key, every other
    field (dict fields included) is replaced as a whole."""
    out = dict(base)
    types = field_types(cls)
    for key, value in over.items():
        tp = types[key]
        out[key] = merge(out.get(key, {}), value, tp) if is_section(tp) else value
    return out


def _override_value(raw: str, tp: Any, what: str) -> Any:
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else None
    except yaml.YAMLError:
        if accepts_plain_string(tp):
            return raw
        return parse_yaml(raw, what)  # raises a ConfigError with the YAML problem and position
    if accepts_plain_string(tp) and value is not None and not isinstance(value, str):
        return raw
    return value


def apply_override(tree: dict[str, Any], text: str) -> None:
    """Apply one ``a.b.c=value`` override to the checked tree ``tree`` in place."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    source = f" (on the command line: {text!r})"
    if not all(parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    cls: type = Config
    node = tree
    for i, part in enumerate(parts):
        types = field_types(cls)
        prefix = ".".join(parts[:i])
        if part not in types:
            raise _unknown_key(part, cls, prefix, source)
        tp, path, rest = types[part], ".".join(parts[: i + 1]), parts[i + 1 :]
        if is_section(tp):
            if rest:
                node = node.setdefault(part, {})
                cls = tp
                continue
            value = check_tree(_override_value(raw, tp, f"override {text!r}"), tp, path, source)
            node[part] = merge(node.get(part, {}), value, tp)
            return
        if rest and is_mapping_field(tp):
            mapping = copy.deepcopy(node.get(part) or {})
            inner = mapping
            for sub in rest[:-1]:
                if not isinstance(inner.get(sub), dict):
                    inner[sub] = {}
                inner = inner[sub]
            inner[rest[-1]] = _override_value(raw, Any, f"override {text!r}")
            node[part] = coerce(mapping, tp, path, source)
            return
        if rest:
            raise ConfigError(f"override {text!r}: '{path}' is a {describe(tp)} field, not a section, so it has no key '{rest[0]}'")
        node[part] = coerce(_override_value(raw, tp, f"override {text!r}"), tp, path, source)
        return


def build(tree: Mapping[str, Any], cls: type = Config) -> Any:
    """Instantiate ``cls`` from a checked tree; missing fields take their defaults."""
    kwargs = {}
    for name, tp in field_types(cls).items():
        if name in tree:
            kwargs[name] = build(tree[name], tp) if is_section(tp) else tree[name]
    return cls(**kwargs)


def resolve_tree(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The checked tree of a recipe plus overrides with its preset expanded underneath."""
    explicit: dict[str, Any] = {}
    if path is not None:
        explicit = check_tree(read_yaml_file(path), Config, "", f" (in {path})")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    for text in overrides:
        apply_override(explicit, text)
    preset = explicit.get("algo", {}).get("preset", "none")
    return merge(preset_tree(preset), explicit)


def load_config(
    path: Optional[str | Path] = None, overrides: Iterable[str] = (), *, world_size: Optional[int] = None
) -> Config:
    """Load a recipe (or only defaults when ``path`` is None), apply ``section.key=value``
    overrides, expand the preset, and validate (parallel layout against ``world_size`` when
    given). Raises `ConfigError` (a ``ValueError``) naming the problem."""

    cfg = build(resolve_tree(path, overrides))
    validate(cfg, world_size=world_size)
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A `Config` from a (possibly partial) nested dict such as `config_to_dict`'s output;
    checked like a recipe. The preset is not expanded again: the dict holds resolved values."""
    return build(check_tree(data, Config, "", " (in a config dict)"))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts, lists and scalars, in schema order."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML that `load_config` reads back to an equal `Config`."""
    return dump_yaml(config_to_dict(cfg))
