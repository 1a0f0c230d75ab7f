"""Process-wide settings: the platforms JAX may use, multi-host start, compile cache, garbage
collection, library logs."""
import contextlib
import gc
import glob
import logging
import os

import jax
from absl import logging as absl_logging

from allflax.cpu import memory


# Device files of accelerators JAX has backends for: TPU VMs (/dev/accel*, or VFIO groups on
# v5p/v6e), NVIDIA GPUs, AMD GPUs (ROCm's /dev/kfd).
ACCELERATOR_DEVICE_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def initialize():
    """The platforms JAX may use, freed memory kept in the process, multi-host initialisation
    where a cluster is detected, and a persistent compile cache."""
    select_platforms()
    memory.keep_freed_memory()
    if is_multi_host(os.environ):
        jax.distributed.initialize(**_cluster_from_environment())
    use_compilation_cache()
    quiet_library_logs()


def use_compilation_cache():
    """JAX's persistent compile cache in ALLFLAX_COMPILATION_CACHE (default ~/.cache/allflax/xla),
    for every program: not only those over JAX's default 1 s, since a model's initialisers compile
    one small program per weight shape (~110 for EfficientNetV2-B3), which read back start it 5×
    sooner (benchmarks/RESULTS.md, "Compile cache")."""
    cache_dir = os.environ.get('ALLFLAX_COMPILATION_CACHE',
                               os.path.join(os.path.expanduser('~'), '.cache', 'allflax', 'xla'))
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def select_platforms() -> str | None:
    """On a host without accelerator devices, JAX runs on the CPU alone (unless JAX_PLATFORMS says
    otherwise): with libtpu installed (a test requirement, or a TPU image's), JAX would first try a
    TPU and print libtpu's discovery errors. Call before JAX starts a backend; returns what it set."""
    if os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms:
        return None
    if any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES):
        return None  # JAX's own discovery, which finds the accelerator.
    jax.config.update('jax_platforms', 'cpu')
    return 'cpu'


def is_multi_host(environ) -> bool:
    """Whether this process is one of several that train together: a coordinator is named
    (JAX_COORDINATOR_ADDRESS, a GPU cluster), ALLFLAX_DISTRIBUTED asks JAX to detect the cluster
    (Slurm, Open MPI, Kubernetes), or TPU_WORKER_HOSTNAMES lists several hosts (a TPU pod slice).
    Colab's single-host TPU runtimes set TPU_WORKER_HOSTNAMES=localhost: one host, nothing to
    coordinate (jax.distributed would wait for a coordinator that never comes)."""
    if environ.get('JAX_COORDINATOR_ADDRESS') or environ.get('ALLFLAX_DISTRIBUTED'):
        return True
    return len([host for host in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if host.strip()]) > 1


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
