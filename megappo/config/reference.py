"""The config reference (``docs/config.md``), generated from the schema.

A field's documentation is the string literal that follows it in ``schema.py``; Python
keeps no such "attribute docstrings" at run time, so they are read from the source with
`ast` (once, cached).
"""

from __future__ import annotations

import ast
import inspect
from functools import lru_cache
from pathlib import Path

import yaml

from megappo.config import schema, schema_algo
from megappo.config.coerce import describe, field_types, is_section
from megappo.config.passthrough import MEGATRON_SECTIONS, RENAMED
from megappo.config.presets import PRESET_SUMMARIES, PRESETS
from megappo.config.schema import Config
from megappo.config.yaml_io import StrictDumper


@lru_cache(maxsize=1)
def _schema_docs() -> dict[str, dict[str, str]]:
    """Class name -> field name -> docstring, from the source of ``schema.py`` and
    ``schema_algo.py``."""
    docs: dict[str, dict[str, str]] = {}
    body = [node for module in (schema, schema_algo) for node in ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body]
    for node in body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:] + [None]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_doc(cls: type, name: str) -> str:
    """The docstring of field ``name`` of schema class ``cls`` ("" when it has none)."""
    return _schema_docs().get(cls.__name__, {}).get(name, "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(value: object) -> str:
    text = yaml.dump(value, Dumper=StrictDumper, default_flow_style=True, width=10_000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _sections(cls: type = Config, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted name, class, doc) of every section, depth first in schema order."""
    out = []
    for name, tp in field_types(cls).items():
        if is_section(tp):
            path = f"{prefix}{name}"
            out.append((path, tp, field_doc(cls, name)))
            out.extend(_sections(tp, path + "."))
    return out


def _section_table(path: str, cls: type) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    default = cls()
    for name, tp in field_types(cls).items():
        if is_section(tp):
            sub = f"{path}.{name}"
            anchor = sub.replace(".", "")  # GitHub's anchor of the heading "## model.fp8"
            rows.append(f"| `{name}` | section | | {_cell(field_doc(cls, name))} See [`{sub}`](#{anchor}). |")
        else:
            value = getattr(default, name)
            rows.append(
                f"| `{name}` | {describe(tp, markdown=True)} | {_default(value)} | {_cell(field_doc(cls, name))} |"
            )
    return rows


def _preset_table() -> list[str]:
    rows = ["| preset | what it is | expands to |", "| --- | --- | --- |"]
    for name, summary in PRESET_SUMMARIES.items():
        values = ", ".join(f"`{k}={_default(v).strip('`')}`" for k, v in PRESETS.get(name, {}).items()) or "nothing"
        rows.append(f"| `{name}` | {_cell(summary)} | {values} |")
    return rows


def _passthrough_section() -> list[str]:
    lines = [
        "## Megatron and SGLang pass-through",
        "",
        "megappo's typed keys cover what it owns (the parallel layout, dtype, the FP8 choice,",
        "recomputation, Adam and the learning-rate schedule). Every other Megatron-core option is",
        "passed through as a dict spelled as Megatron spells it, and checked at load and by",
        "`--dry-run` against Megatron's own dataclass (`dataclasses.fields`): an unknown field is an",
        "error with a did-you-mean, a value of a plain type (bool, int, float, str, a choice) is",
        "type-checked, and a field megappo sets itself is an error naming the key to use instead.",
        "Megatron is imported for this check only when one of these dicts is set.",
        "",
        "| key | upstream class | megappo's defaults (the dict overrides them) |",
        "| --- | --- | --- |",
    ]
    for section in MEGATRON_SECTIONS:
        defaults = ", ".join(f"`{k}={_default(v).strip('`')}`" for k, v in section.defaults.items()) or "none"
        lines.append(f"| `{section.path}` | `{section.module}.{section.cls}` | {defaults} |")
    lines += [
        "",
        "Example: `model.megatron.apply_rope_fusion=true optim.ddp.overlap_grad_reduce=true",
        "optim.ddp.bucket_size=40000000`. `rollout.sglang` is passed to SGLang's `ServerArgs` the same",
        "way; its keys are checked against that dataclass where SGLang is installed (a warning says",
        "they were not checked elsewhere).",
        "",
        "Fields megappo sets, and where to set them instead:",
        "",
        "| field | in | use |",
        "| --- | --- | --- |",
    ]
    for section in MEGATRON_SECTIONS:
        for name, use in section.owned.items():
            lines.append(f"| `{name}` | `{section.path}` | {_cell(use)} |")
    renamed = ", ".join(f"`{old}` -> `{new}`" for old, new in RENAMED.items())
    lines += ["", f"Renamed keys (the old spelling is an error naming the new one): {renamed}.", ""]
    return lines


def render_markdown() -> str:
    """The full reference: load order and override syntax, presets, one table per section."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m megappo.config --markdown` from megappo/config/schema.py;",
        "     do not edit by hand. `make docs` regenerates it; tests/test_config_reference.py checks it. -->",
        "",
        "A run is configured by a YAML recipe (`--config recipes/NAME.yaml`) plus `section.key=value`",
        "overrides on the command line. Values are resolved in this order, later winning:",
        "",
        "1. the defaults below;",
        "2. the knob values of the preset named by `algo.preset` (from the command line, else the recipe);",
        "3. the recipe's values;",
        "4. the command-line overrides.",
        "",
        "So anything a recipe or the command line sets explicitly beats the preset. Override values are",
        "read as YAML: `algo.adv_norm.mean_level=group`, `rollout.stop_token_ids=[1,2]`,",
        "`rollout.sglang={mem_fraction_static: 0.7}` (replaces the dict) or",
        "`rollout.sglang.mem_fraction_static=0.7` (sets one key), `null` or `~` for None.",
        "Unknown keys, wrong types and values outside a choice are errors. Numbers and booleans are",
        "read as in YAML 1.2: `1e-6` is a float, and only `true`/`false` are booleans (`on`, `off`,",
        "`yes`, `no` are strings). `python -m megappo.train --config R.yaml --dry-run` prints the",
        "resolved config.",
        "",
        "## Presets",
        "",
        *_preset_table(),
        "",
    ]
    for path, cls, doc in _sections():
        lines += [f"## {path}", "", _cell(doc), "", *_section_table(path, cls), ""]
    lines += _passthrough_section()
    return "\n".join(lines).rstrip() + "\n"
