"""Writing run files: whole or not at all, and from one process of a multi-host run.

A file is written next to its target and renamed over it, so a reader (or a resumed run) never
sees half of one; process 0 writes, the others compute the same values and skip the write.
"""
import contextlib
import csv
import json
import os
import sys
import tempfile


def is_writer() -> bool:
    """Whether this process writes the run's files: the first of a multi-host run. A process that
    has not imported JAX (`python -m allflax.bundle`) is no part of one: it imports none for this."""
    jax = sys.modules.get('jax')
    return jax is None or jax.process_index() == 0


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs):
    """`open` on a temporary file beside `path`, renamed to `path` when the block completes
    (removed if it raises)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(handle, mode, **kwargs) as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(path: str, values: dict) -> str:
    """`values` as indented JSON at `path` (process 0 only)."""
    if is_writer():
        with atomic_open(path) as f:
            json.dump(values, f, indent=1)
    return path


def write_csv(path: str, header: list[str], rows) -> str:
    """A header and rows as CSV at `path` (process 0 only)."""
    if is_writer():
        with atomic_open(path, newline='') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return path
