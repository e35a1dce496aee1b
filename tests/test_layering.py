"""Packages import one way (README "Architecture"): every ``megappo`` import, at module level
or inside a function, goes from a unit to one in its own or a lower layer, and no two units
import each other (no cycle). A unit is a package of ``megappo`` or a top-level module.

An import inside a function is allowed only to defer a heavy optional dependency or a
heavy import for a light path (the CLI's dry run), and says so: its line carries a
``# deferred:`` comment. Imports of megappo's own modules inside functions are not
deferrals (they were how cycles hid), except where the comment gives the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "megappo"

LAYERS: list[tuple[str, ...]] = [
    ("algo",),
    ("config",),
    ("parallel",),
    ("models",),
    ("weights",),
    ("data", "metrics", "metrics_sinks", "helper_processes"),
    ("rollout",),
    ("checkpoint", "checkpoint_config", "checkpoint_dir", "run_dir"),
    ("objective",),
    ("loop",),
    ("trainer", "rm_trainer"),
    ("train", "train_rm"),
    ("toolkit", "demo", "demo_rlhf"),
]
"""Bottom to top. Units of one layer may import each other as long as no cycle forms."""

RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "megappo", module
    return parts[1] if len(parts) > 1 else ""


def megappo_imports():
    """(importing unit, imported unit, file, line, inside a function, source line) for every import."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rpartition(".")[0]
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    in_function.add(id(inner))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] if base != "megappo" else [f"megappo.{a.name}" for a in node.names]
            for target in targets:
                if target == "megappo" or target.startswith("megappo."):
                    yield (unit_of(module), unit_of(target), f"{rel}.py", node.lineno, id(node) in in_function,
                           lines[node.lineno - 1])


IMPORTS = list(megappo_imports())


def test_every_unit_has_a_layer():
    units = {u for u, *_ in IMPORTS} | {v for _, v, *_ in IMPORTS}
    missing = sorted(u for u in units - {""} if u not in RANK)
    assert not missing, f"units without a layer in tests/test_layering.py (and the README): {missing}"


def test_no_import_goes_up():
    upward = [f"{f}:{line}: {src.strip()}  ({u} -> {v})" for u, v, f, line, _, src in IMPORTS
              if v and u and v != u and RANK[v] > RANK[u]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_cycle_between_units():
    edges: dict[str, set[str]] = {}
    for u, v, *_ in IMPORTS:
        if u and v and u != v:
            edges.setdefault(u, set()).add(v)
    cycles = []

    def visit(node, stack):
        for nxt in edges.get(node, ()):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif len(stack) < len(edges) + 1:
                visit(nxt, stack + [nxt])

    for start in edges:
        visit(start, [start])
    assert not cycles, "import cycles between units:\n" + "\n".join(sorted(set(cycles)))


def test_function_level_imports_of_megappo_say_why():
    hidden = [f"{f}:{line}: {src.strip()}" for u, v, f, line, inside, src in IMPORTS if inside and "# deferred:" not in src]
    assert not hidden, "megappo imports inside functions without a '# deferred: <reason>' comment:\n" + "\n".join(hidden)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")))
def test_module_size(path):
    lines = (ROOT.parent / path).read_text().count("\n")
    assert lines <= 450, f"{path} has {lines} lines (limit 450): split it by concept"
