"""Process-wide settings for the platform at hand (CPU, GPU, TPU)."""
import logging
import os

import jax
from absl import logging as absl_logging


def initialize():
    """Multi-host initialisation where a cluster is detected, and a persistent compile cache."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('TPU_WORKER_HOSTNAMES'):
        jax.distributed.initialize()
    cache_dir = os.environ.get('ALLFLAX_COMPILATION_CACHE',
                               os.path.join(os.path.expanduser('~'), '.cache', 'allflax', 'xla'))
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    quiet_library_logs()


class _OwnInfoOnly(logging.Filter):
    """Drops the INFO chatter of libraries (Orbax logs every file it writes); keeps our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN_CODE)


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = (os.path.join(_PROJECT_ROOT, 'allflax'), os.path.join(_PROJECT_ROOT, 'main.py'))


def quiet_library_logs():
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
