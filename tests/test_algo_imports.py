"""`megappo.algo` is pure tensor math (STYLE point 2): its modules import torch, the
standard library and each other, nothing distributed, no Megatron, no SGLang."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ALGO_DIR = Path(__file__).resolve().parent.parent / "megappo" / "algo"
MODULES = sorted(ALGO_DIR.glob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved in megappo.algo)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` is megappo.algo, `from .. import x` megappo
                parts = ["megappo", "algo"][: 3 - node.level]
                names.append(".".join(parts + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def allowed(name: str) -> bool:
    top = name.split(".")[0]
    if name == "torch.distributed" or name.startswith("torch.distributed."):
        return False
    return top == "torch" or top in sys.stdlib_module_names or name == "megappo.algo" or name.startswith("megappo.algo.")


def test_the_package_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"__init__.py", "losses.py", "registry.py", "shaping.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_algo_module_imports_only_torch_stdlib_and_itself(path: Path) -> None:
    bad = [name for name in imported_modules(path) if not allowed(name)]
    assert not bad, f"megappo/algo/{path.name} imports {bad}: algo code takes global statistics as arguments"


def test_the_check_catches_forbidden_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.distributed as dist\nfrom megappo.parallel import collectives\nimport numpy\n"
                     "from . import stats\nfrom ..parallel import state\nfrom typing import Optional\n")
    assert [n for n in imported_modules(probe) if not allowed(n)] == [
        "torch.distributed", "megappo.parallel", "numpy", "megappo.parallel"
    ]
