"""What a Colab runtime does differently, reproduced on this host for the tests: a Drive folder on a
FUSE mount without hard links (tests/drive_fs.py), the variables Colab's TPU runtimes set, and a
reset that brings a new hostname (`unshare --uts`). Each skips with its reason where the host
cannot do it (no /dev/fuse, fuse3 or mfusepy; not root), or fails where CI requires it
(tests/platform_deps.py)."""
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import platform_deps

DRIVE_FS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'drive_fs.py')
# As a single-host Colab TPU runtime sets them (v5e-1).
COLAB_TPU_ENVIRONMENT = {'COLAB_TPU_1VM': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
                         'TPU_ACCELERATOR_TYPE': 'v5litepod-1'}


def _fuse_missing() -> str | None:
    if not os.access('/dev/fuse', os.R_OK | os.W_OK):
        return '/dev/fuse is missing or not accessible (FUSE needs it; CI runs as root with it)'
    if shutil.which('fusermount3') is None:
        return 'fusermount3 is missing: apt-get install fuse3 (.ci/run does)'
    if importlib.util.find_spec('mfusepy') is None:
        return 'mfusepy is missing: make test installs it (requirements-test.txt)'
    return None


@contextlib.contextmanager
def drive_mount(source, mountpoint):
    """`source` served at `mountpoint` by a FUSE filesystem that refuses link(), as Drive's mount."""
    reason = _fuse_missing()
    if reason:
        platform_deps.missing(reason)
    os.makedirs(source, exist_ok=True)
    os.makedirs(mountpoint, exist_ok=True)
    server = subprocess.Popen([sys.executable, DRIVE_FS, str(source), str(mountpoint)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mountpoint):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            platform_deps.missing(f'the FUSE mount did not come up: {server.communicate()[0][-500:]}')
        time.sleep(0.05)
    try:
        yield str(mountpoint)
    finally:
        subprocess.run(['fusermount3', '-u', '-z', str(mountpoint)], check=False, capture_output=True)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def new_hostname_command(hostname: str) -> list[str]:
    """A command prefix that runs a program under another hostname (a UTS namespace of its own),
    as a Colab runtime comes back from a reset; skips (platform_deps) where namespaces cannot be made."""
    probe = subprocess.run(['unshare', '--uts', 'sh', '-c', f'hostname {hostname} && hostname'],
                           capture_output=True, text=True)
    if probe.returncode or probe.stdout.strip() != hostname:
        platform_deps.missing('cannot run under another hostname here (unshare --uts needs root): '
                              f'{probe.stderr.strip()}')
    return ['unshare', '--uts', 'sh', '-c', f'hostname {hostname} && exec "$@"', 'sh']
