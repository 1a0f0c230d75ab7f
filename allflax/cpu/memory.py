"""How the process's C heap serves XLA:CPU's per-step temporaries."""
import ctypes
import os

from absl import logging
from jax._src import xla_bridge

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel;
    whether it could (Linux with glibc, before JAX's first computation). Call it first thing.

    XLA:CPU allocates each step's temporaries as one block (~420 MB for EfficientNetV2-B3 at 128 px,
    batch 16) and frees it after the step. glibc serves such a block with mmap (from a worker
    thread's arena, always) and unmaps it on free, so every step page-faults it in again: 105 k
    faults and 0.25-0.36 s of kernel time per B3 step on a 2-core VM, whose steps run 1.3x as fast
    without them (benchmarks/RESULTS.md). With one arena (the main one, grown by brk), no mmap for large blocks
    and no trimming, steps reuse the memory. The price: the heap keeps the holes of its busiest
    moment (a step's block can be taken before the last one is freed), 0.1-0.9 GB more resident
    memory for B3. The arena limit binds only threads that have not allocated yet, hence before
    JAX starts its backend.
    """
    if 'CS_GNU_LIBC_VERSION' not in getattr(os, 'confstr_names', {}) or not os.confstr('CS_GNU_LIBC_VERSION'):
        return False
    if xla_bridge.backends_are_initialized():
        logging.warning('keep_freed_memory() came after JAX started its backend: freed memory still goes back '
                             'to the kernel (slower CPU steps); call it before the first JAX computation.')
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
