"""The generated config reference: complete, and docs/config.md in sync with the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megappo.config.__main__ import main as config_main
from megappo.config.coerce import field_types, is_section
from megappo.config.reference import field_doc, render_markdown
from megappo.config.schema import Config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _fields(cls: type = Config, prefix: str = ""):
    for f in dataclasses.fields(cls):
        yield cls, f.name, prefix
        tp = field_types(cls)[f.name]
        if is_section(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")


def test_every_field_has_a_docstring_and_a_row() -> None:
    text = render_markdown()
    for cls, name, prefix in _fields():
        assert field_doc(cls, name), f"{prefix}{name} has no docstring in schema.py"
        if cls is not Config:  # top-level fields are the sections themselves
            assert f"| `{name}` |" in text
        if is_section(field_types(cls)[name]):
            assert f"## {prefix}{name}\n" in text


def test_docs_config_md_is_in_sync() -> None:
    assert DOCS.read_text() == render_markdown(), (
        "docs/config.md is stale: run `python -m megappo.config --markdown > docs/config.md` (or `make docs`)"
    )


def test_cli_check_mode(tmp_path: Path, capsys) -> None:
    assert config_main(["--markdown", "--check", str(DOCS)]) == 0
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert config_main(["--markdown", "--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_main(["--markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()
