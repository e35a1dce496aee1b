"""Shared test setup: skip `gpu` tests without a GPU; a scratch run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # do not pay for importing torch
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none visible")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    """The checkout's root directory (recipes/, docs/, ...)."""
    return REPO_ROOT


@pytest.fixture
def tmp_run_dir(tmp_path: Path) -> Path:
    """An empty directory for one run's outputs (`train.run_dir`)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir
