"""Guards around a training run: one writer per workdir, resumes that refuse a different run, and
config values rejected before any compilation or data preparation is spent on them."""
import contextlib
import datetime
import json
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Collection

LOCK_NAME = 'run.lock'

# Settings that do not change the trained result: a resume may change them.
_FREE_KEYS = frozenset({'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                        'data.cache_dir', 'data.dir'})
_FREE_PREFIXES = ('eval.', 'montecarlo.')
_ABSENT = object()


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock."""


class ResumeMismatchError(ValueError):
    """The workdir's run was trained with settings that change the result."""


class ConfigError(ValueError):
    """A config value that cannot train."""


class WorkdirLock:
    """`<workdir>/run.lock`, naming the process that writes the workdir.

    Two runs writing one workdir overwrite each other's checkpoints and metrics. The lock records
    host, pid, start time and command; a lock whose process is gone from this host (or that is empty,
    its writer killed mid-write) is stale and taken over. A lock from another host is never taken over,
    since its process cannot be checked from here.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._record = None  # Our lock file's bytes while held.

    def __enter__(self) -> 'WorkdirLock':
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        if self._record is not None:
            return
        os.makedirs(self.workdir, exist_ok=True)
        record = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                             'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                             'command': ' '.join(sys.argv)}).encode()
        # The lock appears complete or not at all (a hard link of a written file), so an empty lock can
        # only be a writer that died: os.open(O_EXCL) then write would show others an empty file meanwhile.
        fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + '.', suffix='.tmp', dir=self.workdir)
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(record)
            while not self._claim(tmp):
                pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._record = record

    def release(self) -> None:
        """Removes the lock if it is still ours; a second call does nothing."""
        record, self._record = self._record, None
        if record is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._read()[0] == record:
                os.remove(self.path)

    def _claim(self, tmp: str) -> bool:
        """True once the lock is ours; False when it changed under us and must be looked at again."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            pass
        try:
            content, inode = self._read()
        except FileNotFoundError:  # Released meanwhile.
            return False
        holder = _parse(content)
        if holder is not None and (holder['host'] != socket.gethostname() or _alive(holder['pid'])):
            raise WorkdirBusyError(self._busy_message(holder))
        if not self._take_over(tmp, content, inode):
            return False
        if holder is None:
            logging.warning('%s was empty or unreadable (its writer died while writing it): taking it over',
                            self.path)
        else:
            logging.warning('%s names process %s on %s, which is no longer running: taking it over',
                            self.path, holder['pid'], holder['host'])
        return True

    def _take_over(self, tmp: str, content: bytes, inode: int) -> bool:
        """Replaces the stale lock by ours; `run.lock.takeover`, created exclusively, makes this one
        process's job when several find the same stale lock."""
        claim = self.path + '.takeover'
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise WorkdirBusyError(
                f'another process is taking over the stale lock {self.path} of {self.workdir}: wait for it, or '
                f'train into another --workdir. If no process is (one was killed during the takeover), delete '
                f'{claim}.') from None
        try:
            try:
                if self._read() != (content, inode):  # Released and taken by a live process since.
                    return False
            except FileNotFoundError:
                return False
            os.replace(tmp, self.path)
            return True
        finally:
            os.remove(claim)

    def _read(self) -> tuple[bytes, int]:
        with open(self.path, 'rb') as f:
            return f.read(), os.fstat(f.fileno()).st_ino

    def _busy_message(self, holder: dict) -> str:
        where = ('this host' if holder['host'] == socket.gethostname()
                 else f'host {holder["host"]}, which this machine cannot check')
        return (f'{self.workdir} is in use by process {holder["pid"]} on {where}, running since '
                f'{holder.get("started", "?")}: {holder.get("command", "?")}\n'
                f'Wait for it to finish, or train into another --workdir. If that process is certainly gone '
                f'(e.g. its machine crashed), delete {self.path}.')


def _parse(content: bytes) -> dict | None:
    """The lock's record, or None for an empty or unreadable lock."""
    try:
        record = json.loads(content)
    except ValueError:
        return None
    if not (isinstance(record, dict) and isinstance(record.get('host'), str)
            and isinstance(record.get('pid'), int) and record['pid'] > 0):
        return None
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process: alive.
        pass
    return True


def check_resume(saved: dict, new: dict, *, workdir: str, defaults: dict | None = None) -> list[str]:
    """Compares a run's config.json (`saved`) with the config it is resumed with (`new`, nested dicts).

    Resuming with a different model, data or optimisation would silently train a mix of two runs, so
    such differences raise ResumeMismatchError listing each of them. Returns one line per difference
    that leaves the result unchanged (logging, evaluation, data and cache folders, a longer
    total_steps). A key absent from `saved` (written before the setting existed) is accepted when the
    new value equals its value in `defaults`.
    """
    saved_flat, new_flat, default_flat = _flatten(saved), _flatten(new), _flatten(defaults or {})
    allowed, refused = [], []
    for key in sorted(saved_flat.keys() | new_flat.keys()):
        old, value = saved_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if _same(old, value):
            continue
        change = f'{key}: {_show(old)} -> {_show(value)}'
        if key in _FREE_KEYS or key.startswith(_FREE_PREFIXES):
            allowed.append(change)
        elif key == 'total_steps' and old is not _ABSENT and value is not _ABSENT and 0 < old <= value:
            allowed.append(f'{change} (the learning-rate schedule is stretched over the new total from the '
                           f'resumed step on)')
        elif key == 'total_steps' and old == 0:
            refused.append(f'{change} (the run\'s length came from num_epochs)')
        elif old is _ABSENT and key in default_flat and _same(default_flat[key], value):
            allowed.append(f'{change} (the default; the run predates this setting)')
        else:
            refused.append(change)
    if refused:
        lines = '\n'.join(f'  {line}' for line in refused)
        raise ResumeMismatchError(
            f'refusing to resume {workdir}: its config.json differs in {len(refused)} setting'
            f'{"s" if len(refused) > 1 else ""} that change the result:\n{lines}\n'
            f'Rerun with the same settings, or train into a new --workdir.')
    return allowed


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _same(a, b) -> bool:
    """Equality where a tuple equals the list JSON made of it."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is _ABSENT or b is _ABSENT:
        return a is b
    return a == b


def _show(value) -> str:
    return 'absent' if value is _ABSENT else repr(value)


def validate_config(config, *, synthetic_names: Collection[str], real_names: Collection[str]) -> None:
    """Raises ConfigError naming every invalid value of an ml_collections config, before a run spends
    minutes compiling or preparing data for it. Keys the config lacks (older runs) are not checked.

    `synthetic_names` and `real_names` are the data sets of allflax.data.sources (synthetic.CLASS_NAMES
    and REAL), passed in so that this module stays free of their image libraries.
    """
    problems = []

    def check(key: str, ok, rule: str) -> None:
        value = _lookup(config, key)
        if value is not _ABSENT and not ok(value):
            problems.append(f'{key}={value!r} {rule}; set --config.{key}')

    check('total_steps', lambda v: v >= 0, 'must be >= 0 (0 trains for num_epochs)')
    check('num_epochs', lambda v: v >= 0, 'must be >= 0')
    check('batch_size', lambda v: v >= 1, 'must be >= 1 (the global batch, over all devices)')
    for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
        check(key, lambda v: v >= 1, 'must be >= 1 step')
    check('keep_checkpoints', lambda v: v >= 1, 'must be >= 1')
    check('data.image_size', lambda v: v >= 1, 'must be >= 1 pixel')
    check('data.num_workers', lambda v: v >= 0, 'must be >= 0 (0 reads in the main process)')
    check('data.split', lambda v: v in ('patient', 'official', 'random'), 'must be patient, official or random')
    check('data.split_fractions', lambda v: all(f >= 0 for f in v.values()) and math.isclose(
        sum(v.values()), 1, abs_tol=1e-6), 'must be >= 0 and sum to 1')
    check('optimizer.learning_rate', lambda v: v > 0, 'must be > 0')
    check('optimizer.warmup_fraction', lambda v: 0 <= v <= 1, 'must be in [0, 1] (a fraction of total steps)')
    check('optimizer.weight_decay', lambda v: v >= 0, 'must be >= 0')
    check('loss.gamma', lambda v: v >= 0, 'must be >= 0 (0 is plain sigmoid cross-entropy)')
    if _lookup(config, 'total_steps') == 0 and _lookup(config, 'num_epochs') == 0:
        problems.append('total_steps=0 and num_epochs=0 train nothing; set --config.total_steps or '
                        '--config.num_epochs')

    name, data_dir = _lookup(config, 'data.name'), _lookup(config, 'data.dir')
    if name in synthetic_names and data_dir not in (_ABSENT, ''):
        problems.append(f'data.dir={data_dir!r} is ignored by the synthetic data set {name}: set '
                        f'--config.data.name to a real data set ({", ".join(real_names)}) or drop data.dir')
    elif name in real_names and data_dir in (_ABSENT, ''):
        problems.append(f'data.name={name!r} reads images from data.dir, which is empty: set --config.data.dir '
                        f'to the downloaded folder')
    elif name is not _ABSENT and name not in synthetic_names and name not in real_names:
        problems.append(f'data.name={name!r} is unknown: set --config.data.name to one of '
                        f'{", ".join([*synthetic_names, *real_names])}')
    if problems:
        raise ConfigError('invalid config:\n' + '\n'.join(f'  {line}' for line in problems))


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        if part not in node:
            return _ABSENT
        node = node[part]
    return node
