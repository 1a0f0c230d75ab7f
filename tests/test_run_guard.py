import datetime
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import colab
import pytest

from allflax import files
from allflax.data import sources
from allflax.training import config_check, resume_check, workdir_lock
from configs import vgg19_mhsa

SYNTHETIC = tuple(sources.synthetic.CLASS_NAMES)
REAL = tuple(sources.REAL)
# Waits for `go`, tries the lock, prints the outcome, and holds a won lock until `done` exists.
CONTENDER = '''
import os, sys, time
from allflax.training import config_check, resume_check, workdir_lock
workdir = sys.argv[1]
while not os.path.exists(os.path.join(workdir, 'go')):
    time.sleep(0.001)
try:
    lock = workdir_lock.WorkdirLock(workdir)
    lock.acquire()
except workdir_lock.WorkdirBusyError:
    print('busy', flush=True)
else:
    print('won', flush=True)
    while not os.path.exists(os.path.join(workdir, 'done')):
        time.sleep(0.01)
    lock.release()
'''


@pytest.fixture(autouse=True)
def deadline():
    """A lock that is never taken nor refused (a loop that looks again for ever) fails its test in
    30 s instead of hanging the suite; every test here takes a second or less (the racing processes
    take seconds under mutmut, which traces them)."""
    def expire(signum, frame):
        raise TimeoutError('still waiting after 30 s')

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _write_lock(workdir, content) -> bytes:
    path = os.path.join(workdir, workdir_lock.LOCK_NAME)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    with open(path, 'wb') as f:
        f.write(data)
    return data


def _holder(pid, host=None):
    return {'host': host or socket.gethostname(), 'pid': pid, 'started': '2026-01-02T03:04:05+00:00',
            'command': 'main.py --workdir=runs/x'}


def _finished_pid() -> int:
    process = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                             text=True, check=True)
    return int(process.stdout)


def _lock_of(workdir) -> dict:
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
        return json.load(f)


def _busy(workdir, pid, where, since='2026-01-02T03:04:05+00:00', lease='', command='main.py --workdir=runs/x'):
    """WorkdirBusyError's message for a lock held by `pid` on `where`."""
    return (f'{workdir} is in use by process {pid} on {where}, running since {since}{lease}: {command}\n'
            f'Wait for it to finish, or train into another --workdir. If that process is certainly gone (e.g. its '
            f'machine crashed), delete {workdir}/run.lock.')


def test_lock_is_written_and_removed(tmp_path, monkeypatch):
    workdir = str(tmp_path / 'run')
    linked, link = [], os.link

    def spy(source, target):
        linked.append((source, target))
        link(source, target)

    monkeypatch.setattr(workdir_lock.os, 'link', spy)
    with workdir_lock.WorkdirLock(workdir) as lock:
        record = _lock_of(workdir)
        assert record['host'] == socket.gethostname() and record['pid'] == os.getpid()
        assert record['started'].endswith('+00:00') and record['command'] == ' '.join(sys.argv)
        assert sorted(os.listdir(workdir)) == ['run.lock']  # No temporary or takeover files left.
    assert os.listdir(workdir) == []
    lock.release()  # Idempotent.
    assert os.listdir(workdir) == []
    # Written whole beside the lock, then linked into place, so that no reader sees it part-written
    # (a hard link cannot cross filesystems: the temporary file must be in the workdir).
    [(source, target)] = linked
    assert target == os.path.join(workdir, 'run.lock') and os.path.dirname(source) == workdir
    # A run killed between the two leaves that file behind: its workdir is still a run's.
    open(source, 'w').close()
    assert resume_check.saved_run_config(workdir) is None


def test_a_lock_never_acquired_allows_no_write_and_releases_nothing(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        lock.check()
    assert str(error.value) == f'{tmp_path}/run.lock is not held by this process: it must not write {tmp_path}'
    lock.release()
    assert os.listdir(tmp_path) == []


def test_our_own_held_lock_refuses_a_second_acquire(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f'process {os.getpid()} on this host'):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()


def test_live_holder_refuses_and_leaves_the_file_unchanged(tmp_path):
    # SIGHUP restored (mutmut's runner ignores it, and its children inherit that), so that a signal
    # sent instead of the probe would show.
    holder = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGHUP, '
                               'signal.SIG_DFL); print(flush=True); time.sleep(30)'], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        data = _write_lock(tmp_path, _holder(holder.pid))
        with pytest.raises(workdir_lock.WorkdirBusyError) as error:
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
        with pytest.raises(subprocess.TimeoutExpired):
            holder.wait(timeout=0.1)  # Asked whether it runs, never sent a signal.
    finally:
        holder.kill()
        holder.wait()
    assert str(error.value) == _busy(tmp_path, holder.pid, 'this host')
    assert (tmp_path / 'run.lock').read_bytes() == data
    assert os.listdir(tmp_path) == ['run.lock']


def test_lock_of_a_finished_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _finished_pid()
    _write_lock(tmp_path, _holder(dead))
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        taken = _lock_of(str(tmp_path))
        # Its lock counts no holders (written before generations): ours is the first generation.
        assert taken['pid'] == os.getpid() and taken['generation'] == 1
        assert os.listdir(tmp_path) == ['run.lock']
    assert [r.getMessage() for r in caplog.records if 'taking it over' in r.getMessage()] == [
        f'{tmp_path / "run.lock"} names process {dead} on {socket.gethostname()}, which is no longer running: '
        'taking it over']
    assert os.listdir(tmp_path) == []


def test_lock_from_another_host_refuses(tmp_path):
    """Pid 1 is a container's first process, a run's there. A lock written by hand may name no
    start or command."""
    data = _write_lock(tmp_path, {'host': 'tpu-vm-7', 'pid': 1})
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert str(error.value) == _busy(tmp_path, 1, 'host tpu-vm-7, which this machine cannot check', since='?',
                                     command='?')
    assert (tmp_path / 'run.lock').read_bytes() == data


# Empty, torn, and whole JSON that names no process: not a dict, no host, pid 0 (not a process).
@pytest.mark.parametrize('content', [b'', b'{"host": "x", "pi', b'[1]', b'{"pid": 5}', b'{"host": "x", "pid": 0}'])
def test_empty_or_torn_lock_is_stale(tmp_path, caplog, monkeypatch, content):
    monkeypatch.setattr(workdir_lock.WorkdirLock, 'TORN_GRACE_SECONDS', 0.1)
    _write_lock(tmp_path, content)
    start = time.monotonic()
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()
    assert 0.1 <= time.monotonic() - start < 2
    assert [r.getMessage() for r in caplog.records] == [
        f'{tmp_path}/run.lock was empty or unreadable for 0.1 s (its writer died while writing it): taking it over']


def test_a_fresh_empty_lock_is_given_its_writers_grace(tmp_path, monkeypatch):
    """Where link() is refused, a lock is created empty and then written: a fresh empty one may be a
    writer at work, and is taken over only once older than the grace."""
    monkeypatch.setattr(workdir_lock.WorkdirLock, 'TORN_GRACE_SECONDS', 0.5)
    _write_lock(tmp_path, b'')
    start = time.monotonic()
    with workdir_lock.WorkdirLock(str(tmp_path)):
        waited = time.monotonic() - start
    assert 0.4 < waited < 3


def test_exit_keeps_a_lock_another_process_owns(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path)):
        other = _write_lock(tmp_path, _holder(os.getppid()))
    assert (tmp_path / 'run.lock').read_bytes() == other


def _race(workdir):
    """8 processes try the lock at once: exactly one wins, and holds it until it is told to stop."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = [subprocess.Popen([sys.executable, '-c', CONTENDER, str(workdir)], stdout=subprocess.PIPE,
                                  text=True, cwd=root) for _ in range(8)]
    try:
        (workdir / 'go').touch()
        outcomes = {process.pid: process.stdout.readline().strip() for process in processes}
        winners = [pid for pid, outcome in outcomes.items() if outcome == 'won']
        assert len(winners) == 1 and sorted(outcomes.values()).count('busy') == 7
        assert _lock_of(str(workdir))['pid'] == winners[0]
        (workdir / 'done').touch()
        assert [process.wait(timeout=10) for process in processes] == [0] * 8
    finally:  # None left waiting for the lock after a failure.
        for process in processes:
            process.kill()
            process.wait()
    assert sorted(os.listdir(workdir)) == ['done', 'go']


def test_one_of_many_racing_processes_takes_a_stale_lock_over(tmp_path):
    _write_lock(tmp_path, _holder(_finished_pid()))
    _race(tmp_path)


@pytest.mark.parametrize('meanwhile', ['renewed', 'released'])
def test_a_stale_lock_that_changes_before_its_takeover_is_looked_at_again(tmp_path, monkeypatch, meanwhile):
    """Between this process reading a stale lock and claiming it, another process took it (or its
    holder released it): the takeover is dropped, and the lock judged again as it now is."""
    _write_lock(tmp_path, _holder(_finished_pid()))
    take_over, taken = workdir_lock.WorkdirLock._take_over, []

    def after_a_race(self, record, content):
        if meanwhile == 'renewed':
            taken.append(_write_lock(tmp_path, _holder(os.getppid())))
        else:
            os.remove(tmp_path / 'run.lock')
        return take_over(self, record, content)

    monkeypatch.setattr(workdir_lock.WorkdirLock, '_take_over', after_a_race)
    if meanwhile == 'renewed':
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f'in use by process {os.getppid()} on this host'):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
        assert (tmp_path / 'run.lock').read_bytes() == taken[0]
    else:
        with workdir_lock.WorkdirLock(str(tmp_path)) as lock:  # A free workdir now: created afresh.
            assert _lock_of(str(tmp_path))['pid'] == os.getpid()
            lock.check()


@pytest.mark.parametrize('stale', [False, True], ids=['free', 'stale'])
def test_one_of_many_racing_processes_wins_on_a_mount_without_hard_links(tmp_path, stale):
    """On a FUSE mount that refuses link(), as Colab's Drive: the lock is created exclusively."""
    with colab.drive_mount(tmp_path / 'drive', tmp_path / 'mnt') as mount:
        workdir = tmp_path / 'mnt' / 'run'
        workdir.mkdir()
        with pytest.raises(OSError):
            os.link(__file__, os.path.join(mount, 'probe'))
        if stale:
            _write_lock(workdir, _holder(_finished_pid()))
        _race(workdir)


def _refuse_links(monkeypatch, code=errno.EPERM) -> list:
    """link() fails with `code`, as on Drive's FUSE mount (ENOSYS) and others (EPERM); returns the
    paths it was asked to link to."""
    tried = []

    def link(source, target):
        tried.append(target)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(workdir_lock.os, 'link', link)
    return tried


def test_where_links_are_refused_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    """Without FUSE: link() refused, the lock is created with O_EXCL and written whole; a contender
    then sees it and is refused. Each lock learns of the refusal once, not at every look."""
    tried = _refuse_links(monkeypatch)
    with SkewedHost('host-a', 0).lock(tmp_path, 0.4) as holder:
        record = _lock_of(str(tmp_path))
        assert (record['host'], record['pid'], record['generation']) == ('host-a', os.getpid(), 1)
        with pytest.raises(workdir_lock.WorkdirBusyError, match='in use by process .* on host host-a'):
            SkewedHost('host-b', 0).lock(tmp_path, 0.4).acquire()  # Looks until it sees a renewal.
        holder.check()
        assert _lock_of(str(tmp_path))['token'] == record['token']
    assert tried == [str(tmp_path / 'run.lock')] * 2
    assert os.listdir(tmp_path) == []  # No temporary file left by the links tried.


def test_a_link_error_other_than_a_refusal_is_raised(tmp_path, monkeypatch):
    """EIO is a failing disk, not a filesystem without hard links: raised, not worked around."""
    _refuse_links(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as error:
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert error.value.errno == errno.EIO and os.listdir(tmp_path) == []


def _leased(host, renewed_seconds_ago, lease=60.0, pid=4242):
    renewed = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=renewed_seconds_ago)
    return {**_holder(pid, host=host), 'renewed': renewed.isoformat(), 'lease_seconds': lease}


@pytest.mark.parametrize('renewed_seconds_ago', [90, None], ids=['renewed', 'renewal_unreadable'])
def test_an_expired_lease_from_another_host_is_taken_over_naming_its_holder(tmp_path, caplog, renewed_seconds_ago):
    """A Colab runtime reset: the old runtime's lock names another host and is no longer renewed.
    Its recorded time is by another clock: the lease is over once this process has watched it
    unrenewed for a whole lease, however long ago that clock says it was renewed, or without one."""
    holder = {**_leased('colab-runtime-1', renewed_seconds_ago=renewed_seconds_ago or 0, lease=0.3), 'generation': 3}
    if renewed_seconds_ago is None:
        del holder['renewed']
    _write_lock(tmp_path, holder)
    start = time.monotonic()
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        taken = _lock_of(str(tmp_path))
        assert taken['host'] == socket.gethostname() and taken['generation'] == 4
    assert 0.3 <= time.monotonic() - start < 2
    who = f'{tmp_path}/run.lock names process 4242 on host colab-runtime-1'
    by_its_clock = ', renewed 90 s ago by its clock (for information only)' if renewed_seconds_ago else ''
    assert [r.getMessage() for r in caplog.records] == [  # Told once that it waits, then once that it takes over.
        f'{who}{by_its_clock}: waiting up to 0.3 s to see whether it is renewed',
        f'{who}, not renewed for 0.3 s while this process watched it (its 0.3 s lease is over): taking it over']


def test_a_live_process_of_this_host_that_stopped_renewing_loses_its_lease(tmp_path, caplog):
    """A process of this host that has not renewed its lease for a whole lease is hung, or its pid
    was reused: once watched unrenewed for a lease, the lease is over all the same."""
    _write_lock(tmp_path, _leased(socket.gethostname(), renewed_seconds_ago=120, pid=os.getppid(), lease=0.5))
    start = time.monotonic()
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()
    assert time.monotonic() - start >= 0.5
    assert any(f'process {os.getppid()} on host {socket.gethostname()}, not renewed for 0.5 s while this process '
               f'watched it' in r.getMessage() for r in caplog.records)


def test_a_recent_renewal_of_a_live_process_of_this_host_is_refused_at_once(tmp_path):
    """One host, one clock: a live holder that renewed within its lease is busy, without waiting."""
    holder = _leased(socket.gethostname(), renewed_seconds_ago=0.5, pid=os.getppid(), lease=2.0)
    data = _write_lock(tmp_path, holder)
    start = time.monotonic()
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert time.monotonic() - start < 0.5 and (tmp_path / 'run.lock').read_bytes() == data
    assert str(error.value) == _busy(tmp_path, os.getppid(), 'this host',
                                     lease=f'; it renews a 2 s lease, last at {holder["renewed"]} by its clock')


def test_a_lease_of_no_length_from_another_host_is_never_over(tmp_path):
    """A lease of 0 s is no lease: as a lock written before leases, never taken from another host."""
    data = _write_lock(tmp_path, _leased('tpu-vm-7', renewed_seconds_ago=0, lease=0))
    with pytest.raises(workdir_lock.WorkdirBusyError, match='host tpu-vm-7, which this machine cannot check'):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert (tmp_path / 'run.lock').read_bytes() == data


def test_a_renewed_lease_from_another_host_is_refused(tmp_path, monkeypatch):
    """A live run elsewhere renews its lease while this process watches: one renewal seen is
    enough, refused at once, the file left as its holder wrote it."""
    lease = 1.0
    _write_lock(tmp_path, _leased('tpu-vm-7', renewed_seconds_ago=0, lease=lease))
    renewed, sleep, renewals = json.dumps({**_leased('tpu-vm-7', 0, lease=lease), 'renewals': 1}), time.sleep, []

    def renew_then_sleep(seconds):  # The holder renews once while this process waits to look again.
        if not renewals:
            renewals.append((tmp_path / 'renewed').write_text(renewed))
            os.replace(tmp_path / 'renewed', tmp_path / 'run.lock')
        sleep(seconds)

    monkeypatch.setattr(workdir_lock.time, 'sleep', renew_then_sleep)
    start = time.monotonic()
    with pytest.raises(workdir_lock.WorkdirBusyError, match='host tpu-vm-7, which this machine cannot check'):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert time.monotonic() - start < lease
    assert (tmp_path / 'run.lock').read_text() == renewed


def test_a_lease_left_unrenewed_is_taken_over_even_with_a_clock_ahead(tmp_path, caplog):
    """Another host's clock may run ahead: a lease that stays unrenewed for a whole lease while this
    process watches is over, whatever time it claims."""
    _write_lock(tmp_path, _leased('fast-clock-host', renewed_seconds_ago=-3600, lease=0.5))
    start = time.monotonic()
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        pass
    assert 0.5 <= time.monotonic() - start < 3
    assert any('not renewed for 0.5 s while this process watched it' in r.getMessage() for r in caplog.records)


def test_the_holder_renews_its_lease_and_learns_when_it_lost_it(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=0.4) as lock:
        first = _lock_of(str(tmp_path))
        assert first['lease_seconds'] == 0.4 and first['generation'] == 1 and first['renewals'] == 0
        time.sleep(0.35)
        renewed = _lock_of(str(tmp_path))
        assert renewed['renewals'] >= 2 and renewed['renewed'] > first['renewed']
        assert {k: renewed[k] for k in ('started', 'token', 'pid')} == {k: first[k] for k in ('started', 'token', 'pid')}
        lock.check()
        _write_lock(tmp_path, _leased('other-host', renewed_seconds_ago=0))  # Taken over meanwhile.
        with pytest.raises(workdir_lock.WorkdirBusyError, match='taken over by process 4242 on other-host'):
            lock.check()  # At once: the check reads the lock before each write.
        with pytest.raises(workdir_lock.WorkdirBusyError, match='taken over by process 4242 on other-host'):
            lock.check()  # And stays lost, even if the lock were to read as ours again.
    assert _lock_of(str(tmp_path))['host'] == 'other-host'  # Not ours: left alone at release.


class SkewedHost:
    """A host of its own name whose wall clock runs `offset` seconds from this one's."""

    def __init__(self, name, offset):
        self.name, self.offset = name, offset

    def lock(self, workdir, lease):
        return workdir_lock.WorkdirLock(str(workdir), lease_seconds=lease, hostname=self.name,
                                     clock=lambda: time.time() + self.offset)


@pytest.mark.parametrize('offset', [300, -300], ids=['contender_ahead', 'contender_behind'])
def test_a_live_lease_holds_whatever_the_contenders_clock_says(tmp_path, offset):
    """Measured before the fix: a contender whose clock ran 300 s ahead took a live 60 s lease from
    another host at once. Clocks off by five leases either way: refused while the holder renews."""
    lease = 0.4
    with SkewedHost('host-a', 0).lock(tmp_path, lease) as holder:
        held = _lock_of(str(tmp_path))
        start = time.monotonic()
        with pytest.raises(workdir_lock.WorkdirBusyError, match='in use by process .* on host host-a'):
            SkewedHost('host-b', offset).lock(tmp_path, lease).acquire()
        assert time.monotonic() - start < lease  # A renewal is seen within a quarter lease or so.
        holder.check()
        assert _lock_of(str(tmp_path))['token'] == held['token']
    assert os.listdir(tmp_path) == []


def test_a_renewal_never_overwrites_a_newer_holder(tmp_path, monkeypatch):
    """A takeover holds run.lock.takeover while it replaces the lock: the holder's renewal waits for
    it, then finds the lock taken, and leaves the new holder's lock as it is."""
    lease = 0.4
    with workdir_lock.WorkdirLock(str(tmp_path), lease_seconds=lease) as lock:
        claim = tmp_path / 'run.lock.takeover'
        claim.write_bytes(b'host-b 77 claim')  # host-b is taking over: its read, compare, replace.
        before = (tmp_path / 'run.lock').read_bytes()
        time.sleep(lease / 2)  # Two renewal periods: none may write while the claim is held.
        assert (tmp_path / 'run.lock').read_bytes() == before
        newer = _write_lock(tmp_path, {**_leased('host-b', renewed_seconds_ago=0, pid=77), 'token': 'b' * 32})
        claim.unlink()
        time.sleep(lease / 2)
        assert (tmp_path / 'run.lock').read_bytes() == newer
        with pytest.raises(workdir_lock.WorkdirBusyError, match='taken over by process 77 on host-b'):
            lock.check()
    assert (tmp_path / 'run.lock').read_bytes() == newer


class Ticks:
    """Stands in for a lock's stop event, so that its renewing thread runs without waiting: each
    wait(period) is recorded and returns at once, False (renew now) after running the next of
    `actions`, True (stop) when none is left."""

    def __init__(self, *actions):
        self.periods, self._actions = [], list(actions)

    def wait(self, period):
        self.periods.append(period)
        if not self._actions:
            return True
        self._actions.pop(0)()
        return False

    def set(self):
        pass

    def clear(self):
        pass


def _ticked(workdir, *actions, lease=0.4) -> tuple[workdir_lock.WorkdirLock, Ticks]:
    """A lock acquired in `workdir` whose renewing thread has run through `actions` and stopped."""
    lock = workdir_lock.WorkdirLock(str(workdir), lease_seconds=lease)
    lock._stop_renewing = ticks = Ticks(*actions)  # What release() sets, and the thread waits on.
    lock.acquire()
    lock._renewer.join(5)
    return lock, ticks


def test_the_lease_is_renewed_each_quarter_lease_and_soon_after_a_busy_claim(tmp_path):
    """A renewal waits while another process holds run.lock.takeover, and is tried again soon
    rather than a quarter lease later."""
    claim, first = tmp_path / 'run.lock.takeover', []
    lock, ticks = _ticked(tmp_path, lambda: first.append(_lock_of(str(tmp_path))),
                          lambda: claim.write_bytes(b'host-b 77 claim'), claim.unlink)
    renewed = _lock_of(str(tmp_path))
    assert ticks.periods[:2] == [0.1, 0.1] and ticks.periods[2] < 0.1 and ticks.periods[3:] == [0.1]
    assert first[0]['renewals'] == 0 and renewed['renewals'] == 2 and renewed['renewed'] >= first[0]['renewed']
    assert {k: v for k, v in renewed.items() if k not in ('renewals', 'renewed')} == {
        k: v for k, v in first[0].items() if k not in ('renewals', 'renewed')}
    lock.release()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('taken', [True, False], ids=['taken_over', 'deleted'])
def test_a_renewal_that_finds_the_lock_gone_stops_the_run(tmp_path, caplog, taken):
    """A renewal that finds another's lock, or none, says so once, renews no more, and stops the
    run at its next write."""
    def lose():
        if taken:
            _write_lock(tmp_path, {**_leased('host-b', renewed_seconds_ago=0, pid=77), 'token': 'b' * 32})
        else:
            os.remove(tmp_path / 'run.lock')

    with caplog.at_level('ERROR'):
        lock, ticks = _ticked(tmp_path, lose, lambda: None, lambda: None)
    message = (f'{tmp_path}/run.lock was taken over by {"process 77 on host-b" if taken else "another process"} '
               f'while this run held it: stopping, so that two runs do not write {tmp_path}')
    assert len(ticks.periods) == 2  # No renewal after it.
    assert [r.getMessage() for r in caplog.records] == [message]
    for _ in range(2):  # At the next write, and every one after.
        with pytest.raises(workdir_lock.WorkdirBusyError) as error:
            lock.check()
        assert str(error.value) == message
    lock.release()  # Leaves the other's lock as it is.
    assert os.listdir(tmp_path) == (['run.lock'] if taken else [])


def test_a_failed_renewal_stops_the_run_before_its_next_write(tmp_path, monkeypatch, caplog):
    def refuse(self, record):
        raise OSError(5, 'Input/output error')

    with caplog.at_level('ERROR'):
        lock, _ = _ticked(tmp_path, lambda: monkeypatch.setattr(workdir_lock.WorkdirLock, '_write_temporary', refuse),
                          lambda: None)
    message = (f'{tmp_path}/run.lock: could not renew its lease ([Errno 5] Input/output error): stopping before this '
               f'run writes {tmp_path} again, as another run may take it over. Rerun the same command to resume from '
               f'the last checkpoint.')
    assert [r.getMessage() for r in caplog.records] == [message]
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        lock.check()
    assert str(error.value) == message
    lock.release()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_renewal_thread_stops_the_run_before_its_next_write(tmp_path, monkeypatch, caplog):
    with caplog.at_level('ERROR'):
        # Any error: the thread dies of it.
        lock, _ = _ticked(tmp_path, lambda: monkeypatch.setattr(workdir_lock.WorkdirLock, '_renew', lambda self: 1 / 0))
        with pytest.raises(workdir_lock.WorkdirBusyError) as error:
            lock.check()
    message = (f'{tmp_path}/run.lock: the thread that renews its lease has stopped while this run held it: stopping '
               f'before this run writes {tmp_path} again, so that two runs never write it. Rerun the same command to '
               f'resume from the last checkpoint once no other run writes there.')
    assert str(error.value) == message and [r.getMessage() for r in caplog.records] == [message]
    lock.release()


def test_a_lock_deleted_by_hand_stops_the_run_at_its_next_write(tmp_path, caplog):
    """The busy message tells users to delete the lock of a run that is certainly gone: deleted
    under a live run, that run stops at its next write, and still exits cleanly."""
    path = tmp_path / 'run.lock'
    with caplog.at_level('ERROR'), workdir_lock.WorkdirLock(str(tmp_path)) as lock:  # 60 s lease: no renewal here.
        os.remove(path)
        with pytest.raises(workdir_lock.WorkdirBusyError) as error:
            lock.check()
    message = (f"{path}: it cannot be read ([Errno 2] No such file or directory: '{path}') while this run held it: "
               f'stopping before this run writes {tmp_path} again, so that two runs never write it. Rerun the same '
               f'command to resume from the last checkpoint once no other run writes there.')
    assert str(error.value) == message and [r.getMessage() for r in caplog.records] == [message]
    assert os.listdir(tmp_path) == []


def test_a_process_that_exits_holding_the_lock_is_not_kept_alive_by_its_renewals(tmp_path):
    """A script that never releases the lock still exits; its lock stays, naming a dead process,
    and the next run takes it over."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = 'import sys; from allflax.training import workdir_lock; workdir_lock.WorkdirLock(sys.argv[1]).acquire()'
    subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=root, timeout=5, check=True)
    left = _lock_of(str(tmp_path))
    with workdir_lock.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['generation'] == left['generation'] + 1


# A claim is created empty, then written: a process killed in between leaves it empty.
@pytest.mark.parametrize('claim, shown', [(b'host-x 99 0123', 'host-x 99 0123'), (b'', 'empty')],
                         ids=['whole', 'empty'])
def test_a_leftover_takeover_claim_is_recovered_after_its_grace(tmp_path, monkeypatch, caplog, claim, shown):
    """A process killed during a takeover leaves run.lock.takeover: later starts wait out the grace,
    remove it and go on, instead of refusing for ever."""
    monkeypatch.setattr(workdir_lock.WorkdirLock, 'CLAIM_GRACE_SECONDS', 0.2)
    _write_lock(tmp_path, _holder(_finished_pid()))
    (tmp_path / 'run.lock.takeover').write_bytes(claim)
    start = time.monotonic()
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()
    assert 0.2 <= time.monotonic() - start < 2
    assert [r.getMessage() for r in caplog.records if 'was left by' in r.getMessage()] == [
        f'{tmp_path}/run.lock.takeover was left by a process that died while taking over or renewing the lock '
        f'({shown}; unchanged for 0.2 s): removing it']
    assert os.listdir(tmp_path) == []


def test_a_takeover_claim_made_anew_is_given_a_grace_of_its_own(tmp_path, monkeypatch, caplog):
    """A claim that changes while this process waits was made by a live process since: its grace
    starts again from when it was seen changed."""
    monkeypatch.setattr(workdir_lock.WorkdirLock, 'CLAIM_GRACE_SECONDS', 0.2)
    _write_lock(tmp_path, _holder(_finished_pid()))
    claim = tmp_path / 'run.lock.takeover'
    claim.write_bytes(b'host-x 99 0123')
    sleep, looks = time.sleep, []

    def sleep_then_claim_anew(seconds):
        looks.append(time.monotonic())
        if len(looks) == 3:
            (tmp_path / 'claim').write_bytes(b'host-y 98 4567')
            os.replace(tmp_path / 'claim', claim)
        sleep(seconds)

    monkeypatch.setattr(workdir_lock.time, 'sleep', sleep_then_claim_anew)
    with caplog.at_level('WARNING'), workdir_lock.WorkdirLock(str(tmp_path)):
        assert time.monotonic() - looks[2] >= 0.2
    assert [r.getMessage() for r in caplog.records if 'was left by' in r.getMessage()] == [
        f'{claim} was left by a process that died while taking over or renewing the lock (host-y 98 4567; unchanged '
        f'for 0.2 s): removing it']


def test_a_config_json_that_is_not_json_is_refused(tmp_path):
    (tmp_path / 'config.json').write_text('{"model": ')
    with pytest.raises(files.OutputRefused) as error:
        resume_check.saved_run_config(str(tmp_path))
    assert str(error.value) == (f"{tmp_path}/config.json is not an allflax run's config.json (Expecting value: line 1 "
                                f'column 11 (char 10)): restore it, or train into a new --workdir')


def test_a_runs_config_json_has_its_four_sections(tmp_path):
    config = {'model': {'name': 'vgg16'}, 'data': {}, 'seed': 0}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(files.OutputRefused) as error:
        resume_check.saved_run_config(str(tmp_path))
    assert str(error.value) == (f"{tmp_path}/config.json is not an allflax run's config.json (it has no "
                                f'data/model/optimizer/seed sections): {tmp_path} is not a run; train into a new or '
                                f'empty --workdir')
    config['optimizer'] = {}  # Those four and no more: a run's.
    (tmp_path / 'config.json').write_text(json.dumps(config))
    assert resume_check.saved_run_config(str(tmp_path)) == config


def test_a_folder_of_other_files_is_not_a_runs_workdir(tmp_path):
    for name in ('checkpoints', 'eval', 'notes'):
        (tmp_path / name).mkdir()
    for name in ('run.lock', 'run.lock.takeover', 'run.lock.x1y2.tmp', 'metrics.jsonl', 'paper.tex'):
        (tmp_path / name).write_text('')
    with pytest.raises(files.OutputRefused) as error:
        resume_check.saved_run_config(str(tmp_path))
    assert str(error.value) == (f"{tmp_path} holds files that allflax did not write there (notes, paper.tex): it is "
                                f"not a run's workdir; name a new or empty folder (allflax replaces only its own "
                                f'files)')


def _configs():
    saved = json.loads(json.dumps(vgg19_mhsa.get_config('demo').to_dict()))  # As config.json holds it.
    return saved, vgg19_mhsa.get_config('demo')


def test_identical_config_resumes_silently():
    saved, new = _configs()
    assert resume_check.check_resume(saved, new.to_dict(), workdir='runs/a') == []


def test_seed_and_model_changes_are_refused_and_listed():
    saved, new = _configs()
    new.seed = 3
    new.model.name = 'vgg16'
    new.log_every_steps = 5
    with pytest.raises(resume_check.ResumeMismatchError) as error:
        resume_check.check_resume(saved, new.to_dict(), workdir='runs/a')
    assert str(error.value) == (
        "refusing to resume runs/a: its config.json differs in 2 settings that change the result:\n"
        "  model.name: 'vgg19_mhsa' -> 'vgg16'\n"
        "  seed: 0 -> 3\n"
        "Rerun with the same settings, or train into a new --workdir.")


def test_num_workers_change_is_refused():
    saved, new = _configs()
    new.data.num_workers = 2
    with pytest.raises(resume_check.ResumeMismatchError) as error:
        resume_check.check_resume(saved, new.to_dict(), workdir='runs/a')
    assert str(error.value) == (  # One setting: singular ("1 setting that change" before).
        'refusing to resume runs/a: its config.json differs in 1 setting that changes the result:\n'
        '  data.num_workers: 0 -> 2\n'
        'Rerun with the same settings, or train into a new --workdir.')


def test_logging_evaluation_and_folders_may_change():
    saved, new = _configs()
    new.log_every_steps = 5
    new.eval.tta = True
    new.data.dir = '/mnt/moved'
    assert resume_check.check_resume(saved, new.to_dict(), workdir='runs/a') == [
        "data.dir: '' -> '/mnt/moved'", 'eval.tta: False -> True', 'log_every_steps: 20 -> 5']


def test_total_steps_may_grow_but_not_shrink():
    saved, new = _configs()
    new.total_steps = 1600
    assert resume_check.check_resume(saved, new.to_dict(), workdir='runs/a') == [
        'total_steps: 800 -> 1600 (the learning-rate schedule is stretched over the new total from the '
        'resumed step on)']
    new.total_steps = 400
    with pytest.raises(resume_check.ResumeMismatchError, match='total_steps: 800 -> 400'):
        resume_check.check_resume(saved, new.to_dict(), workdir='runs/a')
    assert resume_check.check_resume({'total_steps': 1}, {'total_steps': 2}, workdir='w') == [
        'total_steps: 1 -> 2 (the learning-rate schedule is stretched over the new total from the resumed step on)']
    saved['total_steps'] = 0
    new.total_steps = 1600
    with pytest.raises(resume_check.ResumeMismatchError, match="total_steps: 0 -> 1600 \\(the run's length came"):
        resume_check.check_resume(saved, new.to_dict(), workdir='runs/a')


def test_tuples_equal_lists_and_floats_compare_exactly():
    assert resume_check.check_resume({'data': {'mean': [0.5, 0.25]}}, {'data': {'mean': (0.5, 0.25)}},
                                  workdir='w') == []
    with pytest.raises(resume_check.ResumeMismatchError, match=r'data.mean: \[0.5, 0.25\] -> \(0.5, 0.250001\)'):
        resume_check.check_resume({'data': {'mean': [0.5, 0.25]}}, {'data': {'mean': (0.5, 0.250001)}},
                               workdir='w')
    with pytest.raises(resume_check.ResumeMismatchError, match=r'data.mean: \[0.5\] -> 0.5\n'):
        resume_check.check_resume({'data': {'mean': [0.5]}}, {'data': {'mean': 0.5}}, workdir='w')


def test_key_missing_from_an_older_run():
    saved, new = {'seed': 0}, {'seed': 0, 'data': {'skip_corrupt': False}}
    assert resume_check.check_resume(saved, new, workdir='w', defaults={'data': {'skip_corrupt': False}}) == [
        'data.skip_corrupt: absent -> False (the default; the run predates this setting)']
    new['data']['skip_corrupt'] = True
    with pytest.raises(resume_check.ResumeMismatchError, match='data.skip_corrupt: absent -> True'):
        resume_check.check_resume(saved, new, workdir='w', defaults={'data': {'skip_corrupt': False}})
    with pytest.raises(resume_check.ResumeMismatchError, match='model.name: .vgg16. -> absent'):
        resume_check.check_resume({'model': {'name': 'vgg16'}}, {}, workdir='w')


def _validate(config):
    config_check.validate_config(config, synthetic_names=SYNTHETIC, real_names=REAL)


def test_recipe_config_is_valid():
    _validate(vgg19_mhsa.get_config('demo'))
    _validate(vgg19_mhsa.get_config())


def test_negative_total_steps_is_named():
    config = vgg19_mhsa.get_config('demo')
    config.total_steps = -5
    with pytest.raises(config_check.ConfigError) as error:
        _validate(config)
    assert str(error.value) == ('invalid config: total_steps=-5 must be >= 0 (0 trains for num_epochs); '
                                'set --config.total_steps')


def test_every_invalid_value_is_listed():
    config = vgg19_mhsa.get_config('demo')
    config.batch_size = 0
    config.keep_checkpoints = 0
    config.optimizer.learning_rate = 0.0
    config.data.split_fractions.test = 0.3
    message = pytest.raises(config_check.ConfigError, _validate, config).value.args[0]
    # One line each: data.split_fractions, a ConfigDict, was shown as its YAML over four lines.
    assert message == (
        'invalid config:\n'
        '  batch_size=0 must be >= 1 (the global batch, over all devices); set --config.batch_size\n'
        '  keep_checkpoints=0 must be >= 1; set --config.keep_checkpoints\n'
        "  data.split_fractions={'test': 0.3, 'train': 0.7, 'val': 0.15} must be >= 0 and sum to 1; "
        'set --config.data.split_fractions\n'
        '  optimizer.learning_rate=0.0 must be > 0; set --config.optimizer.learning_rate')


def test_data_dir_with_a_synthetic_set_is_refused():
    config = vgg19_mhsa.get_config('demo')
    config.data.dir = '/data/cnmc'
    with pytest.raises(config_check.ConfigError, match="data.dir='/data/cnmc' is ignored by the synthetic data set "
                                                    'synthetic_all4: set --config.data.name to a real data set '
                                                    r'\(cnmc2019, all_aria, all_idb2, image_folder\)'):
        _validate(config)


def test_real_set_without_data_dir_is_refused():
    config = vgg19_mhsa.get_config('demo')
    config.data.name = 'cnmc2019'
    with pytest.raises(config_check.ConfigError, match='set --config.data.dir'):
        _validate(config)
    config.data.dir = '/data/cnmc'
    _validate(config)


MODELS, AUGMENTATIONS = ('vgg16', 'vgg19_mhsa'), ('flip', 'rot90')


def _validate_all(config):
    config_check.validate_config(config, synthetic_names=SYNTHETIC, real_names=REAL, model_names=MODELS,
                              augment_names=AUGMENTATIONS)


def _demo(**values):
    """The demo recipe with `values` set, dotted keys by their underscores: data__split=..."""
    config = vgg19_mhsa.get_config('demo')
    for key, value in values.items():
        *parents, name = key.split('__')
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


@pytest.mark.parametrize('values', [
    dict(total_steps=1, num_epochs=0),  # Steps alone, or epochs alone, say how long to train.
    dict(total_steps=0, num_epochs=1),
    dict(batch_size=1, log_every_steps=1, eval_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=1),
    dict(data__image_size=32, data__num_workers=0, data__split='official', data__augment=()),
    dict(data__split='random', data__split_fractions__train=0.8, data__split_fractions__val=0.2,
         data__split_fractions__test=0.0),
    # Thirds rounded to 7 digits sum to 0.9999999: within the 1e-6 the rule allows.
    dict(data__split_fractions__train=0.3333333, data__split_fractions__val=0.3333333,
         data__split_fractions__test=0.3333333),
    dict(optimizer__warmup_fraction=0.0, optimizer__weight_decay=0.0, loss__gamma=0.0, model__init_from='imagenet'),
    dict(optimizer__warmup_fraction=1.0, loss__gamma=0.5, model__name='vgg16'),
    dict(dtype='float16'), dict(dtype='bfloat16'),
], ids=lambda values: ','.join(values))
def test_every_rule_accepts_the_edge_of_its_range(values):
    _validate_all(_demo(**values))


def test_a_keras_weights_directory_is_a_valid_init_from(tmp_path):
    _validate_all(_demo(model__init_from=str(tmp_path)))


def test_each_invalid_value_is_named_with_its_rule_and_flag(tmp_path):
    config = _demo(total_steps=-1, num_epochs=-1, batch_size=0, log_every_steps=0, eval_every_steps=0,
                   checkpoint_every_steps=0, keep_checkpoints=0, dtype='float64', data__image_size=31,
                   model__name='vgg99',
                   data__augment=('flip', 'warp'), model__init_from=str(tmp_path / 'missing'),
                   data__num_workers=-1, data__split='stratified', data__split_fractions__train=1.2,
                   data__split_fractions__val=-0.2, data__split_fractions__test=0.0,
                   optimizer__learning_rate=0.0, optimizer__warmup_fraction=1.5, optimizer__weight_decay=-0.1,
                   loss__gamma=-1.0, data__dir='/data/cnmc')
    with pytest.raises(config_check.ConfigError) as error:
        _validate_all(config)
    assert str(error.value) == (
        'invalid config:\n'
        '  total_steps=-1 must be >= 0 (0 trains for num_epochs); set --config.total_steps\n'
        '  num_epochs=-1 must be >= 0; set --config.num_epochs\n'
        '  batch_size=0 must be >= 1 (the global batch, over all devices); set --config.batch_size\n'
        '  log_every_steps=0 must be >= 1 step; set --config.log_every_steps\n'
        '  eval_every_steps=0 must be >= 1 step; set --config.eval_every_steps\n'
        '  checkpoint_every_steps=0 must be >= 1 step; set --config.checkpoint_every_steps\n'
        '  keep_checkpoints=0 must be >= 1; set --config.keep_checkpoints\n'
        "  dtype='float64' must be float32, bfloat16 or float16 (the compute dtype; parameters stay float32); "
        'set --config.dtype\n'
        '  data.image_size=31 must be >= 32 pixels (the networks downsample by 32); set --config.data.image_size\n'
        "  model.name='vgg99' is not a model: use one of vgg16, vgg19_mhsa; set --config.model.name\n"
        "  data.augment=('flip', 'warp') names an unknown op: use some of flip, rot90; set --config.data.augment\n"
        f"  model.init_from='{tmp_path}/missing' must be '' (from scratch), 'imagenet', or a directory written by "
        'python -m allflax.models.keras_weights; set --config.model.init_from\n'
        '  data.num_workers=-1 must be >= 0 (0 reads in the main process); set --config.data.num_workers\n'
        "  data.split='stratified' must be patient, official or random; set --config.data.split\n"
        "  data.split_fractions={'test': 0.0, 'train': 1.2, 'val': -0.2} must be >= 0 and sum to 1; "
        'set --config.data.split_fractions\n'
        '  optimizer.learning_rate=0.0 must be > 0; set --config.optimizer.learning_rate\n'
        '  optimizer.warmup_fraction=1.5 must be in [0, 1] (a fraction of total steps); '
        'set --config.optimizer.warmup_fraction\n'
        '  optimizer.weight_decay=-0.1 must be >= 0; set --config.optimizer.weight_decay\n'
        '  loss.gamma=-1.0 must be >= 0 (0 is plain sigmoid cross-entropy); set --config.loss.gamma\n'
        "  data.dir='/data/cnmc' is ignored by the synthetic data set synthetic_all4: set --config.data.name to a "
        'real data set (cnmc2019, all_aria, all_idb2, image_folder) or drop data.dir')


@pytest.mark.parametrize('values, message', [
    (dict(total_steps=0, num_epochs=0),
     'total_steps=0 and num_epochs=0 train nothing; set --config.total_steps or --config.num_epochs'),
    (dict(optimizer__warmup_fraction=-0.1),
     'optimizer.warmup_fraction=-0.1 must be in [0, 1] (a fraction of total steps); '
     'set --config.optimizer.warmup_fraction'),
    (dict(data__name='mnist'),
     "data.name='mnist' is unknown: set --config.data.name to one of synthetic_all4, synthetic_cnmc, cnmc2019, "
     'all_aria, all_idb2, image_folder'),
    (dict(data__name='cnmc2019'),
     "data.name='cnmc2019' reads images from data.dir, which is empty: set --config.data.dir to the downloaded "
     'folder'),
], ids=['no_length', 'negative_warmup', 'unknown_data', 'real_data_without_dir'])
def test_a_single_problem_is_named_on_the_first_line(values, message):
    with pytest.raises(config_check.ConfigError) as error:
        _validate_all(_demo(**values))
    assert str(error.value) == f'invalid config: {message}'
