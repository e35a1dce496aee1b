"""What SGLang needs to run on a CPU, in one place, applied only when it does.

``rollout.engine: sglang`` (and the servers our launcher starts) on CPU are for tests and
debugging: SGLang's CPU path runs tiny models with ``torch_native`` attention (measured in
/work/shared/notes/sglang-cpu.md: log-probs within 3e-6 of transformers in float32). Three
pieces, each standing in for something SGLang expects and each failing loudly if SGLang
ever relies on it for more than an import:

- ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's own switch, read by ``sglang.srt.utils.is_cpu``
  when SGLang is imported): without it the scheduler imports ``vllm._custom_ops`` and dies.
- ``shims/sgl_kernel``: an import-only stand-in for sgl-kernel, which has no CPU build on
  PyPI; every function raises ``NotImplementedError`` naming itself.
- ``shims/sitecustomize.py``: defines the two ``torchvision`` operator schemas a CUDA-linked
  torchvision needs before it imports beside a CPU torch.

Both shims must reach SGLang's ``spawn``-ed scheduler and detokenizer processes, so
``apply`` puts the shims folder on ``PYTHONPATH`` of this process's environment (inherited
by every child) as well as on ``sys.path``. ``cpu_server_args`` are the engine / server
arguments of SGLang's CPU path; a user's ``rollout.sglang`` keys override them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

SHIMS_DIR = Path(__file__).resolve().parent / "shims"

CPU_SERVER_ARGS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",  # the x86 default (intel_amx) needs AMX and sgl-kernel's CPU build
    "sampling_backend": "pytorch",  # FlashInfer's sampling kernels are CUDA-only
    "disable_cuda_graph": True,
    "max_total_tokens": 16384,  # KV-cache slots; SGLang would otherwise size it from host RAM
    # The trainer computes in float32 on CPU; SGLang's "auto" reads only torch_dtype, which
    # transformers 5 writes as "dtype", and falls back to bfloat16 (1e-3 log-prob gaps).
    "dtype": "float32",
    # An idle scheduler otherwise busy-polls a core: on 2 cores two engines (or servers) took both
    # from the trainer, and generation throughput fell 10-20x (measured with two servers).
    "sleep_on_idle": True,
}


def cpu_server_args() -> dict[str, Any]:
    """``ServerArgs`` fields of SGLang's CPU path (a fresh dict)."""
    return dict(CPU_SERVER_ARGS)


def cpu_server_flags() -> list[str]:
    """The same as ``python -m sglang.launch_server`` flags."""
    flags: list[str] = []
    for key, value in CPU_SERVER_ARGS.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def cpu_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the switch set and the shims first on
    ``PYTHONPATH``: the environment of a process that will import SGLang on CPU."""
    env = dict(os.environ if env is None else env)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SHIMS_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SHIMS_DIR)] + paths)
    return env


def apply() -> None:
    """Prepare this process (and the processes it starts) to import and run SGLang on CPU.

    Must run before ``import sglang``: SGLang reads its CPU switch at import. Idempotent."""
    if sys.modules.get("sglang") is not None and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise RuntimeError(
            "megappo.parallel.sglang_cpu.apply: sglang was imported before SGLANG_USE_CPU_ENGINE=1 was set, "
            "so its CPU path is off in this process; build the SGLang engine before anything imports sglang"
        )
    os.environ.update({k: v for k, v in cpu_environment().items() if k in ("SGLANG_USE_CPU_ENGINE", "PYTHONPATH")})
    if str(SHIMS_DIR) not in sys.path:
        sys.path.insert(0, str(SHIMS_DIR))
    if "torchvision" not in sys.modules:
        # Install the torchvision finder here too (this process started before PYTHONPATH named
        # the shims folder); loaded under its own name so a site's real sitecustomize stays.
        spec = importlib.util.spec_from_file_location("megappo_sglang_cpu_site", SHIMS_DIR / "sitecustomize.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif not _torchvision_imports():
        raise RuntimeError(
            "megappo.parallel.sglang_cpu.apply: torchvision was imported (and failed) before the CPU schema "
            "stand-in was installed; build the SGLang engine before anything imports torchvision"
        )


def _torchvision_imports() -> bool:
    module = sys.modules.get("torchvision")
    return module is not None and hasattr(module, "__version__")


def sglang_runs_on_cpu(user_args: dict[str, Any]) -> bool:
    """Whether SGLang will run on CPU: ``device: cpu`` asked for, or no CUDA device visible."""
    device = user_args.get("device")
    if device is not None:
        return str(device) == "cpu"
    import torch

    return not torch.cuda.is_available()


def environment_python() -> Path | None:
    """The CPU SGLang environment's python (``make sglang-env``): ``MEGAPPO_SGLANG_PYTHON``,
    else ``.venv-sglang`` of this checkout; None when neither exists."""
    given = os.environ.get("MEGAPPO_SGLANG_PYTHON")
    path = Path(given) if given else Path(__file__).resolve().parents[3] / ".venv-sglang" / "bin" / "python"
    return path if path.exists() else None


def run_in_sglang_environment(script: str, argv: list[str]) -> None:
    """For a tool asked to run SGLang on CPU: when this Python has no SGLang and the CPU SGLang
    environment exists, replace this process by ``script argv`` under that environment's
    python (same process id and environment, so torchrun's workers stay its workers); else
    return (SGLang's import error then says how to install it)."""
    if importlib.util.find_spec("sglang") is not None:
        return
    python = environment_python()
    if python is None or Path(sys.prefix).resolve() == python.parent.parent.resolve():
        return
    print(f"(SGLang is not installed in {sys.executable}; running under {python}, the CPU SGLang environment)", file=sys.stderr, flush=True)
    os.execv(str(python), [str(python), script, *argv])
