"""The parallel layer: process groups (``state``), global statistics and broadcasts
(``collectives``), vocabulary-parallel log-probs / entropy / KL (``vocab_parallel``) and
the CPU patches for megatron-core (``cpu_patches``, applied by ``init_parallel`` on CPU).

Only this package touches torch.distributed process groups (STYLE point 6).
"""

from megappo.parallel.state import ParallelLayout, destroy_parallel, get_layout, init_parallel

__all__ = ["ParallelLayout", "destroy_parallel", "get_layout", "init_parallel"]
