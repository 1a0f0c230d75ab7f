"""One writer per workdir: `run.lock`, a lease that holds on any filesystem and whatever the hosts'
clocks say."""
import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

LOCK_NAME = 'run.lock'
# A run renews its lock's lease every quarter of this; a lease unrenewed for this long is over.
# Long enough for a network filesystem's hiccups, short enough that a Colab runtime reset (a new
# host, the old process gone with its machine) waits about a minute before resuming.
DEFAULT_LEASE_SECONDS = 60.0
LEASE_ENV = 'ALLFLAX_LOCK_LEASE_SECONDS'
# What link() raises where a filesystem has no hard links: Drive's FUSE mount ENOSYS, others EPERM
# or EOPNOTSUPP.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock."""


class WorkdirLock:
    """`<workdir>/run.lock`, a lease naming the process that writes the workdir.

    Two runs writing one workdir overwrite each other's checkpoints and metrics. The lock records
    host, pid, start time, command, a token that is new with each holder, and its renewals: a
    thread rewrites it every quarter of `lease_seconds` while the run goes on.

    A lock is taken over, with a warning that names the old holder,
      - from this host, when its process is gone;
      - from any host, when this process sees it unchanged for a whole lease on its own monotonic
        clock. The holder's clock is never compared with this one (hosts' clocks disagree by
        minutes: a laptop just resumed, a VM without NTP); the times it records are for messages;
      - when it is empty or torn and stays so for `TORN_GRACE_SECONDS` (its writer died mid-write).
    A lock that names no lease (written before leases) is never taken over from another host.

    Takeovers and renewals each read, compare and replace the lock while holding
    `run.lock.takeover`, created exclusively, so that a renewal never overwrites a newer holder; one
    left by a process that died holding it is removed once it stays for `CLAIM_GRACE_SECONDS`.
    The holder calls `check()` before each write: it raises once the lock names another holder, a
    renewal failed, or the renewing thread died. Workdirs on network and FUSE filesystems (Google
    Drive's mount, GCS FUSE, SMB) may refuse hard links and POSIX locks: the lock is then created
    with O_EXCL, which those filesystems honour, and written in place, hence the grace for a lock
    read before its first bytes arrive.
    """
    TORN_GRACE_SECONDS = 2.0
    # A claim is held for a read and a rename; one seen for this long was left by a dead process.
    CLAIM_GRACE_SECONDS = 10.0
    _POLL_SECONDS = 0.05

    def __init__(self, workdir: str, lease_seconds: float | None = None, *,
                 clock: Callable[[], float] = time.time, hostname: str | None = None):
        """`clock` (wall time) only stamps the record for people to read; `hostname` defaults to
        this host's (both are arguments for tests that play several hosts)."""
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.claim_path = self.path + '.takeover'
        self.lease_seconds = lease_seconds or float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_SECONDS))
        self._clock = clock
        self._host = hostname or socket.gethostname()
        self._record = None  # Our lock file's bytes while held.
        self._hard_links = True  # Until the workdir's filesystem refuses one.
        self._lost = None  # Why this process may no longer write the workdir, once it may not.
        self._guard = threading.Lock()  # Renewal against release.
        self._stop_renewing = threading.Event()
        self._renewer = None
        self._claims_seen = {}  # (bytes, inode) of another process's claim -> when first seen (monotonic).

    def __enter__(self) -> 'WorkdirLock':
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        if self._record is not None:
            return
        os.makedirs(self.workdir, exist_ok=True)
        started = self._clock()
        fields = {'host': self._host, 'pid': os.getpid(), 'started': _iso(started), 'command': ' '.join(sys.argv),
                  'token': uuid.uuid4().hex, 'generation': 1, 'renewals': 0}
        watched = {}  # Lock bytes -> when this process first read them (monotonic).
        while (record := self._claim(fields, watched)) is None:
            time.sleep(self._POLL_SECONDS)
        self._record, self._lost = record, None
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew_until_released, name='run.lock lease', daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Stops renewing and removes the lock if it is still ours; a second call does nothing."""
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with self._guard:
            record, self._record = self._record, None
        if record is None:
            return
        with contextlib.suppress(FileNotFoundError), self._claimed() as claimed:
            if claimed and self._read()[0] == record:
                os.remove(self.path)

    def check(self) -> None:
        """Raises WorkdirBusyError unless this process still holds the lock: called before each
        write of the workdir, it reads the lock and compares its token with ours."""
        if self._lost:
            raise WorkdirBusyError(self._lost)
        if self._record is None:
            raise WorkdirBusyError(f'{self.path} is not held by this process: it must not write {self.workdir}')
        if self._renewer is None or not self._renewer.is_alive():
            self._lose('the thread that renews its lease has stopped')
        try:
            holder = _parse(self._read()[0])
        except OSError as error:
            self._lose(f'it cannot be read ({error})')
        if holder is None or holder.get('token') != json.loads(self._record)['token']:
            self._lose(f'it was taken over by {_who(holder)}')

    def _lose(self, why: str):
        with self._guard:
            self._lost = self._lost or (f'{self.path}: {why} while this run held it: stopping before this run '
                                        f'writes {self.workdir} again, so that two runs never write it. Rerun '
                                        f'the same command to resume from the last checkpoint once no other '
                                        f'run writes there.')
        logging.error('%s', self._lost)
        raise WorkdirBusyError(self._lost)

    def _claim(self, fields: dict, watched: dict) -> bytes | None:
        """Our record once the lock is ours; None to look again."""
        record = self._record_of(fields)
        if self._create(record):
            return record
        try:
            content = self._read()[0]
        except FileNotFoundError:  # Released meanwhile.
            return None
        holder = _parse(content)
        now = time.monotonic()
        unchanged_for = now - watched.setdefault(content, now)
        if holder is None:
            if unchanged_for < self.TORN_GRACE_SECONDS:
                return None  # Its writer may still be writing it.
            reason = f'{self.path} was empty or unreadable for {self.TORN_GRACE_SECONDS:g} s (its writer died while writing it)'
        elif holder['host'] == self._host and not _alive(holder['pid']):
            reason = f'{self.path} names process {holder["pid"]} on {holder["host"]}, which is no longer running'
        else:
            reason = self._unrenewed(holder, content, watched, unchanged_for)
            if reason is None:
                return None
        generation = holder.get('generation') if holder else None
        fields = dict(fields, generation=(generation if isinstance(generation, int) else 0) + 1)
        record = self._record_of(fields)
        if not self._take_over(record, content):
            return None
        logging.warning('%s: taking it over', reason)
        return record

    def _unrenewed(self, holder: dict, content: bytes, watched: dict, unchanged_for: float) -> str | None:
        """Why a live-looking holder's lease is over: its lock unchanged for a whole lease while this
        process watched it. None to look again; raises WorkdirBusyError for a lease that is renewed
        meanwhile, a lock that names no lease, or one of this host whose renewal is recent."""
        lease = holder.get('lease_seconds')
        if not isinstance(lease, (int, float)) or lease <= 0:
            raise WorkdirBusyError(self._busy_message(holder))
        if len(watched) > 1:  # Renewed while we watched: its holder runs.
            raise WorkdirBusyError(self._busy_message(holder))
        renewed = _parse_time(holder.get('renewed'))
        ago = None if renewed is None else self._clock() - renewed
        if holder['host'] == self._host and ago is not None and ago <= lease:
            raise WorkdirBusyError(self._busy_message(holder))  # One clock here: a recent renewal is one.
        who = f'{self.path} names process {holder["pid"]} on host {holder["host"]}'
        if unchanged_for == 0:
            by_its_clock = '' if ago is None else f', renewed {ago:.0f} s ago by its clock (for information only)'
            logging.warning('%s%s: waiting up to %g s to see whether it is renewed', who, by_its_clock, lease)
        if unchanged_for > lease:
            return f'{who}, not renewed for {lease:g} s while this process watched it (its {lease:g} s lease is over)'
        return None

    def _record_of(self, fields: dict) -> bytes:
        return json.dumps({**fields, 'renewed': _iso(self._clock()), 'lease_seconds': self.lease_seconds}).encode()

    def _create(self, record: bytes) -> bool:
        """Writes our lock where there is none: a hard link of a written file, so that it appears
        whole; where the filesystem refuses links, an exclusive create. False if a lock exists."""
        if self._hard_links:
            tmp = self._write_temporary(record)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno not in _NO_LINKS:
                    raise
                self._hard_links = False  # Known from now on: no temporary file per look while waiting.
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'wb') as f:
            f.write(record)
        return True

    def _write_temporary(self, record: bytes) -> str:
        fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + '.', suffix='.tmp', dir=self.workdir)
        with os.fdopen(fd, 'wb') as f:
            f.write(record)
        return tmp

    @contextlib.contextmanager
    def _claimed(self):
        """Yields True while this process holds `run.lock.takeover` (False while another does), so
        that reading, comparing and replacing the lock is one process's at a time. A claim that
        stays unchanged for CLAIM_GRACE_SECONDS was left by a dead process: removed, with a warning."""
        mine = f'{self._host} {os.getpid()} {uuid.uuid4().hex}'.encode()
        try:
            fd = os.open(self.claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._recover_claim()
            yield False
            return
        with os.fdopen(fd, 'wb') as f:
            f.write(mine)
        self._claims_seen.clear()
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                with open(self.claim_path, 'rb') as f:
                    ours = f.read() == mine
                if ours:  # Not one another process made after taking ours for a dead process's.
                    os.remove(self.claim_path)

    def _recover_claim(self):
        try:
            with open(self.claim_path, 'rb') as f:
                seen = (f.read(), os.fstat(f.fileno()).st_ino)
        except FileNotFoundError:
            return
        first = self._claims_seen.setdefault(seen, time.monotonic())
        if time.monotonic() - first < self.CLAIM_GRACE_SECONDS:
            return
        logging.warning('%s was left by a process that died while taking over or renewing the lock (%s; '
                        'unchanged for %g s): removing it', self.claim_path,
                        seen[0].decode(errors='replace') or 'empty', self.CLAIM_GRACE_SECONDS)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.claim_path)
        self._claims_seen.clear()

    def _take_over(self, record: bytes, content: bytes) -> bool:
        """Replaces the stale lock `content` by ours; False if it changed meanwhile or another
        process is claiming it (look again)."""
        with self._claimed() as claimed:
            if not claimed:
                return False
            try:
                if self._read()[0] != content:  # Released, renewed or taken by another since.
                    return False
            except FileNotFoundError:
                return False
            os.replace(self._write_temporary(record), self.path)
            return True

    def _renew_until_released(self) -> None:
        period = self.lease_seconds / 4
        while not self._stop_renewing.wait(period):
            with self._guard:
                if self._record is None or self._lost:
                    return
                try:
                    renewed = self._renew()
                except OSError as error:
                    self._lost = (f'{self.path}: could not renew its lease ({error}): stopping before this run '
                                  f'writes {self.workdir} again, as another run may take it over. Rerun the same '
                                  f'command to resume from the last checkpoint.')
                    logging.error('%s', self._lost)
                    return
            # Another process held the claim (a takeover under way): look again soon.
            period = self.lease_seconds / 4 if renewed else self._POLL_SECONDS

    def _renew(self) -> bool:
        """Rewrites our lock with a new renewal; False if the claim was busy. Sets `_lost` when the
        lock is no longer ours."""
        with self._claimed() as claimed:
            if not claimed:
                return False
            try:
                content = self._read()[0]
            except FileNotFoundError:
                content = b''
            if content != self._record:
                self._lost = (f'{self.path} was taken over by {_who(_parse(content))} while this run held it: '
                              f'stopping, so that two runs do not write {self.workdir}')
                logging.error('%s', self._lost)
                return True
            fields = json.loads(content)
            fields['renewals'] = fields.get('renewals', 0) + 1
            record = self._record_of({k: v for k, v in fields.items() if k not in ('renewed', 'lease_seconds')})
            os.replace(self._write_temporary(record), self.path)
            self._record = record
            return True

    def _read(self) -> tuple[bytes, int]:
        with open(self.path, 'rb') as f:
            return f.read(), os.fstat(f.fileno()).st_ino

    def _busy_message(self, holder: dict) -> str:
        where = ('this host' if holder['host'] == self._host
                 else f'host {holder["host"]}, which this machine cannot check')
        lease = (f'; it renews a {holder["lease_seconds"]:g} s lease, last at {holder["renewed"]} by its clock'
                 if 'lease_seconds' in holder else '')
        return (f'{self.workdir} is in use by process {holder["pid"]} on {where}, running since '
                f'{holder.get("started", "?")}{lease}: {holder.get("command", "?")}\n'
                f'Wait for it to finish, or train into another --workdir. If that process is certainly gone '
                f'(e.g. its machine crashed), delete {self.path}.')


def _who(holder: dict | None) -> str:
    return f'process {holder["pid"]} on {holder["host"]}' if holder else 'another process'


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


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec='milliseconds')


def _parse_time(text) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process: alive.
        pass
    return True
