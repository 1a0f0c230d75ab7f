"""Writing run files: whole or not at all, and from one process of a multi-host run.

A file is written next to its target and renamed over it, so a reader (or a resumed run) never
sees half of one; process 0 writes, the others compute the same values and skip the write. A file
or folder is replaced only where allflax recognises it as its own (`refuse_unless_replaceable`,
`refuse_foreign_folder`): an output path that holds a user's file is refused before anything is written.
"""
import contextlib
import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable


def is_writer() -> bool:
    """Whether this process writes the run's files: the first of a multi-host run. A process that
    has not imported JAX (`python -m allflax.deploy.bundle`) is no part of one: it imports none for this."""
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


class OutputRefused(ValueError):
    """An output path that holds something allflax did not write: refused in one line, before any
    file is written, so that no mode replaces or removes a user's file."""


def refuse_unless_replaceable(path: str, what: str, written_by_allflax: Callable[[str], bool]):
    """Raises OutputRefused unless `path` is absent, or a regular file (not a link) that
    `written_by_allflax(path)` recognises as a `what` of allflax's; the caller then replaces it."""
    if os.path.islink(path):
        raise OutputRefused(f'{path} is a symbolic link: allflax writes no {what} through links; '
                            f'name a new path')
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise OutputRefused(f'{path} exists and is not a file: name a new path for the {what}')
    if not written_by_allflax(path):
        raise OutputRefused(f'{path} exists and is not a {what} that allflax wrote: name a new path '
                            f'(allflax replaces only its own files)')


def csv_with_header(*columns: str) -> Callable[[str], bool]:
    """Recognises a CSV file whose header row starts with `columns`."""
    def recognise(path: str) -> bool:
        try:
            with open(path, newline='') as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        return tuple(header[:len(columns)]) == columns
    return recognise


def refuse_foreign_folder(folder: str, what: str, entries: Callable[[str], bool]):
    """Raises OutputRefused unless `folder` is absent, empty, or holds only entries that
    `entries(name)` says allflax writes there (hidden names, such as the temporary files of
    `atomic_open`, `.DS_Store` or `.ipynb_checkpoints`, are passed over: allflax writes none
    under another's name)."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise OutputRefused(f'{folder} exists and is not a folder: name a new folder for the {what}')
    foreign = sorted(name for name in os.listdir(folder) if not name.startswith('.') and not entries(name))
    if foreign:
        shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        raise OutputRefused(f'{folder} holds files that allflax did not write there ({shown}): it is not a {what}; '
                            f'name a new or empty folder (allflax replaces only its own files)')
