"""Runs at start-up of every Python process that has this folder on ``PYTHONPATH`` (set by
``megappo.parallel.sglang_cpu.apply`` only when SGLang runs on CPU; SGLang starts its
scheduler and detokenizer with ``spawn``, so a patch in the parent alone is not enough).

Why: PyPI's torchvision is CUDA-linked; beside the CPU torch its ``_C`` library cannot load,
and ``torchvision/_meta_registrations.py`` then fails with "operator torchvision::nms does
not exist". transformers needs torchvision importable because SGLang registers an image
processor at import. Defining the two operator schemas torchvision registers fakes for,
right before torchvision is first imported, is enough; nothing calls them (an ``nms`` call
would fail with torch's own "no kernel registered" error, naming the operator).
"""

import importlib.abc
import sys


class _TorchvisionSchemas(importlib.abc.MetaPathFinder):
    """Defines ``torchvision::nms`` / ``qnms`` on the first ``import torchvision``; finds nothing itself."""

    done = False
    library = None

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _TorchvisionSchemas.done:
            _TorchvisionSchemas.done = True
            import torch

            try:
                torch.ops.torchvision.nms
            except (AttributeError, RuntimeError):
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _TorchvisionSchemas.library = lib  # the schemas live as long as the library object
        return None


if not any(type(f).__name__ == "_TorchvisionSchemas" for f in sys.meta_path):  # loaded once per process
    sys.meta_path.insert(0, _TorchvisionSchemas())
