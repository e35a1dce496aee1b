"""Strict checking of one value against a schema field's annotation.

The annotations of ``schema.py`` are strings (``from __future__ import annotations``);
``field_types`` resolves them once per class. Accepted per type:

- ``bool``: only YAML ``true``/``false`` (not 0/1, not "yes").
- ``int``: an integer, not a bool and not a float.
- ``float``: a float, an int, or a numeric string such as ``"1e-6"`` (YAML 1.1, which PyYAML
  implements, reads ``1e-6`` as a string; our loader already reads it as a float, this
  catches quoted ones).
- ``str``: a string. ``Literal[...]``: one of the listed values. ``Optional[X]``: ``null`` or X.
- ``list[X]``: a list of X. ``dict[str, Any]``: a mapping with string keys.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

from megappo.config.errors import ConfigError

_NUMBER = re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?$")


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a schema dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_section(tp: Any) -> bool:
    """True for a nested config dataclass (a section such as ``algo.adv_norm``)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``Optional[X]``, (tp, False) otherwise."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_mapping_field(tp: Any) -> bool:
    """A free-form ``dict`` field (such as ``rollout.sglang``): nested keys may be set."""
    base, _ = strip_optional(tp)
    return base is dict or get_origin(base) is dict


def accepts_plain_string(tp: Any) -> bool:
    """A ``str`` or ``Optional[str]`` field (not a ``Literal``)."""
    return strip_optional(tp)[0] is str


def describe(tp: Any, *, markdown: bool = False) -> str:
    """A readable type: ``int``, ``float | None``, ``list[int]``, ``'a' | 'b'``."""
    sep = " \\| " if markdown else " | "
    base, optional = strip_optional(tp)
    if optional:
        return describe(base, markdown=markdown) + sep + "None"
    if get_origin(tp) is Literal:
        quote = '"' if markdown else "'"
        return sep.join(f"{quote}{a}{quote}" for a in get_args(tp))
    if _is_union(tp):
        return sep.join(describe(a, markdown=markdown) for a in get_args(tp))
    origin = get_origin(tp)
    if origin in (list, dict):
        inner = ", ".join(describe(a, markdown=markdown) for a in get_args(tp))
        return f"{origin.__name__}[{inner}]"
    if tp is Any:
        return "Any"
    if is_section(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, tp: Any, value: Any, source: str) -> ConfigError:
    base, optional = strip_optional(tp)
    if get_origin(base) is Literal:
        allowed = ", ".join(repr(a) for a in get_args(base)) + (", null" if optional else "")
        return ConfigError(f"{where}: {value!r} is not one of the allowed values: {allowed}{source}")
    shown = f"{value!r} ({type(value).__name__})" if value is not None else "null"
    return ConfigError(f"{where}: expected {describe(tp)}, got {shown}{source}")


def coerce(value: Any, tp: Any, where: str, source: str = "") -> Any:
    """Return ``value`` converted to the field type ``tp`` or raise a `ConfigError` naming
    ``where`` (the dotted field name), the expected type and the value. ``source`` is
    appended to the message (for example `` (in recipes/x.yaml)``)."""
    if tp is Any:
        return value
    base, optional = strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise _fail(where, tp, value, source)
    if base is not tp:
        try:
            return coerce(value, base, where, source)
        except ConfigError:
            raise _fail(where, tp, value, source) from None
    origin = get_origin(tp)
    if origin is Literal:
        for allowed in get_args(tp):
            if type(value) is type(allowed) and value == allowed:
                return value
        raise _fail(where, tp, value, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value.strip().replace("_", ""))
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = get_args(tp)
            return [coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = get_args(tp)
            return {
                coerce(k, key_tp, f"{where} key", source): coerce(v, value_tp, f"{where}.{k}", source)
                for k, v in value.items()
            }
    else:
        raise AssertionError(f"{where}: unsupported annotation {tp!r} in the schema")
    raise _fail(where, tp, value, source)
