"""Process-wide settings for the platform at hand (CPU, GPU, TPU)."""
import contextlib
import ctypes
import gc
import logging
import os

import jax
from absl import logging as absl_logging
from jax._src import xla_bridge

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def initialize():
    """Freed memory kept in the process, multi-host initialisation where a cluster is detected,
    and a persistent compile cache."""
    keep_freed_memory()
    if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('TPU_WORKER_HOSTNAMES'):
        jax.distributed.initialize()
    cache_dir = os.environ.get('ALLFLAX_COMPILATION_CACHE',
                               os.path.join(os.path.expanduser('~'), '.cache', 'allflax', 'xla'))
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    quiet_library_logs()


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
        absl_logging.warning('keep_freed_memory() came after JAX started its backend: freed memory still goes back '
                             'to the kernel (slower CPU steps); call it before the first JAX computation.')
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))


@contextlib.contextmanager
def setup_objects_frozen():
    """Within it, the Python objects alive at its start (the libraries, the model, the compiled
    steps) are left out of garbage collection; they go back in at its end.

    A full collection walks every tracked object: ~370 k once JAX, Flax and EfficientNetV2-B3 are
    set up, 0.25 s on a 2-core VM, and a training loop's allocations set one off every ~14 B3
    steps, a step-long stall each time (benchmarks/RESULTS.md). Objects made inside are collected
    as before.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _OwnInfoOnly(logging.Filter):
    """Drops the INFO chatter of libraries (Orbax logs every file it writes); keeps our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN_CODE)


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = (os.path.join(_PROJECT_ROOT, 'allflax'), os.path.join(_PROJECT_ROOT, 'main.py'))


def quiet_library_logs():
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
