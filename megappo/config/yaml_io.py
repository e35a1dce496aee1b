"""Reading YAML the strict way: recipes and command-line values.

PyYAML implements YAML 1.1, which has traps for configs: ``1e-6`` is a string (a float
needs a dot there), ``on``/``off``/``yes``/``no`` are booleans, ``0755`` is octal and
``12:30`` is the integer 750. `StrictLoader` reads numbers and booleans as YAML 1.2 does
(``1e-6`` is a float; only ``true``/``false`` are booleans; ``0755`` and ``12:30`` stay
strings) and rejects a key given twice in one mapping instead of keeping the last.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from megappo.config.errors import ConfigError, ConfigFileNotFoundError

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats and an error on duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG, _INT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
StrictLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
StrictLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"malformed YAML{where}: {problem}"


def parse_yaml(text: str, what: str) -> Any:
    """Parse ``text`` with `StrictLoader`; a syntax error becomes a `ConfigError` naming
    ``what`` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what}: {_describe_yaml_error(err)}") from None


def read_yaml_file(path: str | Path) -> Any:
    """The parsed content of a recipe file (None when empty)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileNotFoundError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    return parse_yaml(text, str(path))


class StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings `StrictLoader` would read as something else."""


StrictDumper.yaml_implicit_resolvers = StrictLoader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    """Block-style YAML, keys in insertion order, that `StrictLoader` reads back to ``data``."""
    return yaml.dump(data, Dumper=StrictDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
