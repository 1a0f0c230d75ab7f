"""Process-wide settings: multi-host start, compile cache, garbage collection, library logs."""
import contextlib
import gc
import logging
import os

import jax
from absl import logging as absl_logging

from allflax.cpu import memory


def initialize():
    """Freed memory kept in the process, multi-host initialisation where a cluster is detected,
    and a persistent compile cache."""
    memory.keep_freed_memory()
    if any(os.environ.get(name) for name in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'ALLFLAX_DISTRIBUTED')):
        jax.distributed.initialize(**_cluster_from_environment())
    cache_dir = os.environ.get('ALLFLAX_COMPILATION_CACHE',
                               os.path.join(os.path.expanduser('~'), '.cache', 'allflax', 'xla'))
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    quiet_library_logs()


def _cluster_from_environment() -> dict:
    """jax.distributed.initialize's arguments named by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID where set (a GPU cluster without Slurm or Open MPI); JAX detects the rest (TPU
    slices, Slurm, Open MPI, Kubernetes)."""
    names = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
             'process_id': 'JAX_PROCESS_ID'}
    cluster = {key: os.environ[name] for key, name in names.items() if os.environ.get(name)}
    for key in ('num_processes', 'process_id'):
        if key in cluster:
            cluster[key] = int(cluster[key])
    return cluster


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
    """Drops the INFO chatter of libraries (Orbax logs every file it writes) and Orbax's warning at
    each checkpoint saved without validation metrics (between evaluations, by design); keeps our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith('Requested `tracked_metric`; did not provide metrics'):
            return False
        return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN_CODE)


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = (os.path.join(_PROJECT_ROOT, 'allflax'), os.path.join(_PROJECT_ROOT, 'main.py'))


def quiet_library_logs():
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
