"""Import-only stand-in for ``sgl_kernel`` (SGLang's kernel package), used only when SGLang
runs on CPU (``megappo.parallel.sglang_cpu``).

Why: with ``SGLANG_USE_CPU_ENGINE=1`` SGLang imports a few ``*_cpu`` names from
``sgl_kernel`` at import time, unguarded (``kernels/ops/kvcache/cache_move.py``,
``srt/mem_cache/allocation.py``, the speculative-decoding modules), and no CPU build of
sgl-kernel exists on PyPI. With ``attention_backend="torch_native"`` on a CPU without AMX
none of them is called (traced over generation, both weight-update paths, release /
resume and cache flushes), so every name here raises ``NotImplementedError`` naming itself:
if a later SGLang does call one, the run fails loudly instead of computing something else.
It registers no ``torch.ops.sgl_kernel`` operator, so SGLang's AMX detection stays off.
"""

__version__ = "0.0.0+megappo.cpu.stand.in"


def __getattr__(name: str):
    if name.startswith("__"):  # keep Python's own protocol probes (__path__, __wrapped__...) honest
        raise AttributeError(name)

    def not_implemented(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called: megappo's CPU stand-in for sgl_kernel only lets SGLang import "
            "(megappo/parallel/sglang_cpu); this SGLang path needs the real kernel, which has no CPU build"
        )

    not_implemented.__name__ = not_implemented.__qualname__ = name
    return not_implemented
