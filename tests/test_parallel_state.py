"""``init_parallel`` argument errors that need no process group (fast, single process)."""

from __future__ import annotations

import pytest
import torch

from megappo.parallel import state


def test_cpu_device_with_cuda_visible_says_to_hide_the_gpus(monkeypatch):
    """The CPU patches rewrite process-wide torch.cuda calls and refuse to run beside CUDA;
    init_parallel says so before touching torch.distributed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(state, "_LAYOUT", None)
    with pytest.raises(ValueError, match=r"parallel.device=cpu but CUDA is visible \(8 GPU.*CUDA_VISIBLE_DEVICES= "):
        state.init_parallel(1, 1, device="cpu")
    assert not torch.distributed.is_initialized()
